"""Everything that touches untrusted request bytes after the gate (serving/guard.py) has read the body:
JSON / multipart parsing, images, latents and parameter ranges. Every failure becomes an :class:`ApiError`
with a status and a message (400 undecodable, 413 too large, 415 unsupported body, 422 bad parameter);
nothing here raises a 500, and no message shows a Python repr.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from diffae_core.images import load_image_tensor

from .errors import ApiError
from .parsing import describe, loads
from .schemas import Params, missing, ranges
from .settings import Limits

IMAGE_FIELDS = ("image", "image_a", "image_b")
MAX_REPORTED_ERRORS = 5  # parameter errors listed in one 422 message
_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")  # "<_io.BytesIO object at 0x7f...>" in library messages


def clean(exc: BaseException, limit: int = 200) -> str:
    """A library's exception message fit for a client: no object reprs (heap addresses), bounded length."""
    return _REPR.sub("the data", str(exc) or type(exc).__name__)[:limit]


@dataclass
class Payload:
    """A parsed request: parameters (query string, JSON members or form fields), the names of those that
    came as text (form and query values, parsed from text by the schemas) and raw image bytes."""

    fields: dict[str, Any] = field(default_factory=dict)
    images: dict[str, bytes] = field(default_factory=dict)
    text: set[str] = field(default_factory=set)

    def image(self, name: str = "image") -> bytes:
        if name not in self.images:
            raise ApiError(422, f"missing field `{name}`: send an image as a multipart file named `{name}` "
                                f"or as base64 in a JSON member `{name}`")
        return self.images[name]


async def read_payload(request: Request, limits: Limits) -> Payload:
    """Parse a JSON object, multipart form or urlencoded form body (plus query parameters) into a Payload.

    Images come as multipart files or base64 strings (a ``data:`` URL prefix is allowed) in the fields
    of IMAGE_FIELDS; each may hold at most ``limits.max_upload_bytes`` decoded bytes. A field given twice
    (in the body, or in the body and the query string) is a 422.
    """
    body = await request.body()  # already read, size-checked and replayed by the gate
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    payload = Payload()
    if not body:
        pass  # all parameters from the query string (e.g. GET-like POST /v1/sample)
    elif kind == "application/json" or (not kind and body.lstrip()[:1] == b"{"):
        # A big body parses in a thread: the event loop keeps serving other requests meanwhile.
        parse = asyncio.to_thread if len(body) > 2**20 else _call
        data = await parse(loads, body, limits.max_json_depth, limits.max_int_digits)
        if not isinstance(data, dict):
            raise ApiError(422, f"JSON body must be an object, got {describe(data)}")
        payload.fields = data
    elif kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        await _read_form(request, body, limits.max_upload_bytes, payload)
    else:
        raise ApiError(415, f"unsupported Content-Type {kind[:60] or '(none)'!r}: send application/json or "
                            "multipart/form-data")
    for key, value in request.query_params.multi_items():
        if key in payload.fields or key in payload.images:
            raise ApiError(422, f"field `{key[:60]}` given more than once")
        payload.fields[key] = value
        payload.text.add(key)
    for name in IMAGE_FIELDS:
        value = payload.fields.pop(name, None)
        if value is not None:
            payload.images[name] = _b64_image(value, name, limits.max_upload_bytes)
    return payload


async def _call(fn: Any, *args: Any) -> Any:
    return fn(*args)


async def _read_form(request: Request, body: bytes, max_image_bytes: int, payload: Payload) -> None:
    async def replay() -> dict[str, Any]:  # hand the already size-checked body to Starlette's parser
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=4, max_fields=32, max_part_size=len(body) + 1)
    except Exception as exc:  # noqa: BLE001 - the multipart parser raises various types on malformed input
        raise ApiError(400, f"malformed form body: {clean(exc)}") from None
    try:
        await _form_fields(form, max_image_bytes, payload)
    finally:
        await form.close()  # uploads are spooled to temporary files


async def _form_fields(form: Any, max_image_bytes: int, payload: Payload) -> None:
    for key, value in form.multi_items():
        if key in payload.fields or key in payload.images:  # a second `image` must never replace the first
            raise ApiError(422, f"field `{key[:60]}` given more than once")
        if isinstance(value, UploadFile):
            if key not in IMAGE_FIELDS:
                raise ApiError(422, f"unexpected file field `{key[:60]}`; images go in {list(IMAGE_FIELDS)}")
            data = await value.read(max_image_bytes + 1)
            if len(data) > max_image_bytes:
                raise ApiError(413, f"`{key}` has more than the limit of {max_image_bytes} bytes "
                                    "(limits.max_upload_bytes)")
            payload.images[key] = data
        else:
            payload.fields[key] = value
            payload.text.add(key)


def _b64_image(value: Any, name: str, max_bytes: int) -> bytes:
    if not isinstance(value, str):
        raise ApiError(422, f"`{name}` must be a base64 string (or a multipart file), got {describe(value)}")
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


