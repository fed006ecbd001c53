"""Model logic of the deployments as plain functions (no Ray): unit tests call them directly.

Images are [B,3,H,W] float32 in [-1,1]; z_sem is [B,Z]; x_T has the image's shape. Each function runs
under ``torch.inference_mode`` on the networks of one bundle part (``diffae_core.bundle.load_part``).
Requests travel between replicas as numpy arrays, one request per item, so that ``@serve.batch`` can
stack them; the functions here take and return stacked tensors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from diffae_core.classifier import AttributeClassifier
from diffae_core.diffusion import GaussianDiffusion
from diffae_core.encoder import SemanticEncoder
from diffae_core.latent import LatentMLP
from diffae_core.unet import ConditionalUNet

DECODER_OPS = ("invert", "decode")


@dataclass(frozen=True)
class DecoderJob:
    """One image for the Decoder: ``invert`` x0 -> x_T, or ``decode`` x_T -> x0, both conditioned on z.

    x: [3,H,W] float32 (x0 in [-1,1] for invert, x_T for decode); z: [Z] float32; steps: DDIM steps.
    """

    op: str
    steps: int
    x: np.ndarray
    z: np.ndarray

    @property
    def group(self) -> tuple[str, int]:
        """Jobs are batched together only when op and steps agree (one DDIM loop per group)."""
        return self.op, self.steps


def stack(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """Per-request float32 arrays -> one batch tensor. Copies: Serve hands over read-only arrays."""
    return torch.from_numpy(np.stack([np.asarray(a, dtype=np.float32) for a in arrays]))


def run_padded(fn: Callable[..., torch.Tensor], *batches: torch.Tensor, pad_to: int | None) -> torch.Tensor:
    """fn(*batches) with every batch zero-padded to ``pad_to`` rows; returns the first B rows.

    With a fixed shape each row's arithmetic does not depend on how many requests shared the batch
    (oneDNN picks kernels by shape), so padded results are bit-identical alone or batched.
    """
    n = batches[0].shape[0]
    if pad_to is None or pad_to <= n:
        return fn(*batches)
    padded = [torch.cat([b, b.new_zeros(pad_to - n, *b.shape[1:])]) for b in batches]
    return fn(*padded)[:n]


def group_indices(keys: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    """Indices of equal keys, in first-seen order: {key: [i, ...]}."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def encode(encoder: SemanticEncoder, x: torch.Tensor, pad_to: int | None = None) -> torch.Tensor:
    """z_sem [B,Z] for images x [B,3,H,W] in [-1,1]."""
    with torch.inference_mode():
        return run_padded(lambda xx: encoder(xx).float(), x.float(), pad_to=pad_to)


def invert(unet: ConditionalUNet, diffusion: GaussianDiffusion, x: torch.Tensor, z: torch.Tensor, steps: int,
           pad_to: int | None = None) -> torch.Tensor:
    """x_T [B,3,H,W] by DDIM inversion of x [B,3,H,W] in [-1,1] conditioned on z [B,Z] (``steps`` steps)."""
    with torch.inference_mode():
        return run_padded(lambda xx, zz: diffusion.ddim_invert(lambda x_t, t: unet(x_t, t, zz).float(), xx, steps),
                          x.float(), z.float(), pad_to=pad_to)


def decode(unet: ConditionalUNet, diffusion: GaussianDiffusion, x_T: torch.Tensor, z: torch.Tensor, steps: int,
           pad_to: int | None = None) -> torch.Tensor:
    """Images [B,3,H,W] in [-1,1] by ``steps``-step DDIM from x_T [B,3,H,W] conditioned on z [B,Z]."""
    with torch.inference_mode():
        return run_padded(lambda xx, zz: diffusion.ddim_sample(lambda x_t, t: unet(x_t, t, zz).float(), xx, steps),
                          x_T.float(), z.float(), pad_to=pad_to)


def run_decoder_jobs(unet: ConditionalUNet, diffusion: GaussianDiffusion, jobs: Sequence[DecoderJob],
                     pad_to: int | None = None
                     ) -> tuple[list[np.ndarray], dict[tuple[str, int], tuple[int, float]]]:
    """Run a batch of jobs, one DDIM loop per (op, steps) group.

    Returns the per-job [3,H,W] float32 arrays in job order, and for each group that ran its size and
    wall seconds.
    """
    results: list[np.ndarray] = [np.empty(0, np.float32)] * len(jobs)
    groups: dict[tuple[str, int], tuple[int, float]] = {}
    for (op, steps), idx in group_indices([job.group for job in jobs]).items():
        start = time.perf_counter()
        x, z = stack([jobs[i].x for i in idx]), stack([jobs[i].z for i in idx])
        fn = invert if op == "invert" else decode
        out = fn(unet, diffusion, x, z, steps, pad_to=pad_to).numpy()
        for row, i in enumerate(idx):
            results[i] = out[row]
        groups[(op, steps)] = (len(idx), time.perf_counter() - start)
    return results, groups


def request_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise of ``shape`` from the request's own generator (reproducible per seed)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def sample_latents(net: LatentMLP, diffusion: GaussianDiffusion, z_mean: torch.Tensor, z_std: torch.Tensor,
                   n: int, latent_steps: int, seed: int, image_shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_sem [n,Z], x_T [n,*image_shape]) for unconditional sampling, all noise from Generator(seed).

    Draws the latent noise first and the image noise second from one generator, as
    ``DiffAE.sample(n, generator=torch.Generator().manual_seed(seed))`` does, so the served samples
    match the library's. The latent DDIM runs without x0 clipping, then z is de-normalised.
    """
    generator = torch.Generator().manual_seed(seed)
    latent_noise = torch.randn(n, z_mean.shape[0], generator=generator)
    noise = torch.randn(n, *image_shape, generator=generator)
    with torch.inference_mode():
        z_n = diffusion.ddim_sample(lambda z_t, t: net(z_t, t).float(), latent_noise, latent_steps, clip=False)
    return z_n * z_std + z_mean, noise


def classify(head: AttributeClassifier, z: torch.Tensor) -> torch.Tensor:
    """Attribute logits [B,A] for raw z_sem [B,Z]."""
    with torch.inference_mode():
        return head(z.float()).float()


def manipulate(head: AttributeClassifier, z: torch.Tensor, edits: Sequence[tuple[int, float]]) -> torch.Tensor:
    """z_sem [B,Z] moved by alpha*sqrt(Z) along each (attribute index, alpha) unit direction, in the
    classifier's normalised space (steps along several attributes add up)."""
    with torch.inference_mode():
        z = z.float()
        for index, alpha in edits:
            if not math.isfinite(alpha):
                raise ValueError(f"alpha must be finite, got {alpha!r}")
            z = head.manipulate(z, index, alpha)
        return z


def smoke_images(size: int, batch: int = 1) -> torch.Tensor:
    """A fixed small input for health checks: [batch,3,size,size] zeros."""
    return torch.zeros(batch, 3, size, size)


def check_finite(x: torch.Tensor, what: str) -> None:
    """Raise RuntimeError if a health-check output holds NaN or inf (a broken replica must be replaced)."""
    if not torch.isfinite(x).all():
        raise RuntimeError(f"{what} produced non-finite values")
