"""FLOPs of one training image: encoder + UNet forward and backward, counted by torch's flop counter.

    python benchmarks/flops.py [--presets tiny32 ffhq64 ffhq128 ffhq256]

Counted on the meta device (no memory, no arithmetic), batch 1; FlopCounterMode counts matmuls,
convolutions and attention (2 FLOPs per multiply-add) and ignores elementwise work, so this is the
number a tensor-core bound is computed from (benchmarks/device_check.py, benchmarks/scaling_inputs.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffae_core import DiffAE  # noqa: E402
from diffae_core.config import get_preset  # noqa: E402


def training_flops_per_image(preset: str) -> float:
    """Forward + backward FLOPs of DiffAE.training_loss for one image of ``preset`` (gradients of all weights)."""
    config = get_preset(preset)
    size = config.image_size
    with torch.device("meta"):
        model = DiffAE(config).train()
        x0 = torch.empty(1, 3, size, size)
        t, noise = torch.zeros(1, dtype=torch.long), torch.empty(1, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        model.training_loss(x0, t, noise).backward()
    return float(counter.get_total_flops())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny32", "ffhq64", "ffhq128", "ffhq256"])
    args = p.parse_args(argv)
    print("preset    GFLOP/training image")
    for preset in args.presets:
        print(f"{preset:8}  {training_flops_per_image(preset) / 1e9:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
