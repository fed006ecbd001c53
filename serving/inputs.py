"""Everything that touches untrusted request bytes: body size caps, JSON / multipart parsing, images,
latents and parameter ranges. Every failure becomes an :class:`ApiError` with a status and a message
(400 undecodable, 413 too large, 415 unsupported body, 422 bad parameter); nothing here raises a 500.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from diffae_core.images import load_image_tensor

IMAGE_FIELDS = ("image", "image_a", "image_b")
MAX_REPORTED_ERRORS = 5  # parameter errors listed in one 422 message
ERROR_KINDS = {
    400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "too_large",
    415: "unsupported_media_type", 422: "invalid_parameter", 500: "internal_error", 503: "overloaded",
}


class ApiError(Exception):
    """An HTTP error with a human-readable message; the ingress renders it as JSON."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": ERROR_KINDS.get(self.status, "error"), "status": self.status, "message": self.message}


@dataclass
class Payload:
    """A parsed request: parameters (query string, JSON members or form fields) and raw image bytes."""

    fields: dict[str, Any] = field(default_factory=dict)
    images: dict[str, bytes] = field(default_factory=dict)

    def image(self, name: str = "image") -> bytes:
        if name not in self.images:
            raise ApiError(422, f"missing field `{name}`: send an image as a multipart file named `{name}` "
                                f"or as base64 in a JSON member `{name}`")
        return self.images[name]


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refusing more than ``max_bytes`` (413) before and while reading it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "Content-Length is not a number")
        if int(declared) > max_bytes:
            raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {max_bytes} bytes")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise ApiError(413, f"request body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_payload(request: Request, max_body: int, max_image_bytes: int) -> Payload:
    """Parse a JSON object, multipart form or urlencoded form body (plus query parameters) into a Payload.

    Images come as multipart files or base64 strings (a ``data:`` URL prefix is allowed) in the fields
    of IMAGE_FIELDS; each may hold at most ``max_image_bytes`` decoded bytes.
    """
    body = await read_body(request, max_body)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    payload = Payload()
    if not body:
        pass  # all parameters from the query string (e.g. GET-like POST /v1/sample)
    elif kind == "application/json" or (not kind and body.lstrip()[:1] == b"{"):
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError(422, f"JSON body must be an object, got {type(data).__name__}")
        payload.fields = data
    elif kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        payload.fields = await _read_form(request, body, max_image_bytes, payload.images)
    else:
        raise ApiError(415, f"unsupported Content-Type {kind or '(none)'!r}: send application/json or "
                            "multipart/form-data")
    for name in IMAGE_FIELDS:
        value = payload.fields.pop(name, None)
        if value is not None:
            payload.images[name] = _b64_image(value, name, max_image_bytes)
    for key, value in request.query_params.items():
        payload.fields.setdefault(key, value)
    return payload


async def _read_form(request: Request, body: bytes, max_image_bytes: int, images: dict[str, bytes]) -> dict:
    sent = False

    async def replay() -> dict[str, Any]:  # hand the already size-checked body to Starlette's parser
        nonlocal sent
        if sent:
            return {"type": "http.request", "body": b"", "more_body": False}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=4, max_fields=32, max_part_size=len(body) + 1)
    except Exception as exc:  # noqa: BLE001 - the multipart parser raises various types on malformed input
        raise ApiError(400, f"malformed form body: {exc}") from None
    try:
        return await _form_fields(form, max_image_bytes, images)
    finally:
        await form.close()  # uploads are spooled to temporary files


