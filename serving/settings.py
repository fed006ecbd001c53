"""Typed settings of the serving application, parsed from the ``args`` of ``build_app`` / serve_config.yaml.

Every knob has a documented default; unknown keys are an error so a typo in a YAML file cannot pass
silently. The layout of ``args``::

    bundle: s3://bucket/models/ffhq64      # required: a bundle directory (local path, file:// or s3://)
    s3_endpoint: http://127.0.0.1:9000     # optional; default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL
    api_keys_file: /etc/diffae/keys        # optional: one key per line ('#' comments); re-read when it changes
    api_keys_env: DIFFAE_API_KEYS          # the variable holding comma-separated keys (default shown)
    limits:   {max_upload_bytes: ..., max_pixels: ..., max_steps: ..., ...}       # see Limits
    batching: {Encoder: {max_batch_size: 8, batch_wait_timeout_s: 0.01, pad_batches: false}, Decoder: {...}}
    deployments: {Ingress|Encoder|Decoder|Classifier|LatentSampler: {min_replicas: ..., ...}}  # see Scaling
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from diffae_core.config import from_dict

DEPLOYMENTS = ("Ingress", "Encoder", "Decoder", "Classifier", "LatentSampler")
BATCHED = ("Encoder", "Decoder")
# Inference dtypes a deployment can compute in (autocast; GroupNorm and the DDIM arithmetic stay in float32).
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Limits:
    """What one request may ask for. Requests beyond a limit get 408 (slow upload), 413 (sizes) or 422
    (parameters); the message names the limit. GET /v1/model lists them and the OpenAPI schema states them."""

    max_upload_bytes: int = 10 * 2**20  # one image, after base64 decoding
    max_pixels: int = 4096 * 4096  # decoded width x height: refuses decompression bombs before decoding
    max_side: int = 8192  # each side of a decoded image, read from its header before any pixel
    max_aspect_ratio: float = 16.0  # long side / short side: a 1 x 10^6 strip is tiny but resizes to a huge one
    max_resize_pixels: int = 2048 * 2048  # the image after its shorter side is resized to the model's size
    default_steps: int = 20  # DDIM steps when a request gives none
    max_steps: int = 100  # DDIM steps (inversion and decoding); each step is one UNet call per image
    default_latent_steps: int = 20
    max_latent_steps: int = 100
    max_n: int = 16  # images per /v1/sample or /v1/interpolate request
    max_alpha: float = 1.0  # |alpha| of a manipulation (the official demos stay within about 0.5)
    max_latent_abs: float = 1000.0  # |each number| of a z_sem or x_T sent in (encoder outputs stay within ~10)
    max_json_depth: int = 16  # nesting of JSON bodies and JSON form fields (the API needs 2)
    max_int_digits: int = 20  # digits of one JSON / form integer (a seed < 2^63 has 19)
    max_inflight: int = 64  # fully-read requests one ingress replica works on at once; beyond: 503 + Retry-After
    retry_after_s: int = 1  # the Retry-After a 503 carries
    body_timeout_s: float = 10.0  # the whole request body must arrive within this; else 408
    upload_grace_s: float = 1.0  # a body still arriving after this takes an upload slot (max_uploading)
    max_uploading: int = 16  # slow uploads one ingress replica waits for at once; beyond: 408 at once

    def validate(self) -> None:
        for name in ("max_upload_bytes", "max_pixels", "max_side", "max_resize_pixels", "default_steps",
                     "max_steps", "default_latent_steps", "max_latent_steps", "max_n", "max_json_depth",
                     "max_int_digits", "max_inflight", "retry_after_s", "max_uploading"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"limits.{name} must be a positive integer, got {value!r}")
        if self.max_steps > 1000 or self.max_latent_steps > 1000:
            raise ValueError("limits.max_steps and max_latent_steps cannot exceed T = 1000")
        if not 1 <= self.default_steps <= self.max_steps:
            raise ValueError(f"limits.default_steps must be in [1, max_steps={self.max_steps}]")
        if not 1 <= self.default_latent_steps <= self.max_latent_steps:
            raise ValueError(f"limits.default_latent_steps must be in [1, max_latent_steps={self.max_latent_steps}]")
        if self.max_int_digits < 19:
            raise ValueError("limits.max_int_digits must be >= 19 so that every seed (< 2^63) fits")
        for name in ("max_alpha", "max_latent_abs", "body_timeout_s", "upload_grace_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"limits.{name} must be a positive finite number, got {value!r}")
        if not (isinstance(self.max_aspect_ratio, (int, float)) and 1 <= self.max_aspect_ratio < math.inf):
            raise ValueError(f"limits.max_aspect_ratio must be a finite number >= 1, got {self.max_aspect_ratio!r}")
        if self.upload_grace_s >= self.body_timeout_s:
            raise ValueError("limits.upload_grace_s must be shorter than limits.body_timeout_s")


@dataclass
class Batching:
    """Dynamic batching of one deployment (``@serve.batch``).

    Every request carries its own seed, so batching never changes which noise a request gets; batched
    convolutions may still differ from batch-1 ones in the last float bits (measured on the micro model:
    z_sem <= 3e-7, x_T <= 2e-5, images <= 2e-6 before 8-bit rounding).

    pad_batches: run every batch at ``max_batch_size`` rows (zero padding), so the model always sees one
    shape, at the price of full-batch compute for a lone request. In one process (``serving.compute``)
    padded results are bit-identical alone or batched; inside Serve replicas we still measured last-bit
    differences of the size above, so do not rely on it for bit-exactness across requests.
    """

    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01
    pad_batches: bool = False

    def validate(self, name: str) -> None:
        if isinstance(self.max_batch_size, bool) or not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ValueError(f"batching.{name}.max_batch_size must be a positive integer")
        if not (isinstance(self.batch_wait_timeout_s, (int, float)) and 0 <= self.batch_wait_timeout_s <= 10):
            raise ValueError(f"batching.{name}.batch_wait_timeout_s must be in [0, 10] seconds")


@dataclass
class Scaling:
    """Replicas, queues and resources of one deployment (Serve's autoscaling_config, request limits,
    ray_actor_options) and the dtype its replicas compute in."""

    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 8.0  # per replica; the autoscaler adds replicas above it
    max_ongoing_requests: int = 16  # per replica; for batched deployments keep >= max_batch_size
    max_queued_requests: int = 256  # per caller, waiting for a replica; beyond: 503 + Retry-After
    num_cpus: float = 1.0  # logical CPUs reserved per replica
    num_gpus: float = 0.0  # GPUs per replica (fractional shares a GPU); the replica computes on it
    dtype: str = "fp32"  # inference dtype: fp32, bf16 or fp16 (fp16 on GPUs only)
    torch_threads: int | None = None  # intra-op threads per replica; None: max(1, int(num_cpus))
    upscale_delay_s: float | None = None  # None: Serve's default
    downscale_delay_s: float | None = None
    look_back_period_s: float | None = None  # window of the load the autoscaler averages; None: Serve's default
    max_replicas_per_node: int | None = None  # spread replicas over nodes (a lost node takes at most this many)
    resources: dict[str, float] | None = None  # other Ray resources per replica, e.g. a node label resource
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0

    def validate(self, name: str) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(f"deployments.{name}: need 0 <= min_replicas <= max_replicas, max_replicas >= 1")
        if self.max_ongoing_requests < 1 or self.target_ongoing_requests <= 0:
            raise ValueError(f"deployments.{name}: max_ongoing_requests and target_ongoing_requests must be > 0")
        if self.num_cpus < 0 or self.num_gpus < 0 or (self.torch_threads is not None and self.torch_threads < 1):
            raise ValueError(f"deployments.{name}: num_cpus and num_gpus must be >= 0 and torch_threads >= 1")
        if self.dtype not in DTYPES:
            raise ValueError(f"deployments.{name}: dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def threads(self) -> int:
        return self.torch_threads or max(1, int(self.num_cpus))

    def replica(self) -> dict[str, Any]:
        """What each replica's constructor needs to know about its own resources and numerics."""
        return {"threads": self.threads, "num_gpus": self.num_gpus, "dtype": self.dtype}

    def autoscaling_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
        }
        for name in ("upscale_delay_s", "downscale_delay_s", "look_back_period_s"):
            if getattr(self, name) is not None:
                config[name] = getattr(self, name)
        return config

    def actor_options(self) -> dict[str, Any]:
        """Serve's ``ray_actor_options``: the CPUs, GPUs and other resources each replica reserves."""
        return {"num_cpus": self.num_cpus, **({"num_gpus": self.num_gpus} if self.num_gpus else {}),
                **({"resources": dict(self.resources)} if self.resources else {})}


