"""The HTTP API (README, Serve and call the API): a FastAPI ingress holding handles to the model deployments.

Routes: GET /healthz (open), GET /v1/model, POST /v1/{encode,decode,reconstruct,manipulate,interpolate,
sample,classify}, GET / (web page), OpenAPI at /docs. Bodies are JSON or multipart (see schemas.py);
image routes answer a PNG (``format=png``, several images side by side in one row) or JSON with base64
PNGs and the codes (``format=json``). Latents travel as a JSON array (z_sem) and base64 float32 (x_T).

Errors are JSON ``{"error", "status", "message"}``: 400 undecodable, 401 key, 404 missing model part,
408 body not arrived in time, 413 too large, 415 body type, 422 bad parameter (also when an input makes a
result non-finite), 503 (+ Retry-After) when at capacity, when a queue downstream is full (Serve's
BackPressureError) or when a replica died under a request. Admission, deadlines and request metrics are
serving/guard.py's; the OpenAPI schema with every enforced range is serving/openapi.py's.
"""

import asyncio
import base64
import io
import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from diffae_core import __version__
from diffae_core.bundle import CLASSIFIER, LATENT, read_manifest
from diffae_core.images import make_grid, png_bytes
from diffae_core.model import slerp

from . import openapi
from . import schemas as S
from .auth import KeyStore
from .batching import DecoderJob
from .errors import ApiError
from .guard import Gate, Guard
from .inputs import (
    MAX_REPORTED_ERRORS,
    check_range,
    encode_x_T,
    load_image,
    parse_x_T,
    parse_z,
    read_payload,
    validate,
)
from .metrics import RequestMetrics
from .openapi import ERRORS_DOC, PNG_RESPONSE
from .settings import AppSettings

logger = logging.getLogger("ray.serve")
STATIC_DIR = Path(__file__).parent / "static"
TRANSIENT = (BackPressureError, RayActorError, ActorUnavailableError, ReplicaUnavailableError,
             DeploymentUnavailableError)

app = FastAPI(title="diffae-ray", version=__version__, description=__doc__)
app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
app.add_middleware(Guard)
_bearer = HTTPBearer(auto_error=False, description="an API key, when the server has keys configured")


async def require_key(request: Request, _: Any = Depends(_bearer)) -> None:
    """Auth for /v1/*: the HTTPBearer dependency documents it in OpenAPI; the KeyStore decides."""
    request.app.state.ingress.keys.check(request.headers.get("authorization"))


AUTH = [Depends(require_key)]
ROUTE_DOC: dict[str, Any] = {"dependencies": AUTH, "responses": ERRORS_DOC}
IMAGE_ROUTE_DOC: dict[str, Any] = {"dependencies": AUTH, "responses": {**PNG_RESPONSE, **ERRORS_DOC}}


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _retry_after(request: Request) -> dict[str, str]:
    return {"Retry-After": str(request.app.state.ingress.settings.limits.retry_after_s)}


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error(exc)


