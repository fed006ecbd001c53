"""Small layers shared by the decoder, the encoder and the latent net."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps.

    t: [B] original (not respaced) timesteps, integer or float. Returns [B, dim] float32 laid out as
    ``[cos(t*f_0..f_{h-1}), sin(t*f_0..f_{h-1})]`` (cosine first, as the official code), with
    f_k = max_period^(-k/h), h = dim // 2, and a zero column appended when dim is odd.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back, so reduced-precision runs keep stable statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


def modulated_group_norm(
    x: torch.Tensor, norm: GroupNorm32, scale: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """``norm(x) * scale + shift`` with one multiply-add over x, computed in float32 like GroupNorm32.

    x: [B, C, H, W]; scale, shift: [B, C, 1, 1]. The norm's own affine (weight, bias) is folded into the
    per-(example, channel) scale and shift, so the feature map is normalised without affine and then
    touched once (``addcmul``) instead of three times.
    """
    weight = norm.weight.float()[:, None, None]
    bias = norm.bias.float()[:, None, None]
    n = F.group_norm(x.float(), norm.num_groups, None, None, norm.eps)
    return torch.addcmul(bias * scale + shift, n, weight * scale).to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(min(32, channels), channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters in place (used for the last conv of residual branches)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class Upsample(nn.Module):
    """Nearest-neighbour x2 without a conv (the ResBlock does the convolving)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="nearest")


class Downsample(nn.Module):
    """2x2 average pooling, stride 2, without a conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, kernel_size=2, stride=2)
