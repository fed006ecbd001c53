"""Inference throughput (images/s): semantic encoding, and DDIM inversion + decoding at 20 steps.

    python benchmarks/sampling.py [--presets tiny32 ffhq64] [--batch-sizes 1 8] [--steps 20]
                                  [--device cpu|cuda] [--threads 2] [--repeats 3] [--dtype bf16]

"invert+decode" is the stochastic reconstruction: 2 x steps UNet calls per image.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, median, reuse_heap_by_default, setup_threads, time_calls  # noqa: E402
from diffae_core import DiffAE  # noqa: E402

DEFAULT_BATCHES = {"tiny32": (1, 8, 32), "ffhq64": (1, 8)}
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_model(preset: str, device: torch.device, dtype: str = "fp32", channels_last: bool = False,
               compile: bool = False, frozen: bool = False) -> DiffAE:
    """A random-init ``preset`` in eval mode with the given inference dtype and speed options (plain torch
    calls, so benchmarks/compare_core.py can use this against an older diffae_core; ``frozen``, as a
    serving replica's weights, needs this tree's)."""
    torch.manual_seed(0)
    model = DiffAE.from_preset(preset).to(device)
    model.inference_dtype = DTYPES[dtype]
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if frozen:
        from diffae_core.performance import freeze

        freeze(model)
    if compile:
        model.encoder.compile()
        model.unet.compile()
    return model


def make_ops(model: DiffAE, batch: int, steps: int) -> dict[str, Callable[[], torch.Tensor]]:
    """{"encode", "invert+decode"} on a fixed random batch [batch, 3, S, S] in [-1, 1]."""
    size = model.image_size
    x = torch.rand(batch, 3, size, size, device=model.device) * 2 - 1
    z = model.encode(x)
    return {
        "encode": lambda: model.encode(x),
        "invert+decode": lambda: model.decode(model.encode_stochastic(x, z, steps=steps), z, steps=steps),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny32", "ffhq64"])
    p.add_argument("--batch-sizes", nargs="+", type=int)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    args = p.parse_args(argv)
    setup_threads(args.threads)
    device = torch.device(args.device)
    reuse_heap_by_default(device)
    from diffae_core.config import get_preset  # here, not at the top: see make_model
    from diffae_core.performance import PerformanceOptions

    print(f"# sampling, {machine()}, dtype={args.dtype}, steps={args.steps}")
    print("preset   batch  op              median_s  images/s  (diffae_core.performance defaults, frozen)")
    for preset in args.presets:
        options = PerformanceOptions.for_device(device, get_preset(preset).image_size)
        model = make_model(preset, device, args.dtype, options.channels_last, options.compile, frozen=True)
        for batch in args.batch_sizes or DEFAULT_BATCHES.get(preset, (1, 8)):
            for name, fn in make_ops(model, batch, args.steps).items():
                t = median(time_calls(fn, device, repeats=args.repeats))
                print(f"{preset:8} {batch:5}  {name:14}  {t:8.3f}  {batch / t:8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
