"""The measured inputs of the GPU-cluster scaling model (docs/scaling.md), on this machine.

    python benchmarks/scaling_inputs.py [--presets ffhq64 ffhq128 ffhq256] [--json FILE]

Per preset: FLOPs per training image (forward + backward, torch's flop counter, benchmarks/flops.py), FLOPs
of one decoder call and one encoder call per image (serving), parameters and the bytes DDP all-reduces per
step (fp32 gradients of the encoder and the UNet). Per image size: what one CPU core decodes, crops and
resizes per second (pipelines.data's preprocessing, one thread, from 1024 px JPEG like FFHQ's, from 256 px
PNG, and from parquet that `diffae data prepare` wrote at the training size). And the CPU's sustained fp32 matmul rate, with which the FLOP counts predict the training-step
throughput measured here (benchmarks/train_step.py), the check of the model on a single node.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cpu_matmul_rate, machine, setup_threads  # noqa: E402
from benchmarks.flops import training_flops_per_image  # noqa: E402
from diffae_core import DiffAE  # noqa: E402
from diffae_core.config import get_preset  # noqa: E402


def inference_flops_per_image(preset: str) -> tuple[float, float]:
    """(FLOPs of one decoder call, of one encoder call) per image, on the meta device."""
    config = get_preset(preset)
    size = config.image_size
    with torch.device("meta"):
        model = DiffAE(config).eval()
        x, t, z = torch.empty(1, 3, size, size), torch.zeros(1, dtype=torch.long), torch.empty(1, config.z_dim)
    with FlopCounterMode(display=False) as unet:
        model.unet(x, t, z)
    with FlopCounterMode(display=False) as encoder:
        model.encoder(x)
    return float(unet.get_total_flops()), float(encoder.get_total_flops())


def model_bytes(preset: str) -> tuple[int, int]:
    """(trainable parameters of encoder + UNet, bytes of their fp32 gradients: what DDP all-reduces per step)."""
    with torch.device("meta"):
        model = DiffAE(get_preset(preset))
    params = sum(p.numel() for p in model.parameters())
    return params, 4 * params


def decode_rate(size: int, source: str, seconds: float = 5.0) -> float:
    """Images/s one thread turns encoded bytes into a [3,S,S] float tensor (pipelines.data's Preprocess)."""
    from diffae_core.images import decode_image, pil_to_tensor
    from pipelines.data import Preprocess

    rng = np.random.default_rng(0)
    side, fmt = {"jpeg1024": (1024, "JPEG"), "png256": (256, "PNG"), "prepared": (size, "PNG")}[source]
    smooth = Image.fromarray(rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8)).resize((side, side))
    buf = io.BytesIO()
    smooth.save(buf, format=fmt, quality=90)
    data, prep = buf.getvalue(), Preprocess(size)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        pil_to_tensor(prep.square(decode_image(data)))
        count += 1
    return count / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny32", "demo16", "ffhq64", "ffhq128", "ffhq256"])
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 128, 256])
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    setup_threads(1)
    out: dict = {"machine": machine(), "presets": {}, "decode": {}}
    print(f"# scaling inputs, {machine()}")
    print("preset     train GFLOP/img  decoder GFLOP/call  encoder GFLOP  params (M)  all-reduce MB/step")
    for preset in args.presets:
        train = training_flops_per_image(preset)
        unet, encoder = inference_flops_per_image(preset)
        params, grad_bytes = model_bytes(preset)
        out["presets"][preset] = {"train_flops": train, "decoder_flops": unet, "encoder_flops": encoder,
                                  "params": params, "allreduce_bytes": grad_bytes}
        print(f"{preset:10} {train / 1e9:15.2f}  {unet / 1e9:18.3f}  {encoder / 1e9:13.3f}  {params / 1e6:10.1f}  "
              f"{grad_bytes / 1e6:18.1f}", flush=True)
    print("\nsize  images/s per CPU core: from 1024px JPEG   from 256px PNG   prepared (PNG at the size)")
    for size in args.sizes:
        rates = {source: decode_rate(size, source) for source in ("jpeg1024", "png256", "prepared")}
        out["decode"][size] = rates
        print(f"{size:4}  {rates['jpeg1024']:37.1f}  {rates['png256']:15.1f}  {rates['prepared']:26.1f}", flush=True)
    out["cpu_matmul_flops"] = cpu_matmul_rate()
    print(f"\nCPU fp32 matmul, 1 thread: {out['cpu_matmul_flops'] / 1e9:.1f} GFLOP/s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
