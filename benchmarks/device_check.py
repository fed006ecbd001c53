"""The one GPU check: CUDA vs CPU agreement, training images/s against the FLOP bound, decoding images/s.

    python benchmarks/device_check.py [--device cuda|cpu] [--quick] [--json FILE] [--budget-s 420] [--threads N]

Pure PyTorch + this repository (diffae_core needs torch and numpy only; no Ray, no network):
1. agreement: encode, DDIM inversion and decoding of a tiny model (tiny32 with its zero-initialised
   layers re-drawn, so every output depends on every layer) on the device vs float32 on the CPU, for
   strict fp32, the device's defaults (diffae_core.performance: TF32 + channels_last on CUDA) and bf16
   autocast; max abs error in [-1, 1] image units (z_sem units for encode);
2. batched 20-step decoding images/s at batch 1, 8 and 64;
3. training images/s per preset at the largest batch that fits (doubling until out of memory), for fp32,
   TF32, bf16 and bf16 + torch.compile, against the bound peak FLOP/s / (benchmarks/flops.py FLOPs per image).
Prints markdown tables and writes JSON (after every section, so a run cut short keeps what it measured).
Rows that would start past ``--budget-s`` seconds, or fail (e.g. compilation), are listed under "skipped". ``--quick`` shrinks everything
(tiny32, batches <= 4, 2-3 DDIM steps, no compile) for the CPU test (tests/test_device_check.py).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, median, setup_threads, sync, time_calls  # noqa: E402
from benchmarks.flops import training_flops_per_image  # noqa: E402
from benchmarks.train_step import make_step  # noqa: E402
from diffae_core import DiffAE  # noqa: E402
from diffae_core.config import get_preset  # noqa: E402
from diffae_core.performance import PerformanceOptions, apply, set_tf32  # noqa: E402

# dense peak FLOP/s of one H200 (SXM) per precision: the bound a training step is compared against
PEAK_FLOPS = {"fp32": 67e12, "tf32": 395e12, "bf16": 790e12, "bf16+compile": 790e12}
AUTOCAST = {"fp32": None, "tf32": None, "bf16": torch.bfloat16}


def tiny_model(seed: int = 0) -> DiffAE:
    """tiny32 from ``seed`` with its zero-initialised weights re-drawn (N(0, 0.002)), so that eps, the
    inversion and the decoding are not trivial."""
    torch.manual_seed(seed)
    model = DiffAE.from_preset("tiny32")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.002)
    return model


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    set_tf32(enabled)
    try:
        yield
    finally:
        set_tf32(False)


def autoencode(model: DiffAE, x: torch.Tensor, steps: int) -> dict[str, torch.Tensor]:
    """{"encode": z [B,Z], "invert": x_T [B,3,H,W], "decode": x_0 [B,3,H,W]} on the CPU in float32."""
    z = model.encode(x)
    x_T = model.encode_stochastic(x, z, steps=steps)
    return {"encode": z.cpu(), "invert": x_T.cpu(), "decode": model.decode(x_T, z, steps=steps).cpu()}


def agreement(device: torch.device, quick: bool) -> list[dict[str, Any]]:
    """Max abs error of each op on ``device`` (three precision variants) against CPU float32."""
    steps, batch = (3, 2) if quick else (20, 8)
    reference_model = tiny_model()
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    reference = autoencode(reference_model, x, steps)
    rows = []
    for variant in ("fp32", "defaults", "bf16"):
        model = tiny_model().to(device)
        options = PerformanceOptions.for_device(device) if variant == "defaults" else PerformanceOptions()
        apply(model, options.replace(compile=False, tf32=False))
        model.inference_dtype = torch.bfloat16 if variant == "bf16" else None
        with tf32(options.tf32):
            out = autoencode(model, x.to(device), steps)
        for op, ref in reference.items():
            err = (out[op] - ref).abs().max().item()
            rows.append({"op": op, "variant": variant, "max_abs_error": err, "reference_max_abs": ref.abs().max().item()})
    return rows


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def out_of_memory(exc: BaseException) -> bool:
    """CUDA's allocator raises OutOfMemoryError; cuBLAS/cuDNN workspaces fail as RuntimeError instead."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in str(exc) or "ALLOC_FAILED" in str(exc)))


