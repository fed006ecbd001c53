"""JSON and text-field parsing that cannot raise anything but an :class:`ApiError` (400/413/422).

``json.loads`` alone fails in ways a JSON error handler does not catch: deep nesting raises
RecursionError, an integer with more than 4300 digits raises ValueError, and ``NaN`` / ``Infinity``
literals pass as floats. :func:`loads` checks the nesting depth before parsing (a linear scan in C and
NumPy, so a 10 MB body costs milliseconds), caps integer digits while parsing and refuses the
non-standard constants. Form and query values (always text) go through :func:`parse_int` /
:func:`parse_float` with the same caps.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from .errors import ApiError

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)  # JSON strings: their brackets do not nest
_OPEN, _CLOSE = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)
_INT_TEXT = re.compile(r"[+-]?\d+")
_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON text (brackets inside strings do not count)."""
    codes = np.frombuffer(_STRING.sub(b'""', data), np.uint8)
    steps = np.isin(codes, _OPEN).astype(np.int32) - np.isin(codes, _CLOSE).astype(np.int32)
    return int(np.cumsum(steps).max(initial=0))


def loads(data: bytes | str, max_depth: int, max_int_digits: int, where: str = "body") -> Any:
    """Parse JSON text with the depth and integer-size caps above; any failure is a 400 or 422 ApiError."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    depth = json_depth(raw)
    if depth > max_depth:
        raise ApiError(422, f"{where} nests JSON {depth} levels deep, more than the limit of {max_depth} "
                            "(limits.max_json_depth)")

    def parse_int(text: str) -> int:
        if len(text.lstrip("-")) > max_int_digits:
            raise ApiError(422, f"{where} holds an integer of {len(text.lstrip('-'))} digits, more than the "
                                f"limit of {max_int_digits} (limits.max_int_digits)")
        return int(text)

    def finite_float(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):  # 1e999 parses as inf
            raise ApiError(422, f"{where} holds {_quote(text)}, beyond the float range: numbers must be finite")
        return value

    def no_constant(name: str) -> float:
        raise ApiError(422, f"{where} holds {name}, which is not JSON: numbers must be finite")

    try:
        return json.loads(raw, parse_int=parse_int, parse_float=finite_float, parse_constant=no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"{where} is not valid JSON: {exc}") from None
    except RecursionError:  # belt and braces: the depth scan above should make this unreachable
        raise ApiError(422, f"{where} nests JSON too deeply (limits.max_json_depth)") from None


def parse_int(text: str, name: str, max_digits: int) -> int:
    """A form or query value -> int: optional sign and decimal digits only, at most ``max_digits`` of them."""
    text = text.strip()
    if not _INT_TEXT.fullmatch(text):
        raise ApiError(422, f"`{name}` must be an integer, got {_quote(text)}")
    if len(text.lstrip("+-")) > max_digits:
        raise ApiError(422, f"`{name}` has {len(text.lstrip('+-'))} digits, more than the limit of {max_digits} "
                            "(limits.max_int_digits)")
    return int(text)


def parse_float(text: str, name: str) -> float:
    """A form or query value -> finite float (decimal notation; no nan, inf or hex)."""
    text = text.strip()
    value = float(text) if _FLOAT_TEXT.fullmatch(text) and len(text) <= 400 else math.nan
    if not math.isfinite(value):
        raise ApiError(422, f"`{name}` must be a finite number, got {_quote(text)}")
    return value


def _quote(text: str, limit: int = 40) -> str:
    """A short, safe rendering of a client's value for an error message."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def describe(value: Any) -> str:
    """A client's value in an error message: JSON types by name, scalars shortened, never a Python repr."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        text = str(value)
        return text if len(text) <= 40 else f"a number of {len(text)} characters"
    if isinstance(value, str):
        return _quote(value)
    return {list: "an array", dict: "an object"}.get(type(value), "a value of another type")