def _default_scaling() -> dict[str, Scaling]:
    # The decoder does the heavy lifting (steps x UNet calls per image); the classifier is a linear layer.
    return {
        "Ingress": Scaling(max_replicas=2, target_ongoing_requests=32, max_ongoing_requests=128, num_cpus=0.5),
        "Encoder": Scaling(max_replicas=2, target_ongoing_requests=8, max_ongoing_requests=16),
        "Decoder": Scaling(max_replicas=4, target_ongoing_requests=8, max_ongoing_requests=16),
        "Classifier": Scaling(max_replicas=2, target_ongoing_requests=16, max_ongoing_requests=64, num_cpus=0.1),
        "LatentSampler": Scaling(max_replicas=2, target_ongoing_requests=4, max_ongoing_requests=8, num_cpus=0.5),
    }


@dataclass
class AppSettings:
    bundle: str
    s3_endpoint: str | None = None
    api_keys_file: str | None = None
    api_keys_env: str = "DIFFAE_API_KEYS"
    limits: Limits = field(default_factory=Limits)
    batching: dict[str, Batching] = field(default_factory=lambda: {name: Batching() for name in BATCHED})
    deployments: dict[str, Scaling] = field(default_factory=_default_scaling)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> AppSettings:
        """Parse ``build_app`` args (nested dicts, as from YAML; ``serve run`` key=value strings for flat keys)."""
        if not isinstance(args, dict):
            raise TypeError(f"app args must be a mapping, got {type(args).__name__}")
        args = dict(args)
        if not args.get("bundle"):
            raise ValueError("app args need `bundle`: a bundle directory (path, file:// or s3:// URI)")
        unknown = sorted(set(args) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown app arg(s) {unknown}; known: {[f.name for f in dataclasses.fields(cls)]}")
        settings = cls(bundle=str(args["bundle"]), s3_endpoint=args.get("s3_endpoint"),
                       api_keys_file=args.get("api_keys_file"),
                       api_keys_env=str(args.get("api_keys_env") or "DIFFAE_API_KEYS"))
        settings.limits = _merge(settings.limits, args.get("limits") or {}, "limits")
        for name, value in _section(args, "batching", BATCHED).items():
            settings.batching[name] = _merge(settings.batching[name], value, f"batching.{name}")
        for name, value in _section(args, "deployments", DEPLOYMENTS).items():
            settings.deployments[name] = _merge(settings.deployments[name], value, f"deployments.{name}")
        settings.limits.validate()
        for name, batching in settings.batching.items():
            batching.validate(name)
        for name, scaling in settings.deployments.items():
            scaling.validate(name)
        return settings

    def to_args(self) -> dict[str, Any]:
        """The args dict that ``from_args`` turns back into these settings."""
        return dataclasses.asdict(self)


def _section(args: dict[str, Any], key: str, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    section = args.get(key) or {}
    if not isinstance(section, dict):
        raise ValueError(f"app arg `{key}` must be a mapping of {list(names)} to settings")
    unknown = sorted(set(section) - set(names))
    if unknown:
        raise ValueError(f"{key}: unknown deployment(s) {unknown}; known: {list(names)}")
    return section


def _merge(base: Any, overrides: dict[str, Any], where: str) -> Any:
    """A copy of dataclass ``base`` with ``overrides`` applied; strings are coerced to the field's type."""
    if not isinstance(overrides, dict):
        raise ValueError(f"{where} must be a mapping, got {type(overrides).__name__}")
    values = dict(overrides)
    for key, value in overrides.items():
        current = getattr(base, key, None)
        if isinstance(value, str) and current is not None and not isinstance(current, str):
            values[key] = _coerce(value, type(current), f"{where}.{key}")
    try:
        return from_dict(type(base), {**dataclasses.asdict(base), **values})
    except ValueError as exc:  # an unknown key: from_dict names the known ones
        raise ValueError(f"{where}: {exc}") from None


def _coerce(text: str, kind: type, where: str) -> Any:
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        return kind(text)
    except ValueError:
        raise ValueError(f"{where}: cannot read {text!r} as {kind.__name__}") from None