def fits(build: Callable[[int], Callable[[], None]], batch: int) -> bool:
    """Whether one step at ``batch`` runs without running out of device memory."""
    try:
        step = build(batch)
        step()
        return True
    except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
        if not out_of_memory(exc):
            raise
        return False
    finally:
        step = None  # noqa: F841  (drop the model, its gradients and optimiser state before the next try)
        free_memory()


def largest_batch(build: Callable[[int], Callable[[], None]], start: int, cap: int) -> int:
    """The largest power-of-two multiple of ``start`` up to ``cap`` whose step fits (0 if none does)."""
    best, batch = 0, start
    while batch <= cap and fits(build, batch):
        best, batch = batch, batch * 2
    return best


def build_step(device: torch.device, preset: str, precision: str, batch: int) -> Callable[[], None]:
    """benchmarks/train_step.py's step with the device's diffae_core.performance defaults."""
    options = PerformanceOptions.for_device(device, get_preset(preset).image_size)
    amp = "bf16" if precision.startswith("bf16") else None
    return make_step(preset, batch, device, options.channels_last, "fused" if options.fused_optimizer else "foreach",
                     amp, compile=precision == "bf16+compile")


def train_rate(device: torch.device, preset: str, precision: str, batch: int, repeats: int) -> float:
    """Images/s of the training step at ``batch``."""
    step = build_step(device, preset, precision, batch)
    step()  # compiles, when compiling; allocates the optimiser state
    seconds = median(time_calls(step, device, repeats=repeats, warmup=1))
    step = None  # noqa: F841
    free_memory()
    return batch / seconds


def fitting_rate(device: torch.device, preset: str, precision: str, batch: int, repeats: int) -> tuple[int, float]:
    """(batch, images/s) at ``batch``, halving it when a fresh run no longer fits (allocator fragmentation)."""
    while batch:
        try:
            return batch, train_rate(device, preset, precision, batch, repeats)
        except RuntimeError as exc:
            if not out_of_memory(exc):
                raise
            free_memory()
            batch //= 2
    return 0, float("nan")


def training(device: torch.device, presets: list[str], quick: bool, deadline: float,
             skipped: list[str]) -> list[dict[str, Any]]:
    """Per preset and precision: the largest batch that fits, images/s, and the FLOP bound."""
    precisions = ("fp32", "bf16") if quick else ("fp32", "tf32", "bf16", "bf16+compile")
    start, cap, repeats = (2, 4, 1) if quick else (8, 512, 5)
    rows = []
    for preset in presets:
        flops = training_flops_per_image(preset)
        batches: dict[str, int] = {}
        for precision in precisions:
            if time.monotonic() > deadline:
                skipped.append(f"training {preset} {precision}")
                continue
            memory_kind = "bf16" if precision.startswith("bf16") else "fp32"  # tf32 and compile reuse a probe
            with tf32(precision == "tf32"):
                if memory_kind not in batches:
                    build = functools.partial(build_step, device, preset, memory_kind)
                    batches[memory_kind] = largest_batch(build, start, cap)
                try:
                    batch, rate = fitting_rate(device, preset, precision, batches[memory_kind], repeats)
                except Exception as exc:  # e.g. a compiler failure: keep the other rows and say why
                    batch, rate = batches[memory_kind], float("nan")
                    skipped.append(f"training {preset} {precision}: {type(exc).__name__}: {str(exc)[:200]}")
                    free_memory()
            bound = PEAK_FLOPS[precision] / flops
            rows.append({"preset": preset, "precision": precision, "batch": batch, "images_per_s": rate,
                         "gflop_per_image": flops / 1e9, "bound_images_per_s": bound, "fraction_of_bound": rate / bound})
    return rows


