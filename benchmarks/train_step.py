"""Training-step throughput (images/s) of the Diff-AE autoencoder per preset and batch size.

    python benchmarks/train_step.py [--presets tiny32 ffhq64] [--batch-sizes 8 32] [--device cpu|cuda]
                                    [--threads 2] [--repeats 5] [--amp bf16] [--compare]

One step = encoder + UNet forward, eps-MSE loss, backward, grad clipping, Adam, EMA update.
``--compare`` times variants interleaved (memory format x optimizer implementation) so that the
machine's drift affects all of them alike; otherwise only the device's default configuration
(``diffae_core.performance.PerformanceOptions.for_device``) is timed. ``make_step`` uses plain torch
calls for the options, so benchmarks/compare_core.py can run it against an older diffae_core.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, median, reuse_heap_by_default, setup_threads, time_calls  # noqa: E402
from diffae_core import DiffAE  # noqa: E402
from diffae_core.ema import EMA  # noqa: E402

DEFAULT_BATCHES = {"tiny32": (8, 32), "demo16": (32,), "ffhq64": (4, 16)}


def make_step(preset: str, batch: int, device: torch.device, channels_last: bool, optim_impl: str,
              amp: str | None, compile: bool = False) -> Callable[[], None]:
    """One training step of ``preset`` on a fixed random batch [batch, 3, S, S]; optim_impl: fused | foreach."""
    torch.manual_seed(0)
    model = DiffAE.from_preset(preset).to(device).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    if compile:
        model.encoder.compile()
        model.unet.compile()
    kwargs = {"fused": True} if optim_impl == "fused" else {"foreach": True}
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, **kwargs)
    ema = EMA(model, decay=0.9999)
    size = model.image_size
    x0 = (torch.rand(batch, 3, size, size, device=device) * 2 - 1).contiguous(memory_format=fmt)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp or "")

    def step() -> None:
        ctx = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with ctx:
            loss = model.training_loss(x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        ema.update()

    return step


def default_variant(device: torch.device, preset: str) -> tuple[bool, str]:
    """(channels_last, Adam implementation) of diffae_core.performance's defaults for the preset."""
    from diffae_core.config import get_preset  # here, not at the top: see the module docstring
    from diffae_core.performance import PerformanceOptions

    options = PerformanceOptions.for_device(device, get_preset(preset).image_size)
    return options.channels_last, "fused" if options.fused_optimizer else "foreach"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny32", "ffhq64"])
    p.add_argument("--batch-sizes", nargs="+", type=int, help="default: per preset (tiny32: 8 32, ffhq64: 4 16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--amp", choices=["bf16", "fp16"], help="autocast dtype (GPU; bf16 also runs on CPU)")
    p.add_argument("--compare", action="store_true", help="interleave memory-format x optimizer variants")
    args = p.parse_args(argv)
    setup_threads(args.threads)
    device = torch.device(args.device)
    reuse_heap_by_default(device)
    print(f"# train step, {machine()}, amp={args.amp or 'off'}")
    print("preset   batch  layout          adam     median_s  images/s")
    for preset in args.presets:
        variants = [default_variant(device, preset)]
        if args.compare:
            variants = [(False, "foreach"), (True, "foreach"), (False, "fused"), (True, "fused")]
        for batch in args.batch_sizes or DEFAULT_BATCHES.get(preset, (8,)):
            steps = {v: make_step(preset, batch, device, v[0], v[1], args.amp) for v in variants}
            times: dict = {v: [] for v in variants}
            for _ in range(args.repeats):  # interleave: one timed step of each variant per round
                for v, fn in steps.items():
                    times[v] += time_calls(fn, device, repeats=1, warmup=0 if times[v] else 1)
            for (cl, impl), ts in times.items():
                t = median(ts)
                layout = "channels_last" if cl else "contiguous"
                print(f"{preset:8} {batch:5}  {layout:14}  {impl:7}  {t:8.3f}  {batch / t:8.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
