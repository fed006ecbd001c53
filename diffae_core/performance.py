"""Speed options that leave the math alone: channels_last, TF32, fused optimiser kernels, torch.compile.

    options = PerformanceOptions.for_device(device, 64)    # the measured (CPU) / documented (CUDA) best
    model = apply(model, options)                          # in place; state_dict keys do not change
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, **optimizer_kwargs(options))

None of them changes parameter names, so checkpoints, bundles and official imports load either way.
TF32 is the only one that changes numbers (matmuls and convs with a 10-bit mantissa on CUDA); it is
off on the CPU, where it does not exist. The CPU defaults are what benchmarks/compare_core.py measured
fastest on the project's CPU (benchmarks/RESULTS.md, "Core speed").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

OPTION_NAMES = ("channels_last", "tf32", "fused_optimizer", "compile")


@dataclass(frozen=True)
class PerformanceOptions:
    """channels_last: weights (hence activations) in NHWC, which oneDNN and cuDNN convolve faster;
    tf32: TF32 matmuls/convolutions on CUDA; fused_optimizer: Adam/AdamW's fused kernel (else foreach);
    compile: ``torch.compile`` each network in place (first steps pay the compilation)."""

    channels_last: bool = False
    tf32: bool = False
    fused_optimizer: bool = False
    compile: bool = False

    @classmethod
    def for_device(cls, device: torch.device | str, image_size: int | None = None) -> PerformanceOptions:
        """The defaults for ``device`` and a model of ``image_size`` px (None: a full-size preset)."""
        if torch.device(device).type == "cuda":
            # documented best on Ampere and later: TF32, fused AdamW, NHWC convolutions
            return cls(channels_last=True, tf32=True, fused_optimizer=True, compile=False)
        # measured on the project's (busy, 2-core) CPU, benchmarks/RESULTS.md "Core speed": NHWC convolutions
        # run 1.5-2x faster in a profile, and channels_last + fused Adam was the fastest ffhq64 step (1.07x);
        # at 16 px NHWC GroupNorm's 4x slower backward ate the gain (demo16 0.81x, 0.85x on a quiet machine);
        # at 32 px channels_last was 1.01-1.04x the NCHW training step and 1.01x (b1) to 1.28x (b8) the NCHW
        # reconstruction. Fused Adam was within noise of foreach (~3% of a step; one pass per tensor).
        # compile: 8 minutes of compiling, then 0.88x.
        big = image_size is None or image_size >= 32
        return cls(channels_last=big, tf32=False, fused_optimizer=True, compile=False)

    def replace(self, **overrides: bool | None) -> PerformanceOptions:
        """A copy with the non-None ``overrides`` applied (``None`` keeps this object's value)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


def set_tf32(enabled: bool) -> None:
    """Process-wide: TF32 for fp32 matmuls and cuDNN convolutions (PyTorch has no per-module switch)."""
    if hasattr(torch.backends.cudnn, "conv"):  # torch >= 2.9: the precision API
        precision = "tf32" if enabled else "ieee"
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:  # the older switches (the package admits torch >= 2.5)
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def apply(model: nn.Module, options: PerformanceOptions) -> nn.Module:
    """Apply ``options`` to ``model`` in place and return it.

    channels_last converts the 4-D weights; a convolution with NHWC weights returns NHWC activations,
    so inputs need no conversion. compile uses ``nn.Module.compile`` on every direct child network,
    which, unlike ``torch.compile(model)``, keeps the state_dict keys (no ``_orig_mod.`` prefix). Compile
    after any ``copy.deepcopy`` of the model (the EMA's): a copy of a compiled module calls the original's
    forward, with the original's weights.
    """
    if options.tf32:
        set_tf32(True)
    if options.channels_last:
        model.to(memory_format=torch.channels_last)
    if options.compile:
        for child in model.children():
            if any(True for _ in child.parameters()):
                child.compile()
    return model


def optimizer_kwargs(options: PerformanceOptions) -> dict[str, Any]:
    """Keyword arguments for torch.optim.Adam/AdamW: the fused kernel (CPU and CUDA) or the multi-tensor one."""
    return {"fused": True} if options.fused_optimizer else {"foreach": True}
