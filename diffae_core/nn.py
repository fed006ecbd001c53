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


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU training mask costs a quarter of ATen's.

    On the CPU, ATen draws the mask with ``bernoulli_``, which at one thread takes about as long as a
    3x3 convolution's forward over the same feature map. Here the mask comes from one 32-bit uniform
    integer per element (``random_`` on an int64 buffer, so still torch's generator and
    ``torch.manual_seed``): an element is kept when its integer is at least ``round(p * 2**32)`` above
    the minimum, i.e. with probability 1 - p to within 2**-33, and kept elements are scaled by 1/(1 - p)
    like ``F.dropout``. Other devices, eval mode and p in {0, 1} use ``F.dropout``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cpu" or not 0.0 < self.p < 1.0:
            return super().forward(x)
        return x * dropout_mask(x, self.p)


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A mask shaped like x [B, C, H, W] (any shape), in x's dtype: 0 with probability p, else 1 / (1 - p).

    The elements are independent, so the mask is laid out in x's memory order (NHWC for channels_last
    x) and the multiply with x runs over both in order."""
    n = x.numel()
    bits = torch.empty((n + 1) // 2, dtype=torch.int64, device=x.device).random_(-(2**63), None)
    keep = bits.view(torch.int32)[:n] >= -(2**31) + round(p * 2**32)
    # the bool's uint8 view converts to float in one vector pass (a bool tensor does not)
    mask = keep.view(torch.uint8).to(x.dtype).mul_(1.0 / (1.0 - p))
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        b, c, h, w = x.shape
        return mask.view(b, h, w, c).permute(0, 3, 1, 2)
    return mask.view(x.shape)


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
