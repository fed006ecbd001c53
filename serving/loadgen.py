"""A bounded closed-loop HTTP load for a running app: C clients, each sending its next request when its last one
was answered, until a request count or a time limit is reached (both always bounded).

    python -m serving.loadgen http://127.0.0.1:8000 --route /v1/reconstruct --image face.png --steps 10 \\
        --concurrency 8 --seconds 30

Every request is recorded (start, end, status, Retry-After), so a run shows throughput and latency and also
*when* requests failed: the benchmarks and the scale-out tests read the timeline around a node loss or an
autoscaling step from it. Only send it to servers you run.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass(frozen=True)
class Sample:
    """One request: when it started and ended (time.time()), its status (0: no answer) and Retry-After."""

    start: float
    end: float
    status: int
    retry_after: str | None = None


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@dataclass
class ClosedLoop:
    """The load: ``start()`` it, ``stop()`` it (or let the bounds end it), then read ``samples``."""

    url: str
    path: str
    body: dict[str, Any]
    concurrency: int = 4
    max_requests: int = 10_000
    max_seconds: float = 300.0
    timeout_s: float = 120.0
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._sent = 0

    def _take_ticket(self) -> bool:
        with self._lock:
            if self._stop.is_set() or self._sent >= self.max_requests:
                return False
            self._sent += 1
            return True

    def _client(self, deadline: float) -> None:
        with httpx.Client(base_url=self.url, timeout=self.timeout_s) as client:
            while time.time() < deadline and self._take_ticket():
                start = time.time()
                try:
                    reply = client.post(self.path, json=self.body)
                    sample = Sample(start, time.time(), reply.status_code, reply.headers.get("retry-after"))
                except httpx.HTTPError:
                    sample = Sample(start, time.time(), 0)
                with self._lock:
                    self.samples.append(sample)

    def start(self) -> ClosedLoop:
        deadline = time.time() + self.max_seconds
        self._threads = [threading.Thread(target=self._client, args=(deadline,), daemon=True)
                         for _ in range(self.concurrency)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> list[Sample]:
        """Stop sending; wait for the requests in flight; the samples in start order."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout_s + 5)
        return sorted(self.samples, key=lambda s: s.start)

    def run(self) -> list[Sample]:
        """Start and wait until the bounds end the load."""
        self.start()
        for thread in self._threads:
            thread.join()
        return sorted(self.samples, key=lambda s: s.start)


def summary(samples: Sequence[Sample]) -> dict[str, Any]:
    """Requests/s of the successful requests over the run's span, latency percentiles (ms), status counts."""
    ok = [s for s in samples if s.status == 200]
    span = max((s.end for s in samples), default=0) - min((s.start for s in samples), default=0)
    latencies = [1000 * (s.end - s.start) for s in ok]
    out: dict[str, Any] = {"requests": len(samples), "rps": len(ok) / span if span > 0 else 0.0,
                           "codes": dict(Counter(s.status for s in samples))}
    if latencies:
        out.update(p50=statistics.median(latencies), p95=percentile(latencies, 95), p99=percentile(latencies, 99))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url", help="base URL of the app, e.g. http://127.0.0.1:8000")
    p.add_argument("--route", default="/v1/reconstruct")
    p.add_argument("--image", help="image file sent as `image` (base64 JSON)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--requests", type=int, default=200, help="at most this many requests")
    p.add_argument("--seconds", type=float, default=60.0, help="at most this long")
    args = p.parse_args(argv)
    body: dict[str, Any] = {"steps": args.steps, "seed": 0}
    if args.image:
        with open(args.image, "rb") as f:
            body["image"] = base64.b64encode(f.read()).decode()
    samples = ClosedLoop(args.url, args.route, body, args.concurrency, args.requests, args.seconds).run()
    print(json.dumps(summary(samples)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
