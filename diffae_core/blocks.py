"""Building blocks of the UNet and the encoder: ResBlock with two-condition AdaGN, attention.

Submodule names follow the official checkpoints (``in_layers.0``, ``emb_layers.1``,
``cond_emb_layers.1``, ``out_layers.3``, ``skip_connection``, ``norm``/``qkv``/``proj_out``) so that
official weights load by name.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .nn import (
    Conv2d,
    Downsample,
    Dropout,
    Upsample,
    adaptive_group_norm,
    nhwc_float32_cpu,
    norm_silu,
    normalization,
    zero_module,
)

# A ResBlock's AdaGN as one affine map of its normalised features: float32 scale and shift, [B, C] (or [1, C]
# when nothing varies over the batch), with the output GroupNorm's own weight and bias folded in.
Affine = tuple[torch.Tensor, torch.Tensor]


class ResBlock(nn.Module):
    """Residual block, optionally resampling and optionally conditioned on time and z_sem.

    Conditioned (decoder): ``h = (1 + z_s) * ((1 + t_s) * GN(h) + t_b)`` right after the output
    GroupNorm, then SiLU, dropout and a zero-initialised 3x3 conv. Unconditioned (encoder): a single
    conv branch ``skip(x) + Conv(SiLU(GN(x)))`` — the official encoder has no second conv.

    x: [B, C_in, H, W] (C_in includes the lateral channels when ``has_lateral``).
    emb: [B, emb_channels] time embedding; cond: [B, cond_channels] raw z_sem.
    """

    def __init__(
        self,
        channels: int,
        out_channels: int,
        *,
        emb_channels: int = 512,
        cond_channels: int = 512,
        dropout: float = 0.0,
        use_condition: bool = True,
        up: bool = False,
        down: bool = False,
        has_lateral: bool = False,
    ):
        super().__init__()
        self.use_condition = use_condition
        self.has_lateral = has_lateral
        self.out_channels = out_channels
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        self.resample: nn.Module = Upsample() if up else Downsample() if down else nn.Identity()
        if use_condition:
            self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
            self.cond_emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(cond_channels, out_channels))
            self.out_layers = nn.Sequential(
                normalization(out_channels),
                nn.SiLU(),
                Dropout(p=dropout),
                zero_module(Conv2d(out_channels, out_channels, 3, padding=1)),
            )
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = Conv2d(channels, out_channels, 1)

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        lateral: torch.Tensor | None = None,
        affine: Affine | None = None,
    ) -> torch.Tensor:
        """``affine``: this block's AdaGN already computed (:class:`diffae_core.unet.AdaGNSchedule`), in
        place of emb and cond."""
        if self.has_lateral:
            # current features first, skip features second: the conv weight layout depends on it
            x = torch.cat([x, lateral], dim=1)
        norm, _, conv = self.in_layers  # GroupNorm32, SiLU, Conv2d: the SiLU runs inside norm_silu
        if self.updown:
            h = conv(self.resample(norm_silu(norm, x)))
            x = self.resample(x)
        else:
            h = conv(norm_silu(norm, x))
        if self.use_condition:
            if affine is None and emb is not None:
                affine = self.adagn_affine(self.time_affine(emb), self.cond_factor(cond))
            h = self._modulate(h, affine)
        return self.skip_connection(x) + h

    def _modulate(self, h: torch.Tensor, affine: Affine | None) -> torch.Tensor:
        norm, _, dropout, conv = self.out_layers  # the SiLU runs inside the GroupNorm (one native kernel)
        h = norm_silu(norm, h) if affine is None else adaptive_group_norm(h, norm.num_groups, *affine, norm.eps,
                                                                          silu=True)
        return conv(dropout(h))

    def time_affine(self, emb: torch.Tensor) -> Affine:
        """The output GroupNorm's affine after the time modulation, for time embeddings emb [N, E]:
        float32 scale ``w (1 + t_s)`` and shift ``b (1 + t_s) + t_b``, each [N, C]."""
        t_scale, t_shift = self.emb_layers(emb).float().chunk(2, dim=1)
        norm = self.out_layers[0]
        t_scale = 1 + t_scale
        return norm.weight.float() * t_scale, torch.addcmul(t_shift, norm.bias.float(), t_scale)

    def cond_factor(self, cond: torch.Tensor | None) -> torch.Tensor | None:
        """``1 + z_s`` [B, C] float32 for raw z_sem cond [B, Z]; None for None."""
        return None if cond is None else 1 + self.cond_emb_layers(cond).float()

    @staticmethod
    def adagn_affine(time_affine: Affine, cond_factor: torch.Tensor | None) -> Affine:
        """AdaGN as one affine map per (example, channel) of the normalised features.

        ``(1 + z_s) * ((1 + t_s) * (w n + b) + t_b) == n * w (1 + t_s)(1 + z_s) + (b (1 + t_s) + t_b)(1 + z_s)``:
        folding GroupNorm's affine and both modulations together turns four passes over the feature map
        into one. z_sem only modulates when time does too (the official code ignores cond without emb).
        time_affine: [B, C] or [1, C] each; cond_factor: [B, C] or None.
        """
        scale, shift = time_affine
        if cond_factor is None:
            return scale, shift
        return scale * cond_factor, shift * cond_factor


class AttentionBlock(nn.Module):
    """Unconditioned self-attention over spatial positions with the legacy qkv channel layout.

    qkv is split per head first, then into q, k, v (channels [q_h, k_h, v_h] per head), and the
    logits are scaled by 1/sqrt(head_channels) — the official ``QKVAttentionLegacy``. Computed with
    ``F.scaled_dot_product_attention`` (within float32 tolerance of the einsum formulation, whose softmax
    runs in float32; for bf16/fp16 inputs SDPA's fused kernels accumulate the softmax in float32).
    """

    def __init__(self, channels: int, num_heads: int = 1):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> x + attention; a channels_last float32 CPU map stays position-major
        throughout (its [B, H*W, C] view is free; reshaping it to [B, C, L] would copy it), in inference
        and in training; anything else goes through the [B, C, L] reshape."""
        b, c, *spatial = x.shape
        if nhwc_float32_cpu(x):
            rows = x.permute(0, 2, 3, 1).reshape(b, -1, c)  # [B, L, C], a view
            normed = self.norm(x).permute(0, 2, 3, 1).reshape(b, -1, c)  # channels_last too: a view
            out = rows + self.attend_positions(normed)
            return out.view(b, *spatial, c).permute(0, 3, 1, 2)
        x = x.reshape(b, c, -1)
        return (x + self.attend(self.norm(x))).reshape(b, c, *spatial)

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        """proj_out(attention(qkv(h))) of the normalised h [B, C, L] -> [B, C, L]."""
        return self.attend_positions(h.transpose(1, 2)).transpose(1, 2)

    def attend_positions(self, h: torch.Tensor) -> torch.Tensor:
        """proj_out(attention(qkv(h))) of the normalised, position-major h [B, L, C] -> [B, L, C].

        The two 1x1 Conv1d run as linears over positions ([B, L, C] @ W^T, the conv's own weight): on the
        CPU a 1x1 Conv1d runs at a fraction of a matmul's speed, and position-major q, k, v (each [B, heads,
        L, head_ch] with unit stride in the last dim) are what SDPA's fused kernels take without a copy.
        """
        b, length, c = h.shape
        heads = self.num_heads
        head_ch = c // heads
        qkv = F.linear(h, self.qkv.weight[:, :, 0], self.qkv.bias)  # [B, L, 3C]
        q, k, v = qkv.view(b, length, heads, 3, head_ch).transpose(1, 2).unbind(dim=3)  # [B, heads, L, ch]
        a = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_ch), the official one
        a = a.transpose(1, 2).reshape(b, length, c)  # channels ordered (head, ch), as the official reshape
        return F.linear(a, self.proj_out.weight[:, :, 0], self.proj_out.bias)


class CondSequential(nn.Sequential):
    """A Sequential that hands time embedding, z_sem and lateral input (or precomputed AdaGN affines, one
    per ResBlock in order) to the ResBlocks inside it."""

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        emb: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        lateral: torch.Tensor | None = None,
        affines: Iterator[Affine] | None = None,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, cond, lateral, None if affines is None else next(affines))
            else:
                x = layer(x)
        return x
