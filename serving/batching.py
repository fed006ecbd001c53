"""How requests share a model call: the Decoder's job type, grouping by DDIM walk, stacking and padding.

Requests travel between replicas as numpy arrays, one request per item, so that ``@serve.batch`` can stack
them. Every request carries its own noise (or the seed it is drawn from), so its answer does not depend on
which other requests shared its batch beyond float summation order.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

DECODER_OPS = ("invert", "decode")


@dataclass(frozen=True)
class DecoderJob:
    """One image for the Decoder: ``invert`` x0 -> x_T, or ``decode`` x_T -> x0, both conditioned on z.

    x: [3,H,W] float32 (x0 in [-1,1] for invert, x_T for decode), or None for ``decode`` from noise drawn
    from ``seed`` (as ``DiffAE.sample_noise`` draws it); z: [Z] float32; steps: DDIM steps.
    """

    op: str
    steps: int
    x: np.ndarray | None
    z: np.ndarray
    seed: int | None = None

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
    (oneDNN picks kernels by shape).
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
