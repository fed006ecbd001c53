"""The latent DPM network: an MLP skip-net that predicts epsilon for normalised z_sem."""

from __future__ import annotations

import torch
from torch import nn

from .config import LatentConfig
from .nn import Dropout, timestep_embedding


class LatentLayer(nn.Module):
    """Linear -> (time scale ``* (condition_bias + W_e SiLU(c))``) -> LayerNorm -> SiLU.

    The last layer of the net is a plain Linear (no condition, norm or activation). Official key
    names: ``linear``, ``linear_emb`` (the official file also stores it as ``cond_layers.1``), ``norm``.
    """

    def __init__(self, in_ch: int, out_ch: int, cond_ch: int, *, hidden: bool, cfg: LatentConfig):
        super().__init__()
        self.hidden = hidden
        self.condition_bias = cfg.condition_bias
        self.linear = nn.Linear(in_ch, out_ch)
        if hidden:
            self.linear_emb = nn.Linear(cond_ch, out_ch)
            self.norm: nn.Module = nn.LayerNorm(out_ch) if cfg.use_norm else nn.Identity()
            self.act: nn.Module = nn.SiLU()
            self.dropout: nn.Module = Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
            # Kaiming-normal (fan_in, ReLU gain) for hidden layers, as the official initialisation
            for lin in (self.linear, self.linear_emb):
                nn.init.kaiming_normal_(lin.weight, a=0, nonlinearity="relu")

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        if not self.hidden:
            return x
        x = x * (self.condition_bias + self.linear_emb(torch.nn.functional.silu(cond)))
        return self.dropout(self.act(self.norm(x)))


class LatentMLP(nn.Module):
    """eps_hat = net(z_t, t) on normalised z.

    z_t: [B, num_channels]; t: [B] int64 original timesteps. Layers in ``skip_layers`` take
    ``concat[h, z_t]`` (hidden first). Returns [B, num_channels].
    """

    def __init__(self, cfg: LatentConfig):
        super().__init__()
        self.cfg = cfg
        c, hid = cfg.num_channels, cfg.num_hid_channels
        self.skip_layers = frozenset(cfg.resolved_skip_layers)
        self.time_embed = nn.Sequential(nn.Linear(cfg.num_time_emb_channels, c), nn.SiLU(), nn.Linear(c, c))
        layers = []
        for i in range(cfg.num_layers):
            last = i == cfg.num_layers - 1
            in_ch = c if i == 0 else hid
            if i in self.skip_layers:
                in_ch += c
            layers.append(LatentLayer(in_ch, c if last else hid, c, hidden=not last, cfg=cfg))
        self.layers = nn.ModuleList(layers)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond = self.time_embed(timestep_embedding(t, self.cfg.num_time_emb_channels))
        h = z_t
        for i, layer in enumerate(self.layers):
            if i in self.skip_layers:
                h = torch.cat([h, z_t], dim=1)
            h = layer(h, cond)
        return h
