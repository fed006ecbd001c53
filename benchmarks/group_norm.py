"""GroupNorm + AdaGN forward and backward of a channels_last CPU map: ATen's kernels against GroupNormNHWC.

    python benchmarks/group_norm.py [--threads 1] [--repeats 30] [--shapes 16x32x32 4x64x64]

Each call is ``norm(x) * scale + shift`` (scale, shift per example and channel, 32 groups) and its backward,
on a float32 channels_last map that requires grad, as in a channels_last CPU training step. "aten" is
``F.group_norm`` + ``addcmul`` (autograd through ATen's channels_last kernels), "nhwc" is
``diffae_core.nn.group_norm_nhwc``, which under autograd is the hand-written ``GroupNormNHWC``. The two
are timed interleaved, one call of each per round, and the script prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, median, reuse_heap_by_default, setup_threads, time_calls  # noqa: E402
from diffae_core.nn import group_norm_nhwc  # noqa: E402

GROUPS = 32
DEFAULT_SHAPES = ("16x32x32", "16x64x16", "16x64x8", "4x64x64")  # batch x channels x side


def aten_group_norm(x: torch.Tensor, groups: int, scale: torch.Tensor, shift: torch.Tensor,
                    eps: float) -> torch.Tensor:
    """What autograd runs without GroupNormNHWC: affine-free GroupNorm, then the per-(b, c) addcmul."""
    b, c = x.shape[:2]
    return torch.addcmul(shift.view(b, c, 1, 1), F.group_norm(x, groups, None, None, eps), scale.view(b, c, 1, 1))


def make_call(fn, shape: str):
    """A forward + backward of ``fn`` on a random channels_last map of ``shape`` ("BxCxS")."""
    b, c, side = (int(v) for v in shape.split("x"))
    x = torch.randn(b, c, side, side).contiguous(memory_format=torch.channels_last).requires_grad_()
    scale, shift = torch.randn(b, c, requires_grad=True), torch.randn(b, c, requires_grad=True)
    grad = torch.randn(b, c, side, side).contiguous(memory_format=torch.channels_last)
    return lambda: fn(x, GROUPS, scale, shift, 1e-5).backward(grad)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="BxCxS, e.g. 16x32x32")
    args = p.parse_args(argv)
    setup_threads(args.threads)
    device = torch.device("cpu")
    reuse_heap_by_default(device)
    print(f"# GroupNorm + AdaGN fwd+bwd, channels_last, {machine()}")
    print("shape            aten_ms   nhwc_ms   x")
    for shape in args.shapes:
        calls = {"aten": make_call(aten_group_norm, shape), "nhwc": make_call(group_norm_nhwc, shape)}
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.repeats):  # interleaved: one call of each per round
            for name, call in calls.items():
                times[name] += time_calls(call, device, repeats=1, warmup=0 if times[name] else 3)
        aten, nhwc = median(times["aten"]) * 1e3, median(times["nhwc"]) * 1e3
        print(f"{shape:15}  {aten:8.2f}  {nhwc:8.2f}  {aten / nhwc:5.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
