"""`make bench`: run every benchmark one after another and write benchmarks/RESULTS.md.

    python benchmarks/run_all.py [--only train_step sampling ...] [--out benchmarks/RESULTS.md]

Each benchmark runs in its own process (so a Ray instance or thread setting never leaks into the next)
with the arguments listed in BENCHMARKS; its printed tables go into RESULTS.md under its name together
with the exact command, the machine and the date. Only the block between the `make bench` markers is
rewritten: the hand-written analysis around it stays. The end-to-end figures (images/s of the demo's whole
training run, time from a cold start of the Serve app to its first reconstruction) are read from the
last `make demo` run's outputs/demo/metrics.json when it exists.

Benchmarks print numbers; they never pass or fail on them. On a shared or small machine the numbers
swing: read the ratios measured within one run, not absolute values across runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# name -> (arguments, what it measures). Sizes are chosen so the whole suite takes ~15 min on 2 cores.
BENCHMARKS: dict[str, tuple[list[str], str]] = {
    "train_step": (["benchmarks/train_step.py", "--presets", "tiny32", "demo16", "--threads", "2", "--compare"],
                   "one training step (encoder + UNet forward/backward, Adam, EMA), images/s"),
    "sampling": (["benchmarks/sampling.py", "--presets", "tiny32", "--batch-sizes", "1", "8", "--threads", "2"],
                 "semantic encoding and 20-step DDIM inversion + decoding, images/s"),
    "group_norm": (["benchmarks/group_norm.py", "--threads", "1"],
                   "channels_last GroupNorm + AdaGN + SiLU forward + backward, ATen vs GroupNormNHWC vs the native "
                   "kernel, ms per call"),
    "step_budget": (["benchmarks/step_budget.py", "--preset", "tiny32", "--batch", "16", "--threads", "1"],
                    "where a tiny32 training step's time goes: each part's ms, FLOPs and GFLOP/s against sgemm"),
    "conv_algorithms": (["benchmarks/conv_algorithms.py", "--threads", "1"],
                        "3x3 convolution forward, oneDNN vs NNPACK's Winograd/FFT: ms and error against float64"),
    "ingest": (["benchmarks/ingest.py", "--images", "2000", "--image-size", "32"],
               "images/s the Ray Data pipeline delivers vs what a training step consumes"),
    "train_throughput": (["benchmarks/train_throughput.py", "--workers", "1", "2"],
                         "train_autoencoder end to end with 1 and 2 Ray Train workers, images/s"),
    "serve_load": (["benchmarks/serve_load.py"],
                   "HTTP requests/s and latency percentiles, batching on and off"),
    "scaling_inputs": (["benchmarks/scaling_inputs.py"],
                       "the measured inputs of docs/scaling.md: FLOPs, all-reduce bytes, decode rate per core"),
}


def machine() -> str:
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:  # pragma: no cover - the venv always has torch
        torch_version = "?"
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch_version}")


def run(name: str, args: list[str]) -> tuple[str, float, int]:
    """Run one benchmark; returns (its stdout, seconds, exit code)."""
    start = time.time()
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    seconds = time.time() - start
    out = proc.stdout.strip()
    if proc.returncode != 0:
        out += f"\n\n(exit code {proc.returncode}; last lines of stderr)\n" + "\n".join(proc.stderr.splitlines()[-15:])
    print(f"{name}: {seconds:.0f} s, exit {proc.returncode}", flush=True)
    return out, seconds, proc.returncode


def demo_figures() -> str:
    path = ROOT / "outputs" / "demo" / "metrics.json"
    if not path.exists():
        return "No `make demo` run found (outputs/demo/metrics.json); run `make demo` first for these figures."
    m = json.loads(path.read_text())
    train, serving = m.get("training", {}), m.get("serving", {})
    ips = None
    if train.get("samples_seen") and train.get("seconds"):
        ips = train["samples_seen"] / train["seconds"]
    lines = [
        f"- whole demo training run: {train.get('samples_seen')} images in {train.get('seconds')} s with "
        f"{train.get('num_workers')} Ray Train workers = **{ips:.1f} images/s** including start-up "
        f"(rank 0 reported {train.get('images_per_second', 0):.1f} images/s at the end)" if ips else
        "- demo training figures missing from metrics.json",
        f"- Serve app cold start to first reconstruction: **{serving.get('cold_start_to_first_reconstruction_s')} s**",
        f"- demo total wall time: {m.get('timings_s', {}).get('total')} s (steps: "
        + ", ".join(f"{k} {v} s" for k, v in m.get("timings_s", {}).items() if k != "total") + ")",
    ]
    for label, source in (("live model", m), ("shipped demo model", m.get("demo_model") or {})):
        if "headline" in source:
            lines.append(f"- {label}, judged by the oracle: " + ", ".join(
                f"{name} {row['value']:.3f} (target {row['target']})" for name, row in source["headline"].items()))
    return "\n".join(lines)


BEGIN, END = "<!-- make bench: begin -->", "<!-- make bench: end -->"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these benchmarks")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    ns = p.parse_args(argv)
    names = ns.only or list(BENCHMARKS)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        BEGIN,
        "## `make bench` run\n",
        f"Written by `make bench` (`python benchmarks/run_all.py`) on {date}.\n",
        f"Machine: {machine()}.\n",
        "Timings on small, loaded machines are noisy: compare numbers measured in the same run (ratios), "
        "and rerun before trusting an absolute value.\n",
        "### End to end (from the last `make demo`)\n", demo_figures() + "\n",
    ]
    failed = 0
    for name in names:
        args, what = BENCHMARKS[name]
        out, seconds, code = run(name, args)
        failed += code != 0
        command = "python " + " ".join(shlex.quote(a) for a in args)
        parts += [f"### {name}\n", f"{what}. Command: `{command}` ({seconds:.0f} s).\n", "```", out, "```\n"]
    parts.append(END)
    write_block(Path(ns.out), "\n".join(parts), BEGIN, END)
    print(f"wrote {ns.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
