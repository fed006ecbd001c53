"""The OpenAPI document of the ingress, stating what the server enforces under its configured limits.

The request bodies are parsed by hand (JSON or multipart, see serving/inputs.py), so FastAPI cannot infer
them; :func:`install` makes ``/openapi.json`` describe them from the pydantic models in serving/schemas.py
plus the running model's size and the configured limits: every range, which fields are required (JSON
``anyOf`` where alternatives exist), no nullable fields, and working examples.
"""

from __future__ import annotations

import base64
import copy
from typing import Any

from fastapi import FastAPI

from . import schemas as S
from .settings import Limits

BODY_MODELS: dict[str, type[S.Params]] = {
    "/v1/encode": S.EncodeParams, "/v1/decode": S.DecodeParams, "/v1/reconstruct": S.ReconstructParams,
    "/v1/manipulate": S.ManipulateParams, "/v1/interpolate": S.InterpolateParams, "/v1/sample": S.SampleParams,
    "/v1/classify": S.ClassifyParams,
}
# A 1x1 grey PNG: the smallest image that exercises the whole path in examples.
TINY_PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNoAAAAggCBd81ytgAAAABJRU5ErkJggg==")
ERROR_SCHEMA = {"type": "object", "required": ["error", "status", "message"], "properties": {
    "error": {"type": "string"}, "status": {"type": "integer"}, "message": {"type": "string"}}}
ERRORS = [
    (400, "bad_request", "undecodable image or malformed body"),
    (401, "unauthorized", "missing or wrong API key (when keys are configured)"),
    (404, "not_found", "the model has no classifier / latent DPM for this route"),
    (408, "request_timeout", "the body did not arrive within limits.body_timeout_s (or too many slow uploads)"),
    (413, "too_large", "upload, body or image (pixels, sides, aspect ratio, resize) larger than the limits"),
    (415, "unsupported_media_type", "send application/json or multipart/form-data"),
    (422, "invalid_parameter", "a parameter is missing, malformed, out of range or gives a non-finite result"),
    (503, "overloaded", "at capacity: retry after the Retry-After header's seconds"),
]
ERRORS_DOC: dict[int | str, dict[str, Any]] = {
    code: {"description": text, "content": {"application/json": {"schema": ERROR_SCHEMA, "example": {
        "error": kind, "status": code, "message": text}}}}
    for code, kind, text in ERRORS
}
PNG_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}},
                      "application/json": {"schema": {"type": "object"}}},
          "description": "a PNG (format=png) or JSON with base64 PNG(s) (format=json)"},
}


def install(app: FastAPI, limits: Limits, size: int, z_dim: int, attributes: list[str]) -> None:
    """Make ``app.openapi()`` (served at /openapi.json) describe the request bodies under these limits
    (``attributes``: the classifier's names, for the examples)."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = FastAPI.openapi(app)
            for path, model in BODY_MODELS.items():
                document["paths"][path]["post"]["requestBody"] = request_body(model, limits, size, z_dim, attributes)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise the schema


def request_body(model: type[S.Params], limits: Limits, size: int, z_dim: int, attributes: list[str]
                 ) -> dict[str, Any]:
    """The ``requestBody`` of one route: the model as JSON and as multipart."""
    schema = _json_schema(model, limits, size, z_dim)
    schema["example"] = _example(model, size, z_dim, attributes)
    form = copy.deepcopy(schema)
    for name, prop in form["properties"].items():
        if name.startswith("image"):
            form["properties"][name] = {"type": "string", "format": "binary", "description": prop["description"]}
        elif prop.get("type") in ("array", "object"):  # JSON text in a form field
            form["properties"][name] = {"type": "string", "contentMediaType": "application/json",
                                        "description": prop["description"]}
    form.pop("example", None)
    return {"required": bool(model.requires), "content": {"application/json": {"schema": schema},
                                                          "multipart/form-data": {"schema": form}}}


def _json_schema(model: type[S.Params], limits: Limits, size: int, z_dim: int) -> dict[str, Any]:
    schema = model.model_json_schema()
    schema.pop("title", None)
    bounds = S.ranges(model, limits)
    for name, prop in schema["properties"].items():
        prop.update(_non_null(prop))
        prop.pop("title", None)
        if name in bounds:
            prop["minimum"], prop["maximum"] = bounds[name]
            prop["description"] += f" ({bounds[name][0]} to {bounds[name][1]})"
    codes = _codes(limits, size, z_dim)
    for name in set(codes) & set(schema["properties"]):
        schema["properties"][name].update(codes[name])
    if "edits" in schema["properties"]:
        schema["properties"]["edits"]["additionalProperties"].update(
            {"minimum": -limits.max_alpha, "maximum": limits.max_alpha})
        schema["properties"]["edits"]["minProperties"] = 1
    groups = [{"anyOf": [{"required": list(fields)} for fields in group]} for group in model.requires]
    if groups:
        schema["allOf"] = groups
    return schema


def _non_null(prop: dict[str, Any]) -> dict[str, Any]:
    """pydantic writes ``X | None = None`` as anyOf [X, null] with default null: keep X only."""
    alternatives = [p for p in prop.pop("anyOf", []) if p.get("type") != "null"]
    if prop.get("default", 0) is None:
        prop.pop("default")
    return alternatives[0] if len(alternatives) == 1 else {}


def _codes(limits: Limits, size: int, z_dim: int) -> dict[str, dict[str, Any]]:
    """Exact shapes, ranges and encodings of the images and latent codes for this model."""
    x_T_chars = 4 * -(-3 * size * size * 4 // 3)
    bound = {"minimum": -limits.max_latent_abs, "maximum": limits.max_latent_abs}
    image = {"contentEncoding": "base64", "minLength": 1,
             "maxLength": 4 * -(-limits.max_upload_bytes // 3) + 64}
    return {
        "z_sem": {"minItems": z_dim, "maxItems": z_dim, "items": {"type": "number", **bound},
                  "description": f"{S.Z_DOC}; z_dim = {z_dim}, each in [-{limits.max_latent_abs}, "
                                 f"{limits.max_latent_abs}] (limits.max_latent_abs)"},
        "x_T": {"minLength": x_T_chars, "maxLength": x_T_chars, "pattern": "^[A-Za-z0-9+/]*={0,2}$",
                "contentEncoding": "base64",
                "description": f"{S.X_T_DOC}: [3,{size},{size}], {x_T_chars} characters, each value in "
                               f"[-{limits.max_latent_abs}, {limits.max_latent_abs}]"},
        "image": image, "image_a": image, "image_b": image,
    }


def _example(model: type[S.Params], size: int, z_dim: int, attributes: list[str]) -> dict[str, Any]:
    png = base64.b64encode(TINY_PNG).decode()
    values = {"image": png, "image_a": png, "image_b": png, "z_sem": [0.0] * z_dim,
              "x_T": base64.b64encode(bytes(3 * size * size * 4)).decode(), "steps": 2, "latent_steps": 2,
              "n": max(2, model.n_min), "seed": 0, "format": "json"}
    example = {name: values[name] for name in model.model_fields if name in values}
    if "attribute" in model.model_fields:
        example.pop("z_sem"), example.pop("x_T")
        example.update({"attribute": attributes[0], "alpha": 0.3} if attributes else {})
    return example