def decoding(device: torch.device, presets: list[str], quick: bool, deadline: float,
             skipped: list[str]) -> list[dict[str, Any]]:
    """Images/s of DDIM decoding (20 steps; 2 in quick mode) at batch 1, 8, 64, fp32 (device defaults) and bf16."""
    steps, batches = (2, (1, 2)) if quick else (20, (1, 8, 64))
    options = PerformanceOptions.for_device(device).replace(compile=False)
    rows = []
    for preset in presets:
        model = apply(DiffAE.from_preset(preset).to(device), options)
        size = model.image_size
        for dtype_name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            model.inference_dtype = dtype
            for batch in batches:
                if time.monotonic() > deadline:
                    skipped.append(f"decoding {preset} {dtype_name} b{batch}")
                    continue
                x_T, z = torch.randn(batch, 3, size, size, device=device), torch.randn(batch, 512, device=device)
                with tf32(options.tf32):
                    decode = functools.partial(model.decode, x_T, z, steps=steps)
                    seconds = median(time_calls(decode, device, repeats=3))
                rows.append({"preset": preset, "dtype": dtype_name, "batch": batch, "steps": steps,
                             "images_per_s": batch / seconds})
        model = None
        free_memory()
    return rows


def markdown(report: dict[str, Any]) -> str:
    """The three sections of ``report`` as markdown tables."""
    lines = [f"# device check: {report['machine']}", "",
             "| op | variant | max abs error vs CPU fp32 | reference max abs |", "|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['variant']} | {r['max_abs_error']:.3g} | {r['reference_max_abs']:.3g} |"
              for r in report["agreement"]]
    lines += ["", "| preset | precision | batch | images/s | GFLOP/image | bound images/s | fraction of bound |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['preset']} | {r['precision']} | {r['batch']} | {r['images_per_s']:.1f} | {r['gflop_per_image']:.1f} "
              f"| {r['bound_images_per_s']:.1f} | {r['fraction_of_bound']:.3f} |" for r in report["training"]]
    lines += ["", "| preset | dtype | batch | DDIM steps | images/s |", "|---|---|---|---|---|"]
    lines += [f"| {r['preset']} | {r['dtype']} | {r['batch']} | {r['steps']} | {r['images_per_s']:.2f} |"
              for r in report["decoding"]]
    if report["skipped"]:
        lines += ["", "skipped (past --budget-s, or failed): " + "; ".join(report["skipped"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes: the CPU test")
    p.add_argument("--presets", nargs="+", help="training/decoding presets (default ffhq64 ffhq128 ffhq256; quick: tiny32)")
    p.add_argument("--json", type=Path, default=Path("device_check.json"))
    p.add_argument("--threads", type=int, help="CPU intra-op threads (default: torch's)")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip what would start after this many seconds")
    args = p.parse_args(argv)
    setup_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False: run with --device cpu")
    presets = args.presets or (["tiny32"] if args.quick else ["ffhq64", "ffhq128", "ffhq256"])
    deadline = time.monotonic() + args.budget_s
    report: dict[str, Any] = {"machine": machine(), "device": str(device), "torch": torch.__version__,
                              "quick": args.quick, "agreement": [], "training": [], "decoding": [], "skipped": []}
    sections: list[tuple[str, Callable[[], list[dict[str, Any]]]]] = [
        ("agreement", lambda: agreement(device, args.quick)),
        # decoding before training: the compile rows are the slowest and the first to be cut by --budget-s
        ("decoding", lambda: decoding(device, presets, args.quick, deadline, report["skipped"])),
        ("training", lambda: training(device, presets, args.quick, deadline, report["skipped"])),
    ]
    for name, run in sections:
        report[name] = run()
        sync(device)
        args.json.write_text(json.dumps(report, indent=2, allow_nan=True))
    print(markdown(report))
    finite = all(math.isfinite(r["max_abs_error"]) for r in report["agreement"])
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
