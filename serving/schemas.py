"""Request parameters of the HTTP API (pydantic), and their OpenAPI request-body documentation.

Every route takes a JSON object or a multipart form (images as files there, as base64 strings in JSON);
query parameters are accepted too. Unknown fields are refused (422) so a typo never passes silently.
Ranges that depend on configured limits (steps, n, alpha) are checked by the ingress, not here.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

IMAGE_DOC = "image: base64 string in JSON (a data: URL prefix is allowed) or a file in multipart; any size/mode"
SEED_DOC = "random seed (0 <= seed < 2^63); drawn when absent and returned in `seed` / the X-Seed header"
STEPS_DOC = "DDIM steps for inversion and decoding (default and maximum in GET /v1/model `limits`)"
Z_DOC = "semantic code: a JSON array of Z floats (in multipart: that array as a JSON string)"
X_T_DOC = "stochastic code: base64 of float32 little-endian [3,H,W], as /v1/encode returns it"


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    seed: int | None = Field(None, ge=0, le=2**63 - 1, description=SEED_DOC)

    @field_validator("z_sem", "edits", mode="before", check_fields=False)
    @classmethod
    def _json_in_forms(cls, value: Any) -> Any:
        # Multipart forms carry only strings: arrays and objects arrive JSON-encoded.
        if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                raise ValueError("is not valid JSON") from None
        return value


class ImageOut(Params):
    format: Literal["png", "json"] = Field(
        "png", description="`png`: the image itself (several images side by side in one row); "
                           "`json`: base64 PNG(s) plus the codes used")


class EncodeParams(Params):
    """POST /v1/encode -> {z_sem, seed[, x_T, x_T_shape, steps]}."""

    image: str | None = Field(None, description=IMAGE_DOC)
    steps: int | None = Field(None, description="also return the stochastic code x_T from DDIM inversion "
                                                "with this many steps (omit for z_sem only)")


class DecodeParams(ImageOut):
    """POST /v1/decode -> PNG of decode(x_T, z_sem)."""

    z_sem: list[float] | None = Field(None, description=Z_DOC)
    x_T: str | None = Field(None, description=X_T_DOC + "; absent: standard normal noise drawn from `seed`")
    steps: int | None = Field(None, description=STEPS_DOC)


class ReconstructParams(ImageOut):
    """POST /v1/reconstruct -> PNG of decode(invert(x), encode(x))."""

    image: str | None = Field(None, description=IMAGE_DOC)
    steps: int | None = Field(None, description=STEPS_DOC)


class ManipulateParams(ImageOut):
    """POST /v1/manipulate -> PNG of the image with z_sem moved along attribute direction(s)."""

    image: str | None = Field(None, description=IMAGE_DOC + " (or give z_sem and x_T instead)")
    z_sem: list[float] | None = Field(None, description=Z_DOC)
    x_T: str | None = Field(None, description=X_T_DOC)
    attribute: str | None = Field(None, description="attribute name (GET /v1/model `attributes`)")
    alpha: float | None = Field(None, description="step along the attribute, in [-max_alpha, max_alpha]")
    edits: dict[str, float] | None = Field(None, description="several attributes at once: {name: alpha}")
    steps: int | None = Field(None, description=STEPS_DOC)


class InterpolateParams(ImageOut):
    """POST /v1/interpolate -> n images from image_a to image_b (lerp z_sem, slerp x_T)."""

    image_a: str | None = Field(None, description=IMAGE_DOC)
    image_b: str | None = Field(None, description=IMAGE_DOC)
    n: int = Field(5, description="number of images, endpoints included (2 <= n <= max_n)")
    steps: int | None = Field(None, description=STEPS_DOC)


class SampleParams(ImageOut):
    """POST /v1/sample -> n new images (latent DDIM for z_sem, then image DDIM from noise)."""

    n: int = Field(1, description="number of images (1 <= n <= max_n)")
    steps: int | None = Field(None, description=STEPS_DOC)
    latent_steps: int | None = Field(None, description="DDIM steps of the latent DPM")


class ClassifyParams(Params):
    """POST /v1/classify -> {attributes: {name: {logit, probability}}, z_sem}."""

    image: str | None = Field(None, description=IMAGE_DOC + " (or give z_sem instead)")
    z_sem: list[float] | None = Field(None, description=Z_DOC)


def body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI ``requestBody`` for a route parsed by hand: the model as JSON and as multipart."""
    schema = model.model_json_schema()
    form = json.loads(json.dumps(schema))
    for name in list(form.get("properties", {})):
        if name.startswith("image"):
            form["properties"][name] = {"type": "string", "format": "binary", "description": IMAGE_DOC}
    return {"requestBody": {"required": False, "content": {
        "application/json": {"schema": schema},
        "multipart/form-data": {"schema": form},
    }}}


PNG_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}, "application/json": {}},
          "description": "a PNG (format=png) or JSON with base64 PNG(s) (format=json)"},
}
ERRORS_DOC: dict[int | str, dict[str, Any]] = {
    code: {"description": text, "content": {"application/json": {"example": {
        "error": kind, "status": code, "message": text}}}}
    for code, kind, text in [
        (400, "bad_request", "undecodable image or malformed body"),
        (401, "unauthorized", "missing or wrong API key (when keys are configured)"),
        (413, "too_large", "upload or decoded image larger than the limits"),
        (422, "invalid_parameter", "a parameter is missing, malformed or out of range"),
        (503, "overloaded", "at capacity: retry after the Retry-After header's seconds"),
    ]
}
