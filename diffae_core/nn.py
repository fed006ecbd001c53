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
    """GroupNorm computed in float32 and cast back, so reduced-precision runs keep stable statistics.

    The channels_last CPU inference maps where ATen's NHWC GroupNorm kernel is slow (:func:`uses_rows`) go
    through :func:`group_norm_rows`; anything else through ``F.group_norm``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if uses_rows(xf):
            b, c = x.shape[:2]
            return group_norm_nhwc(xf, self.num_groups, self.weight.expand(b, c), self.bias.expand(b, c),
                                   self.eps).to(x.dtype)
        return F.group_norm(xf, self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


def nhwc_inference(x: torch.Tensor) -> bool:
    """Whether x is a float32 CPU [B, C, H, W] stored channels_last (and not also NCHW-contiguous, as
    1x1 maps are) outside autograd: such maps take the position-major attention and oneDNN for every
    convolution (:class:`Conv2d`)."""
    return (x.dim() == 4 and x.dtype == torch.float32 and x.device.type == "cpu"
            and not (x.requires_grad and torch.is_grad_enabled())
            and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())


def uses_rows(x: torch.Tensor) -> bool:
    """Whether x takes the position-major GroupNorm (:func:`group_norm_nhwc`): an :func:`nhwc_inference`
    map of at least 2 examples and at most 16x16 positions. Measured at one thread (benchmarks/RESULTS.md),
    ATen's channels_last GroupNorm (+ the AdaGN addcmul) is 1.1-3x slower than it there ([8, 64, 16, 16]:
    0.21 vs 0.08 ms), but faster at 32x32 ([8, 64, 32, 32]: 0.18 vs 0.23 ms) and for single images, where
    the rows path's ~20 small ops cost more than they save. In training its backward was no faster than
    ATen's (ffhq64 b4 step 3.08 vs 2.97 s), so training keeps ATen's kernels."""
    return nhwc_inference(x) and x.shape[0] > 1 and x.shape[2] * x.shape[3] <= 256


def group_norm_nhwc(x: torch.Tensor, groups: int, scale: torch.Tensor, shift: torch.Tensor,
                    eps: float) -> torch.Tensor:
    """:func:`group_norm_rows` of a channels_last x [B, C, H, W]; returns channels_last [B, C, H, W].

    The [B, H*W, C] row view of a channels_last map is free (it is its memory order)."""
    b, c, h, w = x.shape
    rows = group_norm_rows(x.permute(0, 2, 3, 1).reshape(b, h * w, c), groups, scale, shift, eps)
    return rows.view(b, h, w, c).permute(0, 3, 1, 2)


def group_norm_rows(x: torch.Tensor, groups: int, scale: torch.Tensor, shift: torch.Tensor,
                    eps: float) -> torch.Tensor:
    """GroupNorm of position-major x [B, N, C] (N positions), then ``* scale + shift`` per (example, channel).

    scale, shift: [B, C]. Statistics are over the N positions and the C // groups channels of a group,
    two-pass (mean, then the mean square of x - mean) like ATen's, with the biased variance. Every pass
    over the map runs along C, the unit-stride dim, so it vectorises where ATen's channels_last kernel
    does not. Plain differentiable ops: autograd derives the backward.
    """
    b, n, c = x.shape
    count = n * (c // groups)
    mean = x.sum(1).view(b, groups, -1).sum(-1, keepdim=True) / count  # [B, G, 1]
    centred = x - _per_channel(mean, c)
    var = (centred * centred).sum(1).view(b, groups, -1).sum(-1, keepdim=True) / count
    rstd = _per_channel(torch.rsqrt(var + eps), c)  # [B, 1, C]
    return torch.addcmul(shift[:, None, :], centred, rstd * scale[:, None, :])


def _per_channel(group_values: torch.Tensor, channels: int) -> torch.Tensor:
    """[B, G, 1] per-group values repeated over each group's channels: [B, 1, C]."""
    b, g, _ = group_values.shape
    return group_values.expand(b, g, channels // g).reshape(b, 1, channels)


def modulated_group_norm(
    x: torch.Tensor, norm: GroupNorm32, scale: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """``norm(x) * scale + shift`` with one multiply-add over x, computed in float32 like GroupNorm32.

    x: [B, C, H, W]; scale, shift: [B, C, 1, 1]. The norm's own affine (weight, bias) is folded into the
    per-(example, channel) scale and shift, so the feature map is normalised without affine and then
    touched once (``addcmul``) instead of three times. channels_last CPU maps take :func:`group_norm_nhwc`.
    """
    xf = x.float()
    if uses_rows(xf):
        b, c = x.shape[:2]
        scale, shift = scale.expand(b, c, 1, 1).reshape(b, c), shift.expand(b, c, 1, 1).reshape(b, c)
        return group_norm_nhwc(xf, norm.num_groups, norm.weight.float() * scale,
                               norm.bias.float() * scale + shift, norm.eps).to(x.dtype)
    weight = norm.weight.float()[:, None, None]
    bias = norm.bias.float()[:, None, None]
    n = F.group_norm(xf, norm.num_groups, None, None, norm.eps)
    return torch.addcmul(bias * scale + shift, n, weight * scale).to(x.dtype)


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU training mask costs a quarter of ATen's.

    On the CPU, ATen draws the mask with ``bernoulli_``, which at one thread takes about as long as a
    3x3 convolution's forward over the same feature map. Here the mask comes from one 32-bit uniform
    integer per element (``random_`` on an int64 buffer, so still torch's generator and
    ``torch.manual_seed``): an element is kept when its integer is at least ``round(p * 2**32)`` above
    the minimum, i.e. with probability 1 - p to within 2**-33, and kept elements are scaled by 1/(1 - p)
    like ``F.dropout``. Eval mode and p = 0 return x itself, as ``F.dropout`` does (without its call);
    other devices and p = 1 use ``F.dropout``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x  # what F.dropout returns here, without its call
        if x.device.type != "cpu" or self.p >= 1.0:
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


ONEDNN = torch.backends.mkldnn.is_available()  # oneDNN (MKL-DNN) is compiled into this torch
# the ops behind Inductor's CPU freezing: a convolution with a weight already in oneDNN's blocked layout
PREPACKED = ONEDNN and all(hasattr(torch.ops.mkldnn, op) for op in ("_convolution_pointwise",
                                                                      "_reorder_convolution_weight"))


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that convolves a channels_last float32 CPU map with oneDNN whatever its size.

    ATen picks oneDNN for most channels_last CPU maps but sends two kinds to its im2col + GEMM path at
    one thread: 1x1 kernels below batch 16, and batch-1 maps under 20480 elements. There oneDNN is about
    2x faster here (a [8, 64, 32, 32] 1x1 conv: 0.18 vs 0.38 ms; [1, 64, 16, 16] 3x3: 0.13 vs 0.23 ms),
    with the same weights and a different summation order only. Anything else, maps under autograd and
    calls under CPU autocast (bf16 inference) take ``nn.Conv2d``'s own path. The parameters are nn.Conv2d's, so state_dict keys do not change.

    ``frozen`` (set by :func:`diffae_core.performance.freeze` for models whose weights no longer change,
    as a serving replica's): oneDNN also gets the weight already reordered into its blocked layout, once
    per input shape, instead of reordering it on every call ([1, 128, 8, 8] -> 64 channels, 3x3: 56 vs
    86 us; the same numbers). The reordered copy is rebuilt when the weight is replaced or changed in
    place (its version counter), but not after writes through ``weight.data``.
    """

    frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (ONEDNN and nhwc_inference(x) and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and not torch.is_autocast_enabled("cpu")):  # autocast casts for aten::conv2d, not for these ops
            return super().forward(x)
        if self.frozen and PREPACKED:
            return torch.ops.mkldnn._convolution_pointwise(x, self._prepacked_weight(x), self.bias, self.padding,
                                                           self.stride, self.dilation, self.groups, "none", [], "")
        return torch.ops.aten.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride,
                                                 self.dilation, self.groups)

    def _prepacked_weight(self, x: torch.Tensor) -> torch.Tensor:
        """The weight in oneDNN's layout for x's shape (an opaque mkldnn tensor), cached with its key."""
        key = (self.weight.data_ptr(), self.weight._version, tuple(x.shape))
        cached = self.__dict__.get("_prepacked")
        if cached is None or cached[0] != key:
            packed = torch.ops.mkldnn._reorder_convolution_weight(self.weight, self.padding, self.stride,
                                                                 self.dilation, self.groups, list(x.shape))
            cached = self.__dict__["_prepacked"] = (key, packed)  # one assignment: threads see a matching pair
        return cached[1]

    def __getstate__(self) -> dict:
        """Pickles and deep copies without the cached opaque weight (it is rebuilt on the next call)."""
        return {k: v for k, v in super().__getstate__().items() if k != "_prepacked"}


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
