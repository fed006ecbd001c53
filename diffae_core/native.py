"""GroupNorm + AdaGN affine + SiLU in one C kernel for channels_last float32 CPU maps.

On the CPU, a ResBlock's ``SiLU(GroupNorm(h) * scale + shift)`` through ATen (or through
:class:`diffae_core.nn.GroupNormNHWC`) is five to eight passes over the feature map forward and as
many backward, each a separate op, and SiLU saves a map of its own for autograd. The kernel in
``kernels/group_norm_silu.c`` does the forward in three passes (two for the statistics, one writing
``SiLU(x * mul + add)``) and the backward in two, saving only the input map and the [B, G] statistics.

The C source ships with the package and is compiled on first use with the machine's C compiler
(``$CC``, else ``cc``/``gcc``) for this CPU (``-O3 -march=native``), into a cache directory
(``$DIFFAE_KERNEL_DIR``, else ``~/.cache/diffae-ray/kernels``) keyed by the source, the flags and the
CPU's feature flags, so every process of a node reuses one build. ``-ffast-math`` is a compile flag
only: linking with it makes GCC add ``crtfastmath.o``, whose constructor turns on flush-to-zero and
denormals-are-zero for the whole process that loads the library, not just for this kernel. Without a
compiler, or with ``DIFFAE_NATIVE_KERNELS=0``, :func:`available` is False and callers keep the PyTorch
paths (logged once). The kernel is single-threaded, so it is taken only at one intra-op thread (what Ray
workers run by default); with more threads ATen's parallel kernels stay.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "group_norm_silu.c"
# fast-math lets GCC call libmvec's vectorised expf; it stays off the link line (see the module docstring)
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fPIC", "-c")
LINK_FLAGS = ("-shared",)
BUILD_TIMEOUT_S = 120

_F32P = ctypes.POINTER(ctypes.c_float)
_I64 = ctypes.c_int64


def _cpu_identity() -> str:
    """What -march=native compiles for: the machine and its CPU feature flags."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _cache_dir() -> Path:
    return Path(os.environ.get("DIFFAE_KERNEL_DIR") or Path.home() / ".cache" / "diffae-ray" / "kernels")


def _build(compiler: str) -> Path:
    """The compiled library's path, compiling it unless this source, flags and CPU already have one."""
    recipe = " ".join((compiler, *COMPILE_FLAGS, "|", *LINK_FLAGS, _cpu_identity()))
    key = hashlib.sha256(SOURCE.read_bytes() + recipe.encode())
    target = _cache_dir() / f"group_norm_silu-{key.hexdigest()[:20]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Builds racing on a node each write their own object and library, then rename one into place.
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    obj = tmp[: -len(".so.tmp")] + ".o"
    try:
        for command in ([compiler, *COMPILE_FLAGS, "-o", obj, str(SOURCE)],
                        [compiler, *LINK_FLAGS, "-o", tmp, obj, "-lm"]):
            subprocess.run(command, check=True, capture_output=True, timeout=BUILD_TIMEOUT_S)
        os.replace(tmp, target)  # atomic: a reader sees no library or a whole one
    finally:
        for leftover in (tmp, obj):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernel library, built on first use; None (logged once) when it is switched off or cannot build."""
    if os.environ.get("DIFFAE_NATIVE_KERNELS", "1") == "0":
        log.info("native GroupNorm kernel off (DIFFAE_NATIVE_KERNELS=0): PyTorch GroupNorm paths")
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler (cc, gcc or $CC): the native GroupNorm kernel is off, PyTorch paths run")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        log.warning("native GroupNorm kernel did not build (%s %s): PyTorch paths run", exc,
                    detail.decode(errors="replace")[-500:])
        return None
    lib.gn_forward.argtypes = [_F32P] * 6 + [_I64] * 4 + [ctypes.c_double, ctypes.c_int]
    lib.gn_backward.argtypes = [_F32P] * 9 + [_I64] * 4 + [ctypes.c_int]
    lib.gn_forward.restype = lib.gn_backward.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether the native kernel is built and loaded in this process."""
    return library() is not None


def takes_native(x: torch.Tensor, groups: int) -> bool:
    """Whether :func:`group_norm_act` runs x: a float32 CPU channels_last [B, C, H, W] (not also
    NCHW-contiguous), C divisible by groups, one intra-op thread, and the kernel built."""
    return (x.dim() == 4 and x.dtype == torch.float32 and x.device.type == "cpu"
            and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            and x.shape[1] % groups == 0 and torch.get_num_threads() == 1 and available())


def _ptr(t: torch.Tensor) -> ctypes._Pointer:
    return ctypes.cast(t.data_ptr(), _F32P)


def _check(status: int) -> None:
    if status:
        raise MemoryError("native GroupNorm kernel could not allocate its scratch buffers")


class GroupNormAct(torch.autograd.Function):
    """:func:`group_norm_act` with its backward: x channels_last [B, C, H, W], groups, scale and shift
    [B, C], eps, silu -> channels_last [B, C, H, W]. Saves x and the [B, G] statistics."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, groups: int, scale: torch.Tensor, shift: torch.Tensor,  # type: ignore[override]
                eps: float, silu: bool) -> torch.Tensor:
        scale, shift = scale.contiguous(), shift.contiguous()
        out, mean, rstd = _forward(x, groups, scale, shift, eps, silu)
        ctx.groups, ctx.silu = groups, silu
        ctx.save_for_backward(x, scale, shift, mean, rstd)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, scale, shift, mean, rstd = ctx.saved_tensors
        b, c, h, w = x.shape
        grad = grad.contiguous(memory_format=torch.channels_last)
        dx = torch.empty_like(x, memory_format=torch.channels_last)
        d_scale, d_shift = torch.empty(b, c), torch.empty(b, c)
        _check(library().gn_backward(_ptr(grad), _ptr(x), _ptr(scale), _ptr(shift), _ptr(mean), _ptr(rstd),
                                     _ptr(dx), _ptr(d_scale), _ptr(d_shift), b, h * w, c, ctx.groups,
                                     int(ctx.silu)))
        return dx, None, d_scale, d_shift, None, None


def _forward(x: torch.Tensor, groups: int, scale: torch.Tensor, shift: torch.Tensor, eps: float,
             silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's forward: (out channels_last [B, C, H, W], mean [B, G], rstd [B, G])."""
    b, c, h, w = x.shape
    out = torch.empty_like(x, memory_format=torch.channels_last)
    mean, rstd = torch.empty(b, groups), torch.empty(b, groups)
    _check(library().gn_forward(_ptr(x), _ptr(out), _ptr(scale), _ptr(shift), _ptr(mean), _ptr(rstd),
                                b, h * w, c, groups, eps, int(silu)))
    return out, mean, rstd


def group_norm_act(x: torch.Tensor, groups: int, scale: torch.Tensor, shift: torch.Tensor, eps: float,
                   silu: bool) -> torch.Tensor:
    """``act(GroupNorm(x) * scale + shift)`` for a :func:`takes_native` x [B, C, H, W]; act is SiLU when
    ``silu``, else the identity. scale, shift: float32 [B, C]. Returns channels_last [B, C, H, W].
    Differentiable in x, scale and shift."""
    scale, shift = scale.float().expand(x.shape[:2]), shift.float().expand(x.shape[:2])
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, scale, shift)):
        return GroupNormAct.apply(x, groups, scale, shift, eps, silu)
    return _forward(x, groups, scale.contiguous(), shift.contiguous(), eps, silu)[0]
