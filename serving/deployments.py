"""The model deployments: Encoder (z_sem), Decoder (DDIM inversion and decoding), Classifier (logits,
manipulation) and LatentSampler (latent DDIM). Each loads only its part of the bundle.

Encoder and Decoder batch dynamically with ``@serve.batch``; the model arithmetic lives in
``serving.compute`` (plain functions) and runs in a worker thread, so the replica's event loop keeps
collecting the next batch and answering health checks while a batch computes. Every batched call
returns ``(result, batch_size)`` so callers can see how their request was batched.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import numpy as np
import ray
import torch
from ray import serve

from diffae_core.bundle import CLASSIFIER, LATENT, load_part, read_manifest
from diffae_core.diffusion import GaussianDiffusion

from . import compute
from .metrics import ModelMetrics


def _init_replica(threads: int) -> ModelMetrics:
    # Replicas share the machine's cores: pin intra-op threads so replicas do not oversubscribe them.
    torch.set_num_threads(threads)
    return ModelMetrics()


def _check_array(x: np.ndarray, shape: tuple[int, ...], what: str) -> None:
    if not isinstance(x, np.ndarray) or x.shape != shape or x.dtype != np.float32:
        got = (x.shape, x.dtype) if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"{what} must be a float32 array of shape {shape}, got {got}")


class _Replica:
    """Identity of the replica a call landed on: operators (and the failure test) use it to find the actor."""

    def replica_actor_name(self) -> str:
        return ray.get_runtime_context().get_actor_name()


@serve.deployment
class Encoder(_Replica):
    """z_sem for images: ``encode(x [3,H,W] float32 in [-1,1]) -> (z [Z], batch_size)``."""

    def __init__(self, bundle: str, s3_endpoint: str | None, batching: dict, threads: int) -> None:
        self.metrics = _init_replica(threads)
        part = load_part(bundle, "encoder", endpoint=s3_endpoint)
        self.encoder, self.size = part.module, part.config.image_size
        self.pad_to = batching["max_batch_size"] if batching["pad_batches"] else None
        self.encode_batch.set_max_batch_size(batching["max_batch_size"])
        self.encode_batch.set_batch_wait_timeout_s(batching["batch_wait_timeout_s"])

    async def encode(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        _check_array(x, (3, self.size, self.size), "image")
        return await self.encode_batch(x)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def encode_batch(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, int]]:
        start = time.perf_counter()
        z = await asyncio.to_thread(compute.encode, self.encoder, compute.stack(images), self.pad_to)
        self.metrics.record("encode", len(images), time.perf_counter() - start)
        return [(row, len(images)) for row in z.numpy()]

    async def check_health(self) -> None:
        z = await asyncio.to_thread(compute.encode, self.encoder, compute.smoke_images(self.size))
        compute.check_finite(z, "encoder")


@serve.deployment
class Decoder(_Replica):
    """DDIM inversion and decoding: ``run(DecoderJob) -> (x [3,H,W], batch_size)``.

    A batch is split by (op, steps): one DDIM loop per group, so jobs only share a network call with
    jobs that walk the same timesteps.
    """

    def __init__(self, bundle: str, s3_endpoint: str | None, batching: dict, threads: int) -> None:
        self.metrics = _init_replica(threads)
        part = load_part(bundle, "unet", endpoint=s3_endpoint)
        self.unet, self.config = part.module, part.config
        self.diffusion = GaussianDiffusion(part.config.diffusion)
        self.pad_to = batching["max_batch_size"] if batching["pad_batches"] else None
        self.run_batch.set_max_batch_size(batching["max_batch_size"])
        self.run_batch.set_batch_wait_timeout_s(batching["batch_wait_timeout_s"])

    async def run(self, job: compute.DecoderJob) -> tuple[np.ndarray, int]:
        size, z_dim = self.config.image_size, self.config.z_dim
        if job.op not in compute.DECODER_OPS or not 1 <= job.steps <= self.diffusion.T:
            raise ValueError(f"bad decoder job: op {job.op!r} (one of {compute.DECODER_OPS}), steps {job.steps}")
        _check_array(job.x, (3, size, size), "x")
        _check_array(job.z, (z_dim,), "z")
        return await self.run_batch(job)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def run_batch(self, jobs: list[compute.DecoderJob]) -> list[tuple[np.ndarray, int]]:
        results, groups = await asyncio.to_thread(compute.run_decoder_jobs, self.unet, self.diffusion, jobs, self.pad_to)
        for (op, steps), (count, seconds) in groups.items():
            self.metrics.record(op, count, seconds, denoise_steps=steps * count)
        return [(results[i], groups[job.group][0]) for i, job in enumerate(jobs)]

    async def check_health(self) -> None:
        size = self.config.image_size

        def forward() -> torch.Tensor:
            with torch.inference_mode():
                return self.unet(compute.smoke_images(size), torch.zeros(1, dtype=torch.int64),
                                 torch.zeros(1, self.config.z_dim))

        compute.check_finite(await asyncio.to_thread(forward), "decoder")


@serve.deployment
class Classifier(_Replica):
    """Attribute logits and manipulation on z_sem. A bundle without a classifier gives an idle replica
    (the ingress answers 404 for its routes, from the manifest)."""

    def __init__(self, bundle: str, s3_endpoint: str | None, threads: int) -> None:
        self.metrics = _init_replica(threads)
        self.head = None
        if CLASSIFIER in read_manifest(bundle, s3_endpoint)["files"]:
            part = load_part(bundle, "classifier", endpoint=s3_endpoint)
            self.head, self.attributes, self.z_dim = part.module, list(part.config.attributes), part.config.z_dim

    def attribute_names(self) -> list[str]:
        self._require()
        return self.attributes

    def _require(self) -> None:
        if self.head is None:
            raise RuntimeError("this bundle has no classifier: train one with `diffae train classifier`")

    def classify(self, z: np.ndarray) -> np.ndarray:
        """Logits [B,A] for raw z_sem [B,Z]."""
        self._require()
        start = time.perf_counter()
        logits = compute.classify(self.head, torch.from_numpy(np.array(z, dtype=np.float32))).numpy()
        self.metrics.record("classify", len(z), time.perf_counter() - start)
        return logits

    def manipulate(self, z: np.ndarray, edits: Sequence[tuple[int, float]]) -> np.ndarray:
        """z_sem [B,Z] moved along (attribute index, alpha) directions."""
        self._require()
        for index, _ in edits:
            if not 0 <= index < len(self.attributes):
                raise ValueError(f"attribute index {index} out of range [0, {len(self.attributes)})")
        start = time.perf_counter()
        moved = compute.manipulate(self.head, torch.from_numpy(np.array(z, dtype=np.float32)), edits).numpy()
        self.metrics.record("manipulate", len(z), time.perf_counter() - start)
        return moved

    def check_health(self) -> None:
        if self.head is not None:
            compute.check_finite(compute.classify(self.head, torch.zeros(1, self.z_dim)), "classifier")


@serve.deployment
class LatentSampler(_Replica):
    """Unconditional z_sem from the latent DPM plus the image noise for decoding, from one seed."""

    def __init__(self, bundle: str, s3_endpoint: str | None, threads: int) -> None:
        self.metrics = _init_replica(threads)
        self.net = None
        if LATENT in read_manifest(bundle, s3_endpoint)["files"]:
            part = load_part(bundle, "latent", endpoint=s3_endpoint)
            self.net, self.config = part.module, part.config
            self.z_mean, self.z_std = part.stats["z_mean"], part.stats["z_std"]
            self.diffusion = GaussianDiffusion(part.config.latent_diffusion)

    def sample(self, n: int, latent_steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(z_sem [n,Z], x_T [n,3,H,W]) float32 for ``n`` samples drawn from ``seed``."""
        if self.net is None:
            raise RuntimeError("this bundle has no latent DPM: train one with `diffae train latent`")
        if not (1 <= n <= 1024 and 1 <= latent_steps <= self.diffusion.T):
            raise ValueError(f"bad sample request: n={n}, latent_steps={latent_steps}")
        size = self.config.image_size
        start = time.perf_counter()
        z, noise = compute.sample_latents(self.net, self.diffusion, self.z_mean, self.z_std, n, latent_steps, seed,
                                      (3, size, size))
        self.metrics.record("sample_latent", n, time.perf_counter() - start, denoise_steps=latent_steps * n)
        return z.numpy(), noise.numpy()

    def check_health(self) -> None:
        if self.net is not None:
            with torch.inference_mode():
                out = self.net(torch.zeros(1, self.z_mean.shape[0]), torch.zeros(1, dtype=torch.int64))
            compute.check_finite(out, "latent net")
