"""The model deployments: Encoder (z_sem), Decoder (DDIM inversion and decoding), Classifier (logits,
manipulation) and LatentSampler (latent DDIM). Each holds a :class:`DiffAE` with only its part of the bundle
and calls its methods for every model operation, so the served maths is the library's.

Encoder and Decoder batch dynamically with ``@serve.batch``; the model runs in a worker thread, so the
replica's event loop keeps collecting the next batch and answering health checks while a batch computes.
Every batched call returns ``(result, batch_size)`` so callers can see how their request was batched.
Each replica computes on the device Ray gives it (a GPU when its deployment asks for ``num_gpus``; on a
machine without CUDA it says so in its log and uses the CPU) in its deployment's inference dtype, with
diffae_core.performance's speed defaults for that device (no compile: a replica must answer at once) and
frozen weights.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
import torch
from ray import serve

from diffae_core import DiffAE
from diffae_core.bundle import CLASSIFIER, LATENT, read_manifest
from diffae_core.performance import tune_for_inference

from .batching import DECODER_OPS, DecoderJob, group_indices, run_padded, stack
from .metrics import ModelMetrics
from .settings import DTYPES

logger = logging.getLogger("ray.serve")


def replica_device(num_gpus: float) -> torch.device:
    """CUDA when this replica was granted a GPU and CUDA works here; otherwise the CPU, said in the log."""
    if num_gpus <= 0:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    logger.warning("this replica was granted %s GPU(s) but CUDA is not available here: running on the CPU", num_gpus)
    return torch.device("cpu")


def _check_array(x: Any, shape: tuple[int, ...], what: str) -> None:
    if not isinstance(x, np.ndarray) or x.shape != shape or x.dtype != np.float32:
        got = (x.shape, x.dtype) if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"{what} must be a float32 array of shape {shape}, got {got}")


def _check_finite(x: torch.Tensor, what: str) -> None:
    """Raise RuntimeError if a health-check output holds NaN or inf (a broken replica must be replaced)."""
    if not torch.isfinite(x).all():
        raise RuntimeError(f"{what} produced non-finite values")


class _Replica:
    """Loads this replica's part of the bundle onto its device, with its threads, dtype and metrics."""

    def _load(self, bundle: str, s3_endpoint: str | None, parts: Sequence[str], replica: dict[str, Any]) -> DiffAE:
        # Replicas share a machine's cores: pin intra-op threads so they do not oversubscribe them.
        torch.set_num_threads(replica["threads"])
        self.metrics = ModelMetrics()
        self.device = replica_device(replica["num_gpus"])
        self.dtype_name = replica["dtype"]
        model = DiffAE.load(bundle, device=self.device, endpoint=s3_endpoint, parts=parts)
        model.inference_dtype = DTYPES[replica["dtype"]]
        return tune_for_inference(model, self.device, model.image_size)

    def replica_actor_name(self) -> str:
        """Identity of the replica a call landed on: operators (and the failure tests) use it to find the actor."""
        return ray.get_runtime_context().get_actor_name()

    def describe(self) -> dict[str, Any]:
        """Where this replica runs: actor, node, GPUs Ray assigned, the device it computes on, its dtype."""
        ctx = ray.get_runtime_context()
        return {"actor": ctx.get_actor_name(), "node_id": ctx.get_node_id(),
                "gpu_ids": ctx.get_accelerator_ids().get("GPU", []), "device": str(self.device),
                "dtype": self.dtype_name, "threads": torch.get_num_threads()}


