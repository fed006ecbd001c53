"""Inference throughput (images/s): semantic encoding, and DDIM inversion + decoding at 20 steps.

    python benchmarks/sampling.py [--presets tiny32 ffhq64] [--batch-sizes 1 8] [--steps 20]
                                  [--device cpu|cuda] [--threads 2] [--repeats 3] [--dtype bf16]

"invert+decode" is the stochastic reconstruction: 2 x steps UNet calls per image.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, median, setup_threads, time_calls  # noqa: E402
from diffae_core import DiffAE  # noqa: E402

DEFAULT_BATCHES = {"tiny32": (1, 8, 32), "ffhq64": (1, 8)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny32", "ffhq64"])
    p.add_argument("--batch-sizes", nargs="+", type=int)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    args = p.parse_args(argv)
    setup_threads(args.threads)
    device = torch.device(args.device)
    print(f"# sampling, {machine()}, dtype={args.dtype}, steps={args.steps}")
    print("preset   batch  op              median_s  images/s")
    for preset in args.presets:
        torch.manual_seed(0)
        model = DiffAE.from_preset(preset).to(device)
        model.inference_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
        size = model.image_size
        for batch in args.batch_sizes or DEFAULT_BATCHES.get(preset, (1, 8)):
            x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
            z = model.encode(x)
            ops = {
                "encode": lambda x=x, model=model: model.encode(x),
                "invert+decode": lambda x=x, z=z, model=model: model.decode(
                    model.encode_stochastic(x, z, steps=args.steps), z, steps=args.steps),
            }
            for name, fn in ops.items():
                t = median(time_calls(fn, device, repeats=args.repeats))
                print(f"{preset:8} {batch:5}  {name:14}  {t:8.3f}  {batch / t:8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
