"""Request parameters of the HTTP API (pydantic): strict types, the ranges the server enforces and the
fields each route needs, in one place that both validation and the OpenAPI schema (serving/openapi.py) read.

Every route takes a JSON object or a multipart form (images as files there, as base64 strings in JSON);
query parameters are accepted too. Unknown fields are refused (422) so a typo never passes silently. Types
are strict: JSON ``true`` is not an integer and ``"5"`` is not a number; only form and query values, which
are always text, are parsed from text (by ``serving.parsing``, with the same size caps as JSON).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationInfo, model_validator

from .parsing import loads, parse_float, parse_int
from .settings import Limits

IMAGE_DOC = "image: base64 string in JSON (a data: URL prefix is allowed) or a file in multipart; any format/mode"
SEED_DOC = "random seed; drawn when absent and returned in `seed` / the X-Seed header"
STEPS_DOC = "DDIM steps for inversion and decoding (default in GET /v1/model `limits.default_steps`)"
Z_DOC = "semantic code: a JSON array of z_dim finite floats (in multipart: that array as a JSON string)"
X_T_DOC = "stochastic code: base64 of float32 little-endian [3,H,W], as /v1/encode returns it"
MAX_SEED = 2**63 - 1


def _text(info: ValidationInfo) -> Limits | None:
    """The limits when this field's value came as text (a form or query value), else None."""
    context = info.context or {}
    return context.get("limits") if info.field_name in context.get("text", ()) else None


def _int(value: Any, info: ValidationInfo) -> Any:
    limits = _text(info)
    return parse_int(value, info.field_name, limits.max_int_digits) if limits and isinstance(value, str) else value


def _float(value: Any, info: ValidationInfo) -> Any:
    return parse_float(value, info.field_name) if _text(info) and isinstance(value, str) else value


def _json(value: Any, info: ValidationInfo) -> Any:
    # Multipart forms carry only strings: arrays and objects arrive JSON-encoded.
    limits = _text(info)
    if limits and isinstance(value, str):
        return loads(value, limits.max_json_depth, limits.max_int_digits, f"`{info.field_name}`")
    return value


Integer = Annotated[int, Strict(), BeforeValidator(_int)]
Number = Annotated[float, Strict()]  # JSON numbers only: no booleans, no strings, finite (allow_inf_nan)
TextNumber = Annotated[float, Strict(), BeforeValidator(_float)]
Steps = Field(None, description=STEPS_DOC, examples=[10])


class Params(BaseModel):
    """Base of every route's parameters. ``requires`` lists groups of alternatives: each group needs one
    alternative whose fields are all present (``((("image",), ("z_sem", "x_T")),)``: image, or both codes)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    requires: ClassVar[tuple[tuple[tuple[str, ...], ...], ...]] = ()
    n_min: ClassVar[int] = 1

    seed: Integer | None = Field(None, ge=0, le=MAX_SEED, description=SEED_DOC, examples=[0])

    @model_validator(mode="before")
    @classmethod
    def _no_nulls(cls, data: Any) -> Any:
        # The schema does not make fields nullable (a form field cannot be null): omit a field for its default.
        if isinstance(data, dict):
            for key, value in data.items():
                if value is None:
                    raise ValueError(f"`{key}` is null: omit the field to get its default")
        return data


class ImageOut(Params):
    format: Literal["png", "json"] = Field(
        "png", description="`png`: the image itself (several images side by side in one row); "
                           "`json`: base64 PNG(s) plus the codes used")


class EncodeParams(Params):
    """POST /v1/encode -> {z_sem, seed[, x_T, x_T_shape, steps]}."""

    requires = ((("image",),),)
    image: str | None = Field(None, description=IMAGE_DOC)
    steps: Integer | None = Field(None, description="also return the stochastic code x_T from DDIM inversion "
                                                    "with this many steps (omit for z_sem only)", examples=[10])


class DecodeParams(ImageOut):
    """POST /v1/decode -> PNG of decode(x_T, z_sem)."""

    requires = ((("z_sem",),),)
    z_sem: Annotated[list[Number], BeforeValidator(_json)] | None = Field(None, description=Z_DOC)
    x_T: str | None = Field(None, description=X_T_DOC + "; absent: standard normal noise drawn from `seed`")
    steps: Integer | None = Steps


class ReconstructParams(ImageOut):
    """POST /v1/reconstruct -> PNG of decode(invert(x), encode(x))."""

    requires = ((("image",),),)
    image: str | None = Field(None, description=IMAGE_DOC)
    steps: Integer | None = Steps


class ManipulateParams(ImageOut):
    """POST /v1/manipulate -> PNG of the image with z_sem moved along attribute direction(s)."""

    requires = ((("image",), ("z_sem", "x_T")), (("attribute", "alpha"), ("edits",)))
    image: str | None = Field(None, description=IMAGE_DOC + " (or give z_sem and x_T instead)")
    z_sem: Annotated[list[Number], BeforeValidator(_json)] | None = Field(None, description=Z_DOC)
    x_T: str | None = Field(None, description=X_T_DOC)
    attribute: str | None = Field(None, description="attribute name (GET /v1/model `attributes`)")
    alpha: TextNumber | None = Field(None, description="step along the attribute", examples=[0.3])
    edits: Annotated[dict[str, Number], BeforeValidator(_json)] | None = Field(
        None, description="several attributes at once: {name: alpha} (in multipart: as a JSON string)")
    steps: Integer | None = Steps


class InterpolateParams(ImageOut):
    """POST /v1/interpolate -> n images from image_a to image_b (lerp z_sem, slerp x_T)."""

    requires = ((("image_a",),), (("image_b",),))
    n_min = 2
    image_a: str | None = Field(None, description=IMAGE_DOC)
    image_b: str | None = Field(None, description=IMAGE_DOC)
    n: Integer = Field(5, description="number of images, endpoints included", examples=[3])
    steps: Integer | None = Steps


class SampleParams(ImageOut):
    """POST /v1/sample -> n new images (latent DDIM for z_sem, then image DDIM from noise)."""

    n: Integer = Field(1, description="number of images", examples=[2])
    steps: Integer | None = Steps
    latent_steps: Integer | None = Field(None, description="DDIM steps of the latent DPM", examples=[10])


class ClassifyParams(Params):
    """POST /v1/classify -> {attributes: {name: {logit, probability}}, z_sem}."""

    requires = ((("image",), ("z_sem",)),)
    image: str | None = Field(None, description=IMAGE_DOC + " (or give z_sem instead)")
    z_sem: Annotated[list[Number], BeforeValidator(_json)] | None = Field(None, description=Z_DOC)


def ranges(model: type[Params], limits: Limits) -> dict[str, tuple[float, float]]:
    """[low, high] of each bounded scalar field of ``model`` under ``limits`` (edits values: ``alpha``)."""
    table = {"steps": (1, limits.max_steps), "latent_steps": (1, limits.max_latent_steps),
             "n": (model.n_min, limits.max_n), "alpha": (-limits.max_alpha, limits.max_alpha)}
    return {name: bounds for name, bounds in table.items() if name in model.model_fields}


def missing(model: type[Params], present: set[str]) -> str | None:
    """What a request lacks, as a message naming the fields (None when every ``requires`` group is met)."""
    for group in model.requires:
        if not any(set(fields) <= present for fields in group):
            options = ", or ".join(" and ".join(f"`{f}`" for f in fields) for fields in group)
            return f"missing field(s): give {options}"
    return None
