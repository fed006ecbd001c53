"""Speed options that leave the math alone: channels_last, TF32, fused optimiser kernels, torch.compile,
and glibc heap reuse.

    options = PerformanceOptions.for_device(device, 64)    # the measured (CPU) / documented (CUDA) best
    model = apply(model, options)                          # in place; state_dict keys do not change
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, **optimizer_kwargs(options))

None of them changes parameter names, so checkpoints, bundles and official imports load either way.
TF32 is the only one that changes numbers (matmuls and convs with a 10-bit mantissa on CUDA); it is
off on the CPU, where it does not exist. The CPU defaults are what benchmarks/compare_core.py measured
fastest on the project's CPU (benchmarks/RESULTS.md, "Core speed").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import platform
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .nn import Conv2d

OPTION_NAMES = ("channels_last", "tf32", "fused_optimizer", "compile", "heap_reuse")

# glibc's mallopt parameters (malloc.h) and the values reuse_heap sets
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_MMAP_THRESHOLD = 32 * 2**20  # the largest glibc accepts on 64-bit; bigger blocks are still mmapped
HEAP_TRIM_THRESHOLD = 2**30


@dataclass(frozen=True)
class PerformanceOptions:
    """channels_last: weights (hence activations) in NHWC, which oneDNN and cuDNN convolve faster;
    tf32: TF32 matmuls/convolutions on CUDA; fused_optimizer: Adam/AdamW's fused kernel (else foreach);
    compile: ``torch.compile`` each network in place (first steps pay the compilation); heap_reuse:
    :func:`reuse_heap`, process-wide (freed feature maps stay in the heap for the next call)."""

    channels_last: bool = False
    tf32: bool = False
    fused_optimizer: bool = False
    compile: bool = False
    heap_reuse: bool = False

    @classmethod
    def for_device(cls, device: torch.device | str, image_size: int | None = None) -> PerformanceOptions:
        """The defaults for ``device`` and a model of ``image_size`` px (None: a full-size preset)."""
        if torch.device(device).type == "cuda":
            # documented best on Ampere and later: TF32, fused AdamW, NHWC convolutions
            # heap_reuse: host memory is not where a GPU step's time goes (not measured on a GPU)
            return cls(channels_last=True, tf32=True, fused_optimizer=True, compile=False, heap_reuse=False)
        # measured on the project's (busy, 2-core) CPU, benchmarks/RESULTS.md "Core speed": NHWC convolutions
        # run 1.5-2x faster in a profile, and channels_last + fused Adam was the fastest ffhq64 step (1.07x);
        # at 16 px channels_last lost with ATen's NHWC GroupNorm backward (demo16 0.81x, 0.85x), and is 1.03x
        # (noise) with diffae_core.nn.GroupNormNHWC, so 16 px stays NCHW;
        # at 32 px channels_last was 1.01-1.04x the NCHW training step and 1.01x (b1) to 1.28x (b8) the NCHW
        # reconstruction. Fused Adam was within noise of foreach (~3% of a step; one pass per tensor).
        # compile: 8 minutes of compiling, then 0.88x (training) and 0.90x (tiny32 b8 reconstruction).
        # heap_reuse: 1.09-1.18x the tiny32 b8 reconstruction (page faults: 272k per reconstruction
        # without it, none with it), 1.01-1.05x the training steps, no change at b1 (smaller maps).
        big = image_size is None or image_size >= 32
        return cls(channels_last=big, tf32=False, fused_optimizer=True, compile=False, heap_reuse=True)

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


def reuse_heap() -> bool:
    """Process-wide, glibc only: keep freed feature maps in the heap for reuse. Returns whether it took effect.

    glibc serves a block above its mmap threshold (128 KiB at start, raised on the fly to at most a few
    MiB) with a fresh mmap and unmaps it on free, and gives the top of the heap back to the kernel
    above its trim threshold. Every MiB-sized activation then costs page faults (the kernel zeroes each
    page) on first touch, on every call: 272k faults per tiny32 b8 20+20-step reconstruction here. With the mmap
    threshold at 32 MiB and the trim threshold at 1 GiB, freed maps are reused from the heap instead.
    The cost: the process keeps its peak heap (it does not shrink after a large batch). Other C
    libraries (musl, macOS) are left alone, and so is an allocator preloaded in glibc's place.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD))


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
    if options.heap_reuse:
        reuse_heap()
    if options.channels_last:
        model.to(memory_format=torch.channels_last)
    if options.compile:
        for child in model.children():
            if any(True for _ in child.parameters()):
                child.compile()
    return model


def freeze(model: nn.Module, frozen: bool = True) -> nn.Module:
    """Mark ``model``'s convolutions as frozen (their weights will not change: a serving replica), in place.

    Frozen :class:`diffae_core.nn.Conv2d` layers keep their weight in oneDNN's layout for channels_last CPU
    inference (1.06x a tiny32 b8 and 1.10x a b1 20+20-step reconstruction, measured interleaved), at the
    cost of a second copy of the convolution weights. Unfreeze (``frozen=False``) before changing weights
    through ``.data``; in-place updates and ``load_state_dict`` are noticed either way.
    """
    for module in model.modules():
        if isinstance(module, Conv2d):
            module.frozen = frozen
            module.__dict__.pop("_prepacked", None)
    return model


def tune_for_inference(model: nn.Module, device: torch.device | str, image_size: int | None) -> nn.Module:
    """A model that only answers queries from now on (a serving replica, a batch-inference actor): the
    device's defaults without compile (it would stall the first calls for minutes), then :func:`freeze`."""
    return freeze(apply(model, PerformanceOptions.for_device(device, image_size).replace(compile=False)))


def optimizer_kwargs(options: PerformanceOptions) -> dict[str, Any]:
    """Keyword arguments for torch.optim.Adam/AdamW: the fused kernel (CPU and CUDA) or the multi-tensor one."""
    return {"fused": True} if options.fused_optimizer else {"foreach": True}
