"""Linear attribute classifier on normalised z_sem, and the manipulation direction it defines."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class AttributeClassifier(nn.Module):
    """logits = W ((z - z_mean) / z_std) + b.

    The statistics are the classifier's own (the ones it was trained with), not necessarily the
    latent DPM's. z: [B, Z] raw z_sem. Returns [B, A] logits (sigmoid -> attribute probability).
    """

    def __init__(self, z_dim: int, num_attributes: int):
        super().__init__()
        self.linear = nn.Linear(z_dim, num_attributes)
        self.register_buffer("z_mean", torch.zeros(z_dim))
        self.register_buffer("z_std", torch.ones(z_dim))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.z_mean) / self.z_std

    def denormalize(self, z_n: torch.Tensor) -> torch.Tensor:
        return z_n * self.z_std + self.z_mean

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(self.normalize(z))

    def manipulate(self, z: torch.Tensor, index: int, alpha: float | torch.Tensor) -> torch.Tensor:
        """Step ``alpha * sqrt(Z)`` along the unit row ``index`` of W in normalised z space.

        z: [B, Z] raw z_sem; alpha: scalar or [B]. Returns [B, Z] raw z_sem.
        """
        direction = F.normalize(self.linear.weight[index][None, :], dim=1)
        alpha = torch.as_tensor(alpha, dtype=z.dtype, device=z.device).reshape(-1, 1)
        z_n = self.normalize(z) + alpha * math.sqrt(z.shape[1]) * direction
        return self.denormalize(z_n)


def resolve_attribute(attributes: Sequence[str], attribute: str | int) -> int:
    """Index of an attribute given by name or index, with an error listing the valid names."""
    if isinstance(attribute, int) and not isinstance(attribute, bool):
        if not 0 <= attribute < len(attributes):
            raise IndexError(f"attribute index {attribute} out of range [0, {len(attributes)})")
        return attribute
    try:
        return list(attributes).index(attribute)
    except ValueError:
        raise KeyError(f"unknown attribute {attribute!r}; this classifier knows: {list(attributes)}") from None