@app.exception_handler(RequestValidationError)
async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()[:MAX_REPORTED_ERRORS]
    return _error(ApiError(422, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(ApiError(exc.status_code, str(exc.detail), dict(exc.headers or {})))


for _kind in TRANSIENT:
    @app.exception_handler(_kind)
    async def _transient(request: Request, exc: Exception) -> JSONResponse:
        # Full queues downstream or a replica that died mid-request: the client should retry shortly.
        logger.warning("503 for %s: %s", request.url.path, exc.__class__.__name__)
        message = ("a model queue is full" if isinstance(exc, BackPressureError)
                   else "a model replica failed or is restarting")
        return _error(ApiError(503, f"{message}; retry shortly", _retry_after(request)))


def api_paths(routes: Sequence[Any]) -> set[str]:
    """Paths of the API routes, also inside included routers (serve.ingress hands the class's routes to
    FastAPI as an included router, which recent FastAPI keeps as a wrapper without a ``path``)."""
    paths: set[str] = set()
    for route in routes:
        if isinstance(route, APIRoute):
            paths.add(route.path)
        inner = getattr(route, "original_router", None) or getattr(route, "router", None)
        if inner is not None and hasattr(inner, "routes"):
            paths |= api_paths(inner.routes)
    return paths


def finite_json(content: dict[str, Any], headers: dict[str, str]) -> JSONResponse:
    """A JSON response, or a 422 when the result holds inf or NaN (JSON cannot carry them): an input within
    the limits still drove the model out of float range."""
    try:
        return JSONResponse(content, headers=headers)
    except ValueError:  # json.dumps(allow_nan=False)
        raise ApiError(422, "the result for these inputs is not finite (inf or NaN); use smaller inputs") from None


def _png(images: torch.Tensor) -> bytes:
    """[n,3,H,W] in [-1,1] -> one PNG: the image itself, or n images side by side (n*W x H)."""
    if images.shape[0] == 1:
        return png_bytes(images[0])
    buf = io.BytesIO()
    make_grid(images, nrow=images.shape[0], pad=0).save(buf, format="PNG")
    return buf.getvalue()


@serve.deployment
@serve.ingress(app)
class Ingress:
    """Parses and validates requests, fans them out to the model deployments, renders responses."""

    def __init__(self, encoder: Any, decoder: Any, classifier: Any, latent_sampler: Any, args: dict) -> None:
        self.settings = AppSettings.from_args(args)
        torch.set_num_threads(self.settings.deployments["Ingress"].threads)
        self.encoder, self.decoder, self.classifier, self.latent_sampler = encoder, decoder, classifier, latent_sampler
        manifest = read_manifest(self.settings.bundle, self.settings.s3_endpoint)
        self.size, self.z_dim, self.preset = manifest["image_size"], manifest["z_dim"], manifest["preset"]
        self.has_classifier, self.has_latent = CLASSIFIER in manifest["files"], LATENT in manifest["files"]
        self._attributes: list[str] | None = None
        self.keys = KeyStore(self.settings.api_keys_env, self.settings.api_keys_file)
        self.metrics = RequestMetrics()
        limits = self.settings.limits
        b64 = lambda n: 4 * math.ceil(n / 3)  # noqa: E731
        # Two images (interpolate) or one image plus an x_T, in base64, plus form/JSON overhead.
        self.max_body = 2 * b64(limits.max_upload_bytes) + b64(3 * self.size**2 * 4) + 256 * 1024
        self.gate = Gate(limits, self.max_body)
        self.routes = api_paths(app.routes)
        if "/v1/encode" not in self.routes:  # metrics labels and admission control depend on this set
            raise RuntimeError(f"cannot find the API routes in the FastAPI app (found {sorted(self.routes)})")
        openapi.install(app, limits, self.size, self.z_dim, list(manifest.get("attributes") or []))
        app.state.ingress = self

    # ---- helpers -------------------------------------------------------------------------------
    def route_label(self, path: str) -> str:
        """A bounded set of metric labels: known routes, /static, or 'other'."""
        if path in self.routes:
            return path
        return "/static" if path.startswith("/static/") else "other"

    async def _parse(self, request: Request, model: type) -> tuple[Any, Any]:
        payload = await read_payload(request, self.settings.limits)
        return payload, validate(model, payload, self.settings.limits)

    async def _image(self, payload: Any, name: str = "image") -> np.ndarray:
        x = await asyncio.to_thread(load_image, payload.image(name), self.size, self.settings.limits, name)
        return x.numpy()

    def _steps(self, steps: int | None) -> int:
        return self.settings.limits.default_steps if steps is None else steps  # validate() checked the range

    def _z(self, values: list[float] | None) -> np.ndarray:
        return parse_z(values, self.z_dim, self.settings.limits.max_latent_abs)

    def _x_T(self, text: str | None) -> np.ndarray:
        return parse_x_T(text, self.size, self.settings.limits.max_latent_abs)

    @staticmethod
    def _seed(seed: int | None) -> int:
        # Drawn seeds stay below 2^31 so browsers (53-bit JSON numbers) can echo them back exactly.
        return random.SystemRandom().randrange(2**31) if seed is None else seed

    async def _attribute_names(self) -> list[str]:
        if not self.has_classifier:
            raise ApiError(404, "this model has no attribute classifier: train one with `diffae train classifier`")
        if self._attributes is None:
            self._attributes = list(await self.classifier.attribute_names.remote())
        return self._attributes

    async def _encode(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, int]:
        results = await asyncio.gather(*(self.encoder.encode.remote(x) for x in images))
        return np.stack([r[0] for r in results]), max(r[1] for r in results)

    async def _decoder(self, op: str, steps: int, xs: Sequence[np.ndarray | None], zs: Sequence[np.ndarray],
                       seed: int | None = None) -> tuple[np.ndarray, int]:
        """Results [n,3,S,S] of one Decoder job per (x, z); an x of None decodes from noise of ``seed``."""
        jobs = [DecoderJob(op, steps, None if x is None else np.asarray(x, np.float32), np.asarray(z, np.float32),
                           seed) for x, z in zip(xs, zs, strict=True)]
        results = await asyncio.gather(*(self.decoder.run.remote(job) for job in jobs))
        return np.stack([r[0] for r in results]), max(r[1] for r in results)

    async def _invert(self, x: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(z [Z], x_T [3,S,S], largest batch) for one image [3,S,S]."""
        z, b1 = await self._encode([x])
        x_T, b2 = await self._decoder("invert", steps, [x], z)
        return z[0], x_T[0], max(b1, b2)

    async def _images_out(self, images: np.ndarray, fmt: str, extra: dict[str, Any], seed: int, batch: int
                          ) -> Response:
        headers = {"X-Seed": str(seed), "X-Diffae-Batch-Size": str(batch)}
        tensor = torch.from_numpy(images)
        if fmt == "png":
            data = await asyncio.to_thread(_png, tensor)
            return Response(data, media_type="image/png", headers=headers)
        pngs = await asyncio.to_thread(lambda: [base64.b64encode(png_bytes(x)).decode() for x in tensor])
        body = {"image": pngs[0]} if len(pngs) == 1 else {"images": pngs}
        return finite_json({**body, "seed": seed, **extra}, headers)

    # ---- routes --------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page(self) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/healthz", summary="liveness (no auth)")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok", "preset": self.preset}

    @app.get("/v1/model", summary="model, attributes and limits", **ROUTE_DOC)
    async def model(self) -> dict[str, Any]:
        attributes = await self._attribute_names() if self.has_classifier else []
        return {"preset": self.preset, "image_size": self.size, "z_dim": self.z_dim, "attributes": attributes,
                "has_classifier": self.has_classifier, "has_latent": self.has_latent,
                "auth": self.keys.enabled, "limits": vars(self.settings.limits),
                "batching": {k: vars(v) for k, v in self.settings.batching.items()}}

    @app.post("/v1/encode", summary="semantic code z_sem (and stochastic x_T with `steps`)",
              **ROUTE_DOC)
    async def encode(self, request: Request) -> JSONResponse:
        payload, p = await self._parse(request, S.EncodeParams)
        x, seed = await self._image(payload), self._seed(p.seed)
        out: dict[str, Any] = {"seed": seed, "image_size": self.size}
        if p.steps is None:
            z, batch = await self._encode([x])
            out["z_sem"] = z[0].tolist()
        else:
            steps = self._steps(p.steps)
            z0, x_T, batch = await self._invert(x, steps)
            out.update(z_sem=z0.tolist(), x_T=encode_x_T(x_T), x_T_shape=list(x_T.shape), steps=steps)
        return finite_json(out, {"X-Seed": str(seed), "X-Diffae-Batch-Size": str(batch)})

    @app.post("/v1/decode", summary="image from z_sem and x_T (x_T drawn from `seed` if absent)", **IMAGE_ROUTE_DOC)
    async def decode(self, request: Request) -> Response:
        _, p = await self._parse(request, S.DecodeParams)
        seed, steps = self._seed(p.seed), self._steps(p.steps)
        z = self._z(p.z_sem)
        x_T = None if p.x_T is None else self._x_T(p.x_T)  # None: the Decoder draws it from the seed
        images, batch = await self._decoder("decode", steps, [x_T], [z], seed)
        return await self._images_out(images, p.format, {"steps": steps}, seed, batch)

    @app.post("/v1/reconstruct", summary="near-exact reconstruction through z_sem and x_T", **IMAGE_ROUTE_DOC)
    async def reconstruct(self, request: Request) -> Response:
        payload, p = await self._parse(request, S.ReconstructParams)
        seed, steps = self._seed(p.seed), self._steps(p.steps)
        x = await self._image(payload)
        z, x_T, b1 = await self._invert(x, steps)
        images, b2 = await self._decoder("decode", steps, [x_T], [z])
        extra = {"steps": steps, "z_sem": z.tolist(), "x_T": encode_x_T(x_T)}
        return await self._images_out(images, p.format, extra, seed, max(b1, b2))

    @app.post("/v1/manipulate", summary="edit attributes: move z_sem along classifier directions", **IMAGE_ROUTE_DOC)
    async def manipulate(self, request: Request) -> Response:
        payload, p = await self._parse(request, S.ManipulateParams)
        seed, steps = self._seed(p.seed), self._steps(p.steps)
        edits = await self._edits(p)
        if "image" in payload.images:
            z, x_T, b1 = await self._invert(await self._image(payload), steps)
        elif p.z_sem is not None or p.x_T is not None:
            z, x_T, b1 = self._z(p.z_sem), self._x_T(p.x_T), 1
        else:
            raise ApiError(422, "missing input: give `image`, or `z_sem` and `x_T` (from /v1/encode)")
        moved = await self.classifier.manipulate.remote(z[None], edits)
        images, b2 = await self._decoder("decode", steps, [x_T], moved)
        extra = {"steps": steps, "z_sem": np.asarray(moved[0]).tolist(), "x_T": encode_x_T(x_T),
                 "edits": {self._attributes[i]: a for i, a in edits}}
        return await self._images_out(images, p.format, extra, seed, max(b1, b2))

    async def _edits(self, p: S.ManipulateParams) -> list[tuple[int, float]]:
        names = await self._attribute_names()
        if p.edits is not None and (p.attribute is not None or p.alpha is not None):
            raise ApiError(422, "give either `attribute` and `alpha`, or `edits`, not both")
        if p.edits is None:
            if p.attribute is None or p.alpha is None:
                raise ApiError(422, "missing field `attribute` or `alpha` (or give `edits`: {name: alpha})")
            requested = {p.attribute: p.alpha}
        else:
            requested = p.edits
        if not requested:
            raise ApiError(422, "`edits` is empty")
        edits = []
        for name, alpha in requested.items():
            if name not in names:
                raise ApiError(422, f"unknown attribute {name!r}; this model knows {names}")
            check_range(f"alpha ({name})", alpha, -self.settings.limits.max_alpha, self.settings.limits.max_alpha)
            edits.append((names.index(name), float(alpha)))
        return edits

    @app.post("/v1/interpolate", summary="n images between two images (lerp z_sem, slerp x_T)", **IMAGE_ROUTE_DOC)
    async def interpolate(self, request: Request) -> Response:
        payload, p = await self._parse(request, S.InterpolateParams)
        seed, steps = self._seed(p.seed), self._steps(p.steps)
        xa, xb = await asyncio.gather(self._image(payload, "image_a"), self._image(payload, "image_b"))
        z, b1 = await self._encode([xa, xb])
        x_T, b2 = await self._decoder("invert", steps, [xa, xb], z)
        alpha = torch.linspace(0, 1, p.n)[:, None]
        z_t, x_T_t = torch.from_numpy(z), torch.from_numpy(x_T)
        z_i = ((1 - alpha) * z_t[0] + alpha * z_t[1]).numpy()
        x_T_i = slerp(x_T_t[0].flatten(), x_T_t[1].flatten(), alpha).reshape(p.n, *x_T.shape[1:]).numpy()
        images, b3 = await self._decoder("decode", steps, list(x_T_i), list(z_i))
        return await self._images_out(images, p.format, {"steps": steps, "n": p.n}, seed, max(b1, b2, b3))

    @app.post("/v1/sample", summary="n new images: latent DDIM, then image DDIM from seeded noise", **IMAGE_ROUTE_DOC)
    async def sample(self, request: Request) -> Response:
        _, p = await self._parse(request, S.SampleParams)
        limits = self.settings.limits
        seed, steps = self._seed(p.seed), self._steps(p.steps)
        latent_steps = limits.default_latent_steps if p.latent_steps is None else p.latent_steps
        if not self.has_latent:
            raise ApiError(404, "this model has no latent DPM, so it cannot sample: train one with "
                                "`diffae train latent`")
        z, noise = await self.latent_sampler.sample.remote(p.n, latent_steps, seed)
        images, batch = await self._decoder("decode", steps, list(noise), list(z))
        extra = {"steps": steps, "latent_steps": latent_steps, "n": p.n, "z_sem": np.asarray(z).tolist()}
        return await self._images_out(images, p.format, extra, seed, batch)

    @app.post("/v1/classify", summary="attribute logits and probabilities",
              **ROUTE_DOC)
    async def classify(self, request: Request) -> JSONResponse:
        payload, p = await self._parse(request, S.ClassifyParams)
        names, seed = await self._attribute_names(), self._seed(p.seed)
        if "image" in payload.images:
            z, batch = await self._encode([await self._image(payload)])
        else:
            z, batch = self._z(p.z_sem)[None], 1
        logits = np.asarray(await self.classifier.classify.remote(z))[0]
        # tanh form of the sigmoid: no overflow warning for large |logit|
        attributes = {name: {"logit": float(v), "probability": float(0.5 * (1 + np.tanh(v / 2)))}
                      for name, v in zip(names, logits, strict=True)}
        return finite_json({"attributes": attributes, "z_sem": z[0].tolist(), "seed": seed},
                           {"X-Seed": str(seed), "X-Diffae-Batch-Size": str(batch)})

