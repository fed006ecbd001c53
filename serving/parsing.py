"""JSON and text-field parsing that cannot raise anything but an :class:`ApiError` (400/413/422).

``json.loads`` alone fails in ways a JSON error handler does not catch: deep nesting raises
RecursionError, an integer with more than 4300 digits raises ValueError, and ``NaN`` / ``Infinity``
literals pass as floats. :func:`loads` checks nesting depth, object count and integer digits before
parsing (scans in C and NumPy), refuses the non-standard constants and repeated keys. Form and query
values (always text) go through :func:`parse_int` / :func:`parse_float` with the same caps.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from .errors import ApiError

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)  # JSON strings: their brackets do not nest
_NESTING = np.zeros(256, np.int8)  # +1 for each byte that opens an array or object, -1 for each that closes one
_NESTING[list(b"[{")], _NESTING[list(b"]}")] = 1, -1
_INT_TEXT = re.compile(r"[+-]?\d+")
MAX_JSON_OBJECTS = 64  # the API's bodies hold at most two (the body, `edits`)
_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _scan(bare: bytes) -> tuple[int, int]:
    """(nesting depth, number of objects) of JSON text whose strings were emptied."""
    codes = np.frombuffer(bare, np.uint8)
    depth = np.cumsum(_NESTING[codes], dtype=np.int32).max(initial=0)
    return int(depth), bare.count(b"{")


def loads(data: bytes | str, max_depth: int, max_int_digits: int, where: str = "body") -> Any:
    """Parse JSON text with the caps above; any failure is a 400 or 422 ApiError. The checks are scans in
    C and NumPy (no Python call per number), so a body of millions of numbers costs what json.loads does."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    bare = _STRING.sub(b'""', raw)
    depth, objects = _scan(bare)
    if depth > max_depth:
        raise ApiError(422, f"{where} nests JSON {depth} levels deep, more than the limit of {max_depth} "
                            "(limits.max_json_depth)")
    if objects > MAX_JSON_OBJECTS:
        raise ApiError(422, f"{where} holds {objects} JSON objects; the API takes at most {MAX_JSON_OBJECTS}")
    long_int = re.search(rb"(?<![\d.eE+-])-?\d{%d,}(?![\d.eE])" % (max_int_digits + 1), bare)
    if long_int:
        digits = len(long_int.group().lstrip(b"-"))
        raise ApiError(422, f"{where} holds an integer of {digits} digits, more than the limit of "
                            f"{max_int_digits} (limits.max_int_digits)")

    def no_constant(name: str) -> float:
        raise ApiError(422, f"{where} holds {name}, which is not JSON: numbers must be finite")

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) < len(pairs):  # json.loads would keep the last silently
            twice = next(key for i, (key, _) in enumerate(pairs) if key in dict(pairs[:i]))
            raise ApiError(422, f"{where}: field `{twice[:60]}` given more than once")
        return obj

    try:  # 1e999 parses as inf: the schemas' finite-number types refuse it with the field's name
        return json.loads(raw, parse_constant=no_constant, object_pairs_hook=unique_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"{where} is not valid JSON: {exc}") from None
    except (RecursionError, ValueError):  # belt and braces: the scans above should make these unreachable
        raise ApiError(422, f"{where} holds JSON this server does not parse (limits.max_json_depth, "
                            "limits.max_int_digits)") from None


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