@serve.deployment
class Encoder(_Replica):
    """z_sem for images: ``encode(x [3,H,W] float32 in [-1,1]) -> (z [Z], batch_size)``."""

    def __init__(self, bundle: str, s3_endpoint: str | None, batching: dict, replica: dict) -> None:
        self.model = self._load(bundle, s3_endpoint, ("encoder",), replica)
        self.size = self.model.image_size
        self.pad_to = batching["max_batch_size"] if batching["pad_batches"] else None
        self.encode_batch.set_max_batch_size(batching["max_batch_size"])
        self.encode_batch.set_batch_wait_timeout_s(batching["batch_wait_timeout_s"])

    async def encode(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        _check_array(x, (3, self.size, self.size), "image")
        return await self.encode_batch(x)

    def _encode(self, images: torch.Tensor) -> np.ndarray:
        return run_padded(self.model.encode, images, pad_to=self.pad_to).float().cpu().numpy()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def encode_batch(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, int]]:
        start = time.perf_counter()
        z = await asyncio.to_thread(self._encode, stack(images))
        self.metrics.record("encode", len(images), time.perf_counter() - start)
        return [(row, len(images)) for row in z]

    async def check_health(self) -> None:
        z = await asyncio.to_thread(self.model.encode, torch.zeros(1, 3, self.size, self.size))
        _check_finite(z, "encoder")


@serve.deployment
class Decoder(_Replica):
    """DDIM inversion and decoding: ``run(DecoderJob) -> (x [3,H,W], batch_size)``.

    A batch is split by (op, steps): one DDIM loop per group, so jobs only share a network call with
    jobs that walk the same timesteps.
    """

    def __init__(self, bundle: str, s3_endpoint: str | None, batching: dict, replica: dict) -> None:
        self.model = self._load(bundle, s3_endpoint, ("unet",), replica)
        self.pad_to = batching["max_batch_size"] if batching["pad_batches"] else None
        self.run_batch.set_max_batch_size(batching["max_batch_size"])
        self.run_batch.set_batch_wait_timeout_s(batching["batch_wait_timeout_s"])

    async def run(self, job: DecoderJob) -> tuple[np.ndarray, int]:
        size, z_dim, T = self.model.image_size, self.model.config.z_dim, self.model.diffusion.T
        if job.op not in DECODER_OPS or not 1 <= job.steps <= T:
            raise ValueError(f"bad decoder job: op {job.op!r} (one of {DECODER_OPS}), steps {job.steps}")
        if job.x is None and (job.op != "decode" or job.seed is None):
            raise ValueError("a decoder job without x must decode from a seed")
        if job.x is not None:
            _check_array(job.x, (3, size, size), "x")
        _check_array(job.z, (z_dim,), "z")
        return await self.run_batch(job)

    def _inputs(self, jobs: Sequence[DecoderJob]) -> torch.Tensor:
        """The jobs' images or x_T, drawing x_T from each seed the way DiffAE.sample draws its noise."""
        rows = [torch.from_numpy(np.array(j.x, dtype=np.float32)) if j.x is not None
                else self.model.sample_noise(1, torch.Generator().manual_seed(j.seed))[1][0] for j in jobs]
        return torch.stack(rows)

    def _run_groups(self, jobs: Sequence[DecoderJob]) -> tuple[list[np.ndarray], dict[tuple[str, int], tuple[int, float]]]:
        """Per-job [3,H,W] results in job order, and for each (op, steps) group its size and wall seconds."""
        results: list[np.ndarray] = [np.empty(0, np.float32)] * len(jobs)
        groups: dict[tuple[str, int], tuple[int, float]] = {}
        for (op, steps), idx in group_indices([job.group for job in jobs]).items():
            start = time.perf_counter()
            x, z = self._inputs([jobs[i] for i in idx]).to(self.device), stack([jobs[i].z for i in idx]).to(self.device)
            fn = self.model.encode_stochastic if op == "invert" else self.model.decode
            out = run_padded(lambda xx, zz, fn=fn, steps=steps: fn(xx, zz, steps=steps), x, z, pad_to=self.pad_to)
            for row, i in zip(out.float().cpu().numpy(), idx, strict=True):
                results[i] = row
            groups[(op, steps)] = (len(idx), time.perf_counter() - start)
        return results, groups

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def run_batch(self, jobs: list[DecoderJob]) -> list[tuple[np.ndarray, int]]:
        results, groups = await asyncio.to_thread(self._run_groups, jobs)
        for (op, steps), (count, seconds) in groups.items():
            self.metrics.record(op, count, seconds, denoise_steps=steps * count)
        return [(results[i], groups[job.group][0]) for i, job in enumerate(jobs)]

    async def check_health(self) -> None:
        size = self.model.image_size
        t = torch.zeros(1, dtype=torch.int64)
        out = await asyncio.to_thread(self.model.predict_noise, torch.zeros(1, 3, size, size), t,
                                      torch.zeros(1, self.model.config.z_dim))
        _check_finite(out, "decoder")


