"""GroupNorm + AdaGN + SiLU of a channels_last CPU map: ATen's kernels, GroupNormNHWC and the native kernel.

    python benchmarks/group_norm.py [--threads 1] [--repeats 30] [--shapes 16x32x32 4x64x64] [--inference]

Each call is ``SiLU(norm(x) * scale + shift)`` (scale, shift per example and channel, 32 groups), what a
ResBlock computes before each convolution, on a float32 channels_last map; with its backward (the map
requires grad, as in a training step) or, with ``--inference``, the forward under no_grad. "aten" is
``F.group_norm`` + ``addcmul`` + ``F.silu`` (ATen's channels_last kernels), "nhwc" is
``diffae_core.nn.group_norm_nhwc`` + ``F.silu`` (under autograd the hand-written ``GroupNormNHWC``), "native"
is ``diffae_core.native.group_norm_act`` (one C kernel; it runs at one intra-op thread only). They are
timed interleaved, one call of each per round, and the script prints the medians and the ratios to aten.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, median, reuse_heap_by_default, setup_threads, time_calls  # noqa: E402
from diffae_core import native  # noqa: E402
from diffae_core.nn import group_norm_nhwc  # noqa: E402

GROUPS = 32
DEFAULT_SHAPES = ("16x32x32", "16x64x16", "16x64x8", "4x64x64", "1x32x32", "8x32x32")  # batch x channels x side


def aten_group_norm(x: torch.Tensor, groups: int, scale: torch.Tensor, shift: torch.Tensor,
                    eps: float) -> torch.Tensor:
    """What autograd runs without GroupNormNHWC: affine-free GroupNorm, then the per-(b, c) addcmul, then SiLU."""
    b, c = x.shape[:2]
    normed = F.group_norm(x, groups, None, None, eps)
    return F.silu(torch.addcmul(shift.view(b, c, 1, 1), normed, scale.view(b, c, 1, 1)))


def nhwc_group_norm(x: torch.Tensor, groups: int, scale: torch.Tensor, shift: torch.Tensor,
                    eps: float) -> torch.Tensor:
    return F.silu(group_norm_nhwc(x, groups, scale, shift, eps))


def native_group_norm(x: torch.Tensor, groups: int, scale: torch.Tensor, shift: torch.Tensor,
                      eps: float) -> torch.Tensor:
    return native.group_norm_act(x, groups, scale, shift, eps, silu=True)


def make_call(fn, shape: str, inference: bool):
    """A forward + backward (or a no_grad forward) of ``fn`` on a random channels_last map of ``shape`` ("BxCxS")."""
    b, c, side = (int(v) for v in shape.split("x"))
    x = torch.randn(b, c, side, side).contiguous(memory_format=torch.channels_last).requires_grad_(not inference)
    scale, shift = torch.randn(b, c, requires_grad=not inference), torch.randn(b, c, requires_grad=not inference)
    if inference:
        return lambda: fn(x, GROUPS, scale, shift, 1e-5)
    grad = torch.randn(b, c, side, side).contiguous(memory_format=torch.channels_last)
    return lambda: fn(x, GROUPS, scale, shift, 1e-5).backward(grad)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="BxCxS, e.g. 16x32x32")
    p.add_argument("--inference", action="store_true", help="time the forward under no_grad")
    args = p.parse_args(argv)
    setup_threads(args.threads)
    device = torch.device("cpu")
    reuse_heap_by_default(device)
    fns = {"aten": aten_group_norm, "nhwc": nhwc_group_norm}
    probe = torch.empty(1, GROUPS, 2, 2).contiguous(memory_format=torch.channels_last)
    if native.takes_native(probe, GROUPS):
        fns["native"] = native_group_norm
    else:
        print("# native kernel not taken here (not built, or more than one thread): aten and nhwc only")
    mode = "forward, no_grad" if args.inference else "fwd+bwd"
    print(f"# GroupNorm + AdaGN + SiLU {mode}, channels_last, {machine()}")
    print("shape          " + "".join(f"{name + '_ms':>10}" for name in fns) + "".join(f"  x {n:>6}" for n in fns if n != "aten"))
    for shape in args.shapes:
        calls = {name: make_call(fn, shape, args.inference) for name, fn in fns.items()}
        times: dict[str, list[float]] = {name: [] for name in calls}
        with torch.no_grad() if args.inference else contextlib.nullcontext():
            for _ in range(args.repeats):  # interleaved: one call of each per round
                for name, call in calls.items():
                    times[name] += time_calls(call, device, repeats=1, warmup=0 if times[name] else 3)
        ms = {name: median(t) * 1e3 for name, t in times.items()}
        ratios = "".join(f"  {ms['aten'] / ms[n]:8.2f}" for n in fns if n != "aten")
        print(f"{shape:15}" + "".join(f"{ms[n]:10.2f}" for n in fns) + ratios, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
