"""Prometheus metrics of the serving application (docs/architecture.md, Metrics), through ``ray.serve.metrics``.

They are exported on Ray's metrics port with Ray's ``ray_`` prefix (``ray_diffae_requests_total``, ...).
Serve adds the ``deployment``, ``replica`` and ``application`` tags itself, so ``deployment`` is never
passed here (Serve reserves it). Create the objects inside a replica (in ``__init__``), where Serve's
context supplies those tags.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Histogram

# Request latency in seconds: from a few ms (classify on a tiny model) to a minute (big batches, many steps).
REQUEST_SECONDS_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
BATCH_SIZE_BOUNDARIES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64]


class RequestMetrics:
    """Ingress metrics: ``diffae_requests_total{route,code}`` and ``diffae_request_seconds{route}``."""

    def __init__(self) -> None:
        self.requests = Counter(
            "diffae_requests_total", description="HTTP requests answered, by route and status code.",
            tag_keys=("route", "code"),
        )
        self.seconds = Histogram(
            "diffae_request_seconds", description="Wall time of HTTP requests, by route.",
            boundaries=REQUEST_SECONDS_BOUNDARIES, tag_keys=("route",),
        )

    def record(self, route: str, code: int, seconds: float) -> None:
        self.requests.inc(tags={"route": route, "code": str(code)})
        self.seconds.observe(seconds, tags={"route": route})


class ModelMetrics:
    """Replica metrics: ``diffae_batch_size{deployment}``, ``diffae_model_seconds{deployment,op}`` and
    ``diffae_denoise_steps_total`` (network evaluations per image: steps x images, image and latent DDIM)."""

    def __init__(self) -> None:
        self.batch_size = Histogram(
            "diffae_batch_size", description="Requests per model call (after dynamic batching).",
            boundaries=BATCH_SIZE_BOUNDARIES,
        )
        self.model_seconds = Histogram(
            "diffae_model_seconds", description="Wall time of one batched model call, by operation.",
            boundaries=REQUEST_SECONDS_BOUNDARIES, tag_keys=("op",),
        )
        self.denoise_steps = Counter(
            "diffae_denoise_steps_total", description="Denoising network evaluations, counted per image.",
        )

    def record(self, op: str, batch_size: int, seconds: float, denoise_steps: int = 0) -> None:
        self.batch_size.observe(batch_size, tags={})
        self.model_seconds.observe(seconds, tags={"op": op})
        if denoise_steps:
            self.denoise_steps.inc(denoise_steps, tags={})
