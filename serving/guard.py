"""Admission control of the ingress, as a plain ASGI middleware around the FastAPI app.

For ``/v1/*`` it reads the whole body first, under a deadline (``body_timeout_s``: 408) and a size cap
(413). A body still arriving after ``upload_grace_s`` takes one of ``max_uploading`` upload slots, or gets
a 408 at once when all are taken, so slow or stalled uploads never hold the ``max_inflight`` capacity that
admitted, fully-read requests use. Only then is the request admitted (503 + Retry-After beyond
``max_inflight``) and handed to the app with its body replayed. Every request is counted in
``diffae_requests_total``; a client that goes away is counted as 499 and logged in one line, and a bug
still answers a JSON 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from ray.exceptions import TaskCancelledError
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse

from .errors import ApiError
from .settings import Limits

logger = logging.getLogger("ray.serve")
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
CLIENT_CLOSED = 499
# How a client that went away shows up: Starlette's ClientDisconnect, Serve's cancellation of the
# request's receive call (TaskCancelledError, including Serve's RequestCancelledError) or of the task.
DISCONNECTS = (ClientDisconnect, TaskCancelledError)


class Gate:
    """Counters and limits of one ingress replica: requests uploading and requests admitted."""

    def __init__(self, limits: Limits, max_body: int) -> None:
        self.limits, self.max_body = limits, max_body
        self.uploading = 0
        self.inflight = 0

    async def read_body(self, receive: Receive, headers: dict[bytes, bytes]) -> bytes:
        """The whole body; 413 beyond ``max_body``, 408 past the deadline or without a free upload slot."""
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or len(declared) > 19):
            raise ApiError(400, "Content-Length is not a number")
        if declared is not None and int(declared) > self.max_body:
            raise ApiError(413, f"request body of {int(declared)} bytes exceeds the limit of {self.max_body} bytes")
        loop, chunks, total, slot = asyncio.get_running_loop(), [], 0, False
        start, pending = loop.time(), None
        try:
            while True:
                # One receive() at a time, kept across timeouts: a message is never lost to a cancellation.
                pending = pending or asyncio.ensure_future(receive())
                until = start + (self.limits.body_timeout_s if slot else self.limits.upload_grace_s)
                done, _ = await asyncio.wait({pending}, timeout=max(0.0, until - loop.time()))
                if not done and slot:
                    raise ApiError(408, f"the request body did not arrive within {self.limits.body_timeout_s:g} s "
                                        f"({total} bytes so far; limits.body_timeout_s)")
                if not done:
                    slot = self._upload_slot(total)
                    continue
                message, pending = pending.result(), None
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect()
                total += len(message.get("body", b""))
                if total > self.max_body:
                    raise ApiError(413, f"request body exceeds the limit of {self.max_body} bytes")
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    return b"".join(chunks)
        finally:
            self.uploading -= slot
            if pending is not None:
                pending.cancel()

    def _upload_slot(self, received: int) -> bool:
        """Take an upload slot for a body still arriving (True), or raise the 408 that ends it."""
        limits = self.limits
        if self.uploading >= limits.max_uploading:
            raise ApiError(408, f"the body is still arriving after {limits.upload_grace_s:g} s ({received} bytes "
                                f"so far) and {limits.max_uploading} slow uploads are in progress "
                                "(limits.max_uploading); send the body faster or retry later")
        self.uploading += 1
        return True

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one of ``max_inflight`` places while a fully-read request is worked on; 503 when none is free."""
        if self.inflight >= self.limits.max_inflight:
            raise ApiError(503, f"at capacity ({self.inflight} requests in flight); retry shortly",
                           {"Retry-After": str(self.limits.retry_after_s)})
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1


class _Reply:
    """The ``send`` of one request that remembers the status it started with."""

    def __init__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        self.scope, self.receive, self._send = scope, receive, send
        self.status, self.started = 500, False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status, self.started = message["status"], True
        await self._send(message)

    async def error(self, exc: ApiError) -> None:
        if self.started:  # too late for a JSON error: the client sees a cut response
            return
        await JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)(self.scope, self.receive, self.send)


def replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that returns the already-read body once, then the client's own messages (disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


class Guard:
    """ASGI middleware: see the module docstring. Finds the ingress at ``app.state.ingress``."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        ingress = scope["app"].state.ingress
        route, start = ingress.route_label(scope["path"]), time.perf_counter()
        reply = _Reply(scope, receive, send)
        try:
            if route.startswith("/v1/"):
                gate: Gate = ingress.gate
                body = await gate.read_body(receive, dict(scope["headers"]))
                with gate.admit():
                    await self.app(scope, replay(body, receive), reply.send)
            else:
                await self.app(scope, receive, reply.send)
        except ApiError as exc:
            await reply.error(exc)
        except (*DISCONNECTS, asyncio.CancelledError) as exc:
            reply.status = CLIENT_CLOSED
            logger.info("client closed %s %s after %.2f s (%s)", scope["method"], scope["path"],
                        time.perf_counter() - start, type(exc).__name__)
            if isinstance(exc, asyncio.CancelledError):
                raise
        except Exception:  # noqa: BLE001 - a bug must still give a JSON 500 and a metric, never a hang
            logger.exception("unhandled error on %s", scope["path"])
            await reply.error(ApiError(500, "internal error; the server log has the details"))
        finally:
            ingress.metrics.record(route, reply.status, time.perf_counter() - start)
