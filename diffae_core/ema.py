"""Exponential moving average of a model's weights, updated with fused ``torch._foreach_*`` kernels."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps ``shadow = decay * shadow + (1 - decay) * online`` for every floating-point state entry.

    The official code averages all state_dict entries after every optimiser step with decay 0.9999
    and no warm-up. ``warmup_steps > 0`` ramps the decay linearly from 0 (shadow = online weights) to
    ``decay`` over that many updates, so a short run's EMA is not dominated by the random init.
    The update runs on device with no host synchronisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup_steps: int = 0):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.num_updates = 0
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)
        self._pairs = self._float_pairs(model)

    def _float_pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        online = model.state_dict(keep_vars=True)
        shadow = self.shadow.state_dict(keep_vars=True)
        keys = [k for k, v in online.items() if v is not None and v.is_floating_point()]
        return [shadow[k].data for k in keys], [online[k].data for k in keys]

    def current_decay(self) -> float:
        if self.warmup_steps <= 0:
            return self.decay
        return self.decay * min(1.0, self.num_updates / self.warmup_steps)

    @torch.no_grad()
    def update(self) -> None:
        """Call after each optimiser step."""
        decay = self.current_decay()
        shadow, online = self._pairs
        torch._foreach_lerp_(shadow, online, 1.0 - decay)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"shadow": self.shadow.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.shadow.load_state_dict(state["shadow"])
        self.num_updates = int(state["num_updates"])
