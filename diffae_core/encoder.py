"""The semantic encoder: a half UNet that maps a clean image to z_sem."""

from __future__ import annotations

import torch
from torch import nn

from .config import EncoderConfig, UNetConfig
from .nn import Conv2d, norm_silu, normalization
from .unet import build_input_path, build_middle


class SemanticEncoder(nn.Module):
    """z_sem = encoder(x_0).

    The decoder's input path and middle block without time conditioning (single-conv ResBlocks),
    one more level than the decoder, then GroupNorm -> SiLU -> global average pool -> 1x1 conv.
    x: [B, 3, H, W] in [-1, 1] at ``image_size``. Returns [B, out_channels] (no normalisation).
    """

    def __init__(self, unet_cfg: UNetConfig, cfg: EncoderConfig):
        super().__init__()
        attention = unet_cfg.attention_resolutions if cfg.attention_resolutions is None else cfg.attention_resolutions
        res_kwargs = dict(use_condition=False)
        self.input_blocks, _, _, ch = build_input_path(
            image_size=unet_cfg.image_size,
            in_channels=unet_cfg.in_channels,
            model_channels=unet_cfg.model_channels,
            channel_mult=cfg.channel_mult,
            num_res_blocks=cfg.num_res_blocks,
            attention_resolutions=attention,
            num_heads=unet_cfg.num_heads,
            res_kwargs=res_kwargs,
        )
        self.middle_block = build_middle(ch, unet_cfg.num_heads, res_kwargs)
        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            Conv2d(ch, cfg.out_channels, 1),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for block in self.input_blocks:
            h = block(h)
        norm, _, *head = self.out  # GroupNorm32, SiLU, pool, 1x1 conv, flatten: the SiLU runs inside norm_silu
        h = norm_silu(norm, self.middle_block(h))
        for layer in head:
            h = layer(h)
        return h