async def _form_fields(form: Any, max_image_bytes: int, images: dict[str, bytes]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            data = await value.read()
            if key not in IMAGE_FIELDS:
                raise ApiError(422, f"unexpected file field `{key}`; images go in {list(IMAGE_FIELDS)}")
            if len(data) > max_image_bytes:
                raise ApiError(413, f"`{key}` has {len(data)} bytes, more than the limit of {max_image_bytes}")
            images[key] = data
        elif key in fields:
            raise ApiError(422, f"field `{key}` given more than once")
        else:
            fields[key] = value
    return fields


def _b64_image(value: Any, name: str, max_bytes: int) -> bytes:
    if not isinstance(value, str):
        raise ApiError(422, f"`{name}` must be a base64 string (or a multipart file), got {type(value).__name__}")
    text = value.split(",", 1)[1] if value.startswith("data:") else value
    if len(text) > 4 * math.ceil(max_bytes / 3) + 4:
        raise ApiError(413, f"`{name}` is larger than the limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"`{name}` is not valid base64") from None
    if len(data) > max_bytes:
        raise ApiError(413, f"`{name}` has {len(data)} bytes, more than the limit of {max_bytes}")
    return data


def load_image(data: bytes, size: int, max_pixels: int, name: str = "image") -> torch.Tensor:
    """Image bytes of any format and mode -> [3,size,size] float32 in [-1,1] (resize, centre crop).

    The pixel count is checked from the header before any pixel is decoded (decompression bombs: 413).
    """
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
    except Image.DecompressionBombError as exc:
        raise ApiError(413, f"`{name}` is too large: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - PIL's header parsers raise many types on hostile bytes
        raise ApiError(400, f"cannot decode `{name}` as an image: {exc}") from None
    if width * height > max_pixels:
        raise ApiError(413, f"`{name}` has {width}x{height} pixels, more than the limit of {max_pixels}")
    try:
        return load_image_tensor(data, size, max_pixels)
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt pixel data fails in many ways
        raise ApiError(400, f"cannot decode `{name}` as an image: {exc}") from None


def validate(model: type, fields: dict[str, Any]) -> Any:
    """``model.model_validate(fields)`` with pydantic's errors turned into one 422 message."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        errors, parts = exc.errors(), []
        for err in errors[:MAX_REPORTED_ERRORS]:
            where = ".".join(str(p) for p in err["loc"]) or "body"
            if err["type"] == "extra_forbidden":
                parts.append(f"unknown field `{where}`")
            else:
                parts.append(f"`{where}`: {err['msg']} (got {err.get('input')!r})"[:300])
        if len(errors) > MAX_REPORTED_ERRORS:  # e.g. 512 bad numbers in a z_sem: the message stays short
            parts.append(f"and {len(errors) - MAX_REPORTED_ERRORS} more errors")
        raise ApiError(422, "; ".join(parts)) from None


def check_range(name: str, value: int | float, low: int | float, high: int | float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
        raise ApiError(422, f"`{name}` must be in [{low}, {high}], got {value!r}")


def parse_z(values: list[float] | None, z_dim: int, name: str = "z_sem") -> np.ndarray:
    """A JSON array of Z finite floats -> float32 [Z]."""
    if values is None:
        raise ApiError(422, f"missing field `{name}`")
    z = np.asarray(values, dtype=np.float32)
    if z.shape != (z_dim,):
        raise ApiError(422, f"`{name}` must hold {z_dim} numbers, got {len(values)}")
    if not np.isfinite(z).all():
        raise ApiError(422, f"`{name}` must be finite (a float32 overflowed or NaN was given)")
    return z


def parse_x_T(text: str | None, size: int, name: str = "x_T") -> np.ndarray:
    """base64 of float32 little-endian [3,size,size] (as /v1/encode returns it) -> float32 array."""
    if text is None:
        raise ApiError(422, f"missing field `{name}`")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"`{name}` is not valid base64") from None
    expected = 3 * size * size * 4
    if len(raw) != expected:
        raise ApiError(422, f"`{name}` must be {expected} bytes (float32 [3,{size},{size}]), got {len(raw)}")
    x = np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(3, size, size)
    if not np.isfinite(x).all():
        raise ApiError(422, f"`{name}` holds NaN or inf")
    return x


def encode_x_T(x: np.ndarray) -> str:
    """float32 [3,H,W] -> base64 of its little-endian bytes."""
    return base64.b64encode(np.ascontiguousarray(x, dtype="<f4").tobytes()).decode()
