"""3x3 convolution forward: oneDNN direct (what diffae_core runs) against NNPACK's fast algorithms, speed and error.

    python benchmarks/conv_algorithms.py [--threads 1] [--repeats 15]

The shapes are the 3x3 convolutions of the tiny32 and ffhq64 training steps. Each is timed interleaved:
``F.conv2d`` on a channels_last map (oneDNN's direct kernel), the same on an NCHW map, and
``torch._nnpack_spatial_convolution`` (NNPACK, which picks Winograd or FFT where it can). Each output's
largest error against a float64 convolution is printed beside the times. Fewer multiply-adds only help
if the error stays within float32 rounding, which is what the golden tests against the official code hold.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, median, setup_threads, time_calls  # noqa: E402

SHAPES = (  # (batch, in channels, size, out channels)
    (16, 32, 32, 32), (16, 32, 32, 64), (16, 64, 16, 16), (16, 64, 16, 64),
    (16, 64, 8, 64), (4, 64, 64, 64), (16, 128, 8, 128),
)


def variants(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """The three forwards of x [B, C, S, S] with w [C_out, C, 3, 3] and b [C_out], padding 1."""
    x_cl = x.contiguous(memory_format=torch.channels_last)
    return {"onednn": lambda: F.conv2d(x_cl, w, b, padding=1), "nchw": lambda: F.conv2d(x, w, b, padding=1),
            "nnpack": lambda: torch._nnpack_spatial_convolution(x, w, b, [1, 1])}


def measure(batch: int, channels: int, size: int, out: int, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """(median ms per variant, largest error against float64 for oneDNN and NNPACK) of one shape."""
    x = torch.randn(batch, channels, size, size)
    w, b = torch.randn(out, channels, 3, 3) * 0.05, torch.randn(out)
    calls, cpu = variants(x, w, b), torch.device("cpu")
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):  # one call of each per round, so all see the same drift
        for name, call in calls.items():
            times[name] += time_calls(call, cpu, repeats=1, warmup=0 if times[name] else 2)
    exact = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    errors = {name: (calls[name]().double() - exact).abs().max().item() for name in ("onednn", "nnpack")}
    return {name: median(ts) * 1e3 for name, ts in times.items()}, errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args(argv)
    setup_threads(args.threads)
    if not torch._nnpack_available():
        print("this torch was built without NNPACK")
        return 1
    print(f"# 3x3 convolution forward, {machine()}")
    print("| [B, C, S, S] -> C_out | oneDNN channels_last ms | NCHW ms | NNPACK ms | x NNPACK | "
          "err oneDNN | err NNPACK |")
    print("|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    for batch, channels, size, out in SHAPES:
        ms, err = measure(batch, channels, size, out, args.repeats)
        print(f"| [{batch}, {channels}, {size}, {size}] -> {out} | {ms['onednn']:.2f} | {ms['nchw']:.2f} | "
              f"{ms['nnpack']:.2f} | {ms['onednn'] / ms['nnpack']:.2f} | {err['onednn']:.1e} | {err['nnpack']:.1e} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