def image_size_check(width: int, height: int, size: int, limits: Limits, name: str = "image") -> None:
    """Refuse (413) an image whose header says it is too big for any limit, before a pixel is decoded:
    each side, the pixel count, the aspect ratio, and the image the resize to ``size`` would produce."""
    short, long = min(width, height), max(width, height)
    if long > limits.max_side:
        raise ApiError(413, f"`{name}` is {width}x{height}: a side exceeds the limit of {limits.max_side} "
                            "pixels (limits.max_side)")
    if width * height > limits.max_pixels:
        raise ApiError(413, f"`{name}` has {width}x{height} pixels, more than the limit of {limits.max_pixels} "
                            "(limits.max_pixels)")
    if short < 1 or long / short > limits.max_aspect_ratio:
        raise ApiError(413, f"`{name}` is {width}x{height}: its aspect ratio exceeds the limit of "
                            f"{limits.max_aspect_ratio:g} (limits.max_aspect_ratio)")
    # diffae_core.images.resize_center_crop resizes the shorter side to `size` before cropping.
    resized = size * max(size, round(long * size / short))
    if resized > limits.max_resize_pixels:
        raise ApiError(413, f"`{name}` is {width}x{height}: resizing it to {size} px would make {resized} "
                            f"pixels, more than the limit of {limits.max_resize_pixels} (limits.max_resize_pixels)")


def load_image(data: bytes, size: int, limits: Limits, name: str = "image") -> torch.Tensor:
    """Image bytes of any format and mode -> [3,size,size] float32 in [-1,1] (resize, centre crop).

    The header is read first and checked by :func:`image_size_check` (413) before any pixel is decoded.
    """
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
    except Image.DecompressionBombError:
        raise ApiError(413, f"`{name}` is too large to decode (limits.max_pixels)") from None
    except UnidentifiedImageError:
        raise ApiError(400, f"cannot decode `{name}`: not an image in a format this server reads "
                            "(PNG, JPEG, WebP, GIF, BMP, TIFF, ...)") from None
    except Exception as exc:  # noqa: BLE001 - PIL's header parsers raise many types on hostile bytes
        raise ApiError(400, f"cannot decode `{name}` as an image: {clean(exc)}") from None
    image_size_check(width, height, size, limits, name)
    try:
        return load_image_tensor(data, size, limits.max_pixels)
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt pixel data fails in many ways
        raise ApiError(400, f"cannot decode `{name}` as an image: {clean(exc)}") from None


def validate(model: type[Params], payload: Payload, limits: Limits) -> Any:
    """The request's parameters as ``model``: pydantic's errors, missing fields and out-of-range values
    all become one 422 message (ranges from ``schemas.ranges``, the table the OpenAPI schema states)."""
    lacking = missing(model, set(payload.fields) | set(payload.images))
    try:
        params = model.model_validate(payload.fields, context={"text": payload.text, "limits": limits})
    except ValidationError as exc:
        raise ApiError(422, _validation_message(exc)) from None
    if lacking:
        raise ApiError(422, lacking)
    for name, (low, high) in ranges(model, limits).items():
        value = getattr(params, name)
        if value is not None:
            check_range(name, value, low, high)
    return params


def _validation_message(exc: ValidationError) -> str:
    errors, parts = exc.errors(), []
    for err in errors[:MAX_REPORTED_ERRORS]:
        where = ".".join(str(p)[:60] for p in err["loc"]) or "body"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown field `{where}`")
        else:
            parts.append(f"`{where}`: {err['msg']} (got {describe(err.get('input'))})"[:300])
    if len(errors) > MAX_REPORTED_ERRORS:  # e.g. 512 bad numbers in a z_sem: the message stays short
        parts.append(f"and {len(errors) - MAX_REPORTED_ERRORS} more errors")
    return "; ".join(parts)


def check_range(name: str, value: int | float, low: int | float, high: int | float) -> None:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value)
                                       and low <= value <= high):
        raise ApiError(422, f"`{name}` must be in [{low}, {high}], got {describe(value)}")


def parse_z(values: list[float] | None, z_dim: int, max_abs: float, name: str = "z_sem") -> np.ndarray:
    """A JSON array of z_dim floats, each within ``max_abs`` (limits.max_latent_abs) -> float32 [Z]."""
    if values is None:
        raise ApiError(422, f"missing field `{name}`")
    z = np.asarray(values, dtype=np.float64)
    if z.shape != (z_dim,):
        raise ApiError(422, f"`{name}` must hold {z_dim} numbers, got {len(values)}")
    _check_abs(z, max_abs, name)
    return z.astype(np.float32)


def parse_x_T(text: str | None, size: int, max_abs: float, name: str = "x_T") -> np.ndarray:
    """base64 of float32 little-endian [3,size,size] (as /v1/encode returns it), each value within
    ``max_abs`` -> float32 array."""
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
    _check_abs(x, max_abs, name)
    return x


def _check_abs(x: np.ndarray, max_abs: float, name: str) -> None:
    # Finite is not enough: values near float32's maximum overflow in the first layer downstream.
    if not (np.isfinite(x).all() and np.abs(x).max(initial=0) <= max_abs):
        raise ApiError(422, f"`{name}` must hold finite numbers in [-{max_abs:g}, {max_abs:g}] "
                            "(limits.max_latent_abs)")


def encode_x_T(x: np.ndarray) -> str:
    """float32 [3,H,W] -> base64 of its little-endian bytes."""
    return base64.b64encode(np.ascontiguousarray(x, dtype="<f4").tobytes()).decode()