@serve.deployment
class Classifier(_Replica):
    """Attribute logits and manipulation on z_sem. A bundle without a classifier gives an idle replica
    (the ingress answers 404 for its routes, from the manifest)."""

    def __init__(self, bundle: str, s3_endpoint: str | None, replica: dict) -> None:
        has_head = CLASSIFIER in read_manifest(bundle, s3_endpoint)["files"]
        self.model = self._load(bundle, s3_endpoint, ("classifier",) if has_head else (), replica)

    def attribute_names(self) -> list[str]:
        self._require()
        return self.model.attributes

    def _require(self) -> None:
        if self.model.classifier is None:
            raise RuntimeError("this bundle has no classifier: train one with `diffae train classifier`")

    def classify(self, z: np.ndarray) -> np.ndarray:
        """Logits [B,A] for raw z_sem [B,Z]."""
        self._require()
        start = time.perf_counter()
        logits = self.model.classify(torch.from_numpy(np.array(z, dtype=np.float32))).cpu().numpy()
        self.metrics.record("classify", len(z), time.perf_counter() - start)
        return logits

    def manipulate(self, z: np.ndarray, edits: Sequence[tuple[int, float]]) -> np.ndarray:
        """z_sem [B,Z] moved by each (attribute index, alpha) in turn (steps along several attributes add up)."""
        self._require()
        names = self.model.attributes
        start = time.perf_counter()
        moved = torch.from_numpy(np.array(z, dtype=np.float32))
        for index, alpha in edits:
            if not 0 <= index < len(names):
                raise ValueError(f"attribute index {index} out of range [0, {len(names)})")
            moved = self.model.manipulate(moved, index, alpha)
        self.metrics.record("manipulate", len(z), time.perf_counter() - start)
        return moved.cpu().numpy()

    def check_health(self) -> None:
        if self.model.classifier is not None:
            _check_finite(self.model.classify(torch.zeros(1, self.model.config.z_dim)), "classifier")


@serve.deployment
class LatentSampler(_Replica):
    """Unconditional z_sem from the latent DPM plus the image noise for decoding, from one seed."""

    def __init__(self, bundle: str, s3_endpoint: str | None, replica: dict) -> None:
        has_latent = LATENT in read_manifest(bundle, s3_endpoint)["files"]
        self.model = self._load(bundle, s3_endpoint, ("latent",) if has_latent else (), replica)

    def sample(self, n: int, latent_steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(z_sem [n,Z], x_T [n,3,H,W]) float32 for ``n`` samples drawn from ``seed``: decoding them gives
        ``DiffAE.sample(n, latent_steps=..., generator=torch.Generator().manual_seed(seed))``."""
        if self.model.latent_net is None:
            raise RuntimeError("this bundle has no latent DPM: train one with `diffae train latent`")
        if not (1 <= n <= 1024 and 1 <= latent_steps <= self.model.latent_diffusion.T):
            raise ValueError(f"bad sample request: n={n}, latent_steps={latent_steps}")
        start = time.perf_counter()
        latent_noise, noise = self.model.sample_noise(n, torch.Generator().manual_seed(seed))
        z = self.model.sample_latent(n, latent_steps, latent_noise=latent_noise)
        self.metrics.record("sample_latent", n, time.perf_counter() - start, denoise_steps=latent_steps * n)
        return z.float().cpu().numpy(), noise.numpy()

    def check_health(self) -> None:
        if self.model.latent_net is not None:
            out = self.model.predict_latent_noise(torch.zeros(1, self.model.config.z_dim),
                                                  torch.zeros(1, dtype=torch.int64))
            _check_finite(out, "latent net")
