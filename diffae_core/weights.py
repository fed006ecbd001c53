"""The weights of a Diff-AE as plain tensors: what readers hand to ``DiffAE.from_weights`` and writers take.

Both formats we read (our bundle, the official Lightning checkpoints) turn their files into one
:class:`ModelWeights`, and ``DiffAE.from_weights`` builds the networks from it, so there is one place where
weights meet modules and one way a mismatch is reported (:class:`WeightsMismatch`, every differing key).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .config import ModelConfig

StateDict = dict[str, torch.Tensor]


@dataclass
class LatentWeights:
    """The latent DPM: ``state`` of a LatentMLP and the z_sem statistics it was trained with (mean, std [Z])."""

    state: StateDict
    mean: torch.Tensor
    std: torch.Tensor


@dataclass
class ClassifierWeights:
    """A linear attribute head on normalised z_sem: weight [A,Z], bias [A], its own z_mean / z_std [Z]."""

    weight: torch.Tensor
    bias: torch.Tensor
    z_mean: torch.Tensor
    z_std: torch.Tensor
    attributes: tuple[str, ...]


@dataclass
class ModelWeights:
    """A model's config and the state of each network it has (None: not part of this model)."""

    config: ModelConfig
    encoder: StateDict | None = None
    unet: StateDict | None = None
    latent: LatentWeights | None = None
    classifier: ClassifierWeights | None = None


class WeightsMismatch(ValueError):
    """A state dict does not fit the network its config describes; ``problems`` lists every difference."""

    def __init__(self, part: str, problems: list[str]) -> None:
        shown = "\n  ".join(problems[:30]) + (f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else "")
        super().__init__(f"{part}: {len(problems)} difference(s) between the weights and the network:\n  {shown}")
        self.part, self.problems = part, problems


def differences(module: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Every key and shape that differs between ``module.state_dict()`` and ``state`` (empty: they fit)."""
    have = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in state.items()}
    problems = [f"missing in file: {k} {have[k]}" for k in sorted(set(have) - set(want))]
    problems += [f"unexpected in file: {k} {want[k]}" for k in sorted(set(want) - set(have))]
    problems += [f"shape: {k} file {want[k]} vs network {have[k]}"
                 for k in sorted(set(have) & set(want)) if have[k] != want[k]]
    return problems


def load_checked(module: nn.Module, state: Mapping[str, torch.Tensor], part: str) -> None:
    """``module.load_state_dict(state)`` after checking that every key and shape fits (WeightsMismatch)."""
    problems = differences(module, state)
    if problems:
        raise WeightsMismatch(part, problems)
    module.load_state_dict(state, strict=True)
