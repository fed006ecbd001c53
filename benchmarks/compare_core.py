"""Before/after timings of diffae_core: an older commit and this tree, interleaved in one run.

    python benchmarks/compare_core.py [--base 1ef4644] [--threads 1] [--repeats 5] [--options]
                                      [--train tiny32:16 tiny32:32] [--recon tiny32:1 tiny32:8] [--json FILE]

For every case, fresh worker processes (what ran before in a process changes its timings: a tiny32
b1 reconstruction after training cases took 0.78 s against 0.60 s in a fresh one): one importing the
``--base`` commit's diffae_core (extracted with ``git archive``) and two this tree's (one as the base
ran, one with this tree's process-wide CPU defaults, i.e. glibc heap reuse). Each builds the case once
and then times one call per request. The parent asks them in turn, one call of every variant per
round, so all versions see the same machine drift; it prints medians and ratios as markdown. The step
and the reconstruction are benchmarks/train_step.py's ``make_step`` and benchmarks/sampling.py's
``make_ops`` from THIS tree in every worker. ``--options`` adds per-option rows (this tree only) and the bf16-vs-fp32 error of the
shipped demo model's reconstruction.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BEFORE = {"channels_last": False, "fused": False}  # train_step.py's and sampling.py's defaults at the base
TRAIN_OPTIONS = {  # label -> spec overrides, all on this tree
    "contiguous, foreach Adam": {"channels_last": False, "fused": False},
    "contiguous, fused Adam": {"channels_last": False, "fused": True},
    "channels_last, foreach Adam": {"channels_last": True, "fused": False},
    "channels_last, fused Adam": {"channels_last": True, "fused": True},
    "channels_last, fused, compile": {"channels_last": True, "fused": True, "compile": True},
    "channels_last, fused, bf16 autocast": {"channels_last": True, "fused": True, "amp": "bf16"},
}
RECON_OPTIONS = {
    "fp32 contiguous": {"channels_last": False},
    "fp32 channels_last": {"channels_last": True},
    "fp32 channels_last, frozen": {"channels_last": True, "frozen": True},
    "bf16 contiguous": {"channels_last": False, "dtype": "bf16"},
    "bf16 channels_last": {"channels_last": True, "dtype": "bf16"},
    "fp32 channels_last, compile": {"channels_last": True, "compile": True},
}


# ---- worker side: build a case once, then time one call per request ------------------------------------
def build(spec: dict) -> object:
    import torch

    from benchmarks.sampling import make_model, make_ops
    from benchmarks.train_step import make_step

    device = torch.device("cpu")
    if spec["kind"] == "train":
        return make_step(spec["preset"], spec["batch"], device, spec.get("channels_last", False),
                         "fused" if spec.get("fused") else "foreach", spec.get("amp"), spec.get("compile", False))
    model = make_model(spec["preset"], device, spec.get("dtype", "fp32"), spec.get("channels_last", False),
                       spec.get("compile", False), spec.get("frozen", False))
    return make_ops(model, spec["batch"], spec.get("steps", 20))["invert+decode"]


def worker(code_root: str, threads: int, heap_reuse: bool) -> None:
    """Answer JSON requests on stdin: {"spec": ...} -> {"seconds": s}."""
    import torch

    sys.path.insert(0, code_root)
    import diffae_core  # noqa: F401  (the version under test, cached before THIS tree's benchmarks load)

    if heap_reuse:  # process-wide, so it is a property of the worker, not of a case
        from diffae_core.performance import reuse_heap

        if not reuse_heap():
            raise RuntimeError("heap reuse asked for, but this C library has no glibc mallopt")

    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(threads)
    cases: dict[str, object] = {}
    for line in sys.stdin:
        request = json.loads(line)
        key = json.dumps(request["spec"], sort_keys=True)
        if key not in cases:
            cases[key] = build(request["spec"])
            for _ in range(3 if request["spec"].get("compile") else 2):  # warm-up (compile pays on the first calls)
                cases[key]()
        start = time.perf_counter()
        cases[key]()
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


# ---- parent side ---------------------------------------------------------------------------------------
class Worker:
    def __init__(self, code_root: Path, threads: int, heap_reuse: bool = False):
        env = {**os.environ, "PYTHONPATH": ""}
        command = [sys.executable, __file__, "--worker", str(code_root), "--threads", str(threads)]
        self.proc = subprocess.Popen(command + (["--heap-reuse"] if heap_reuse else []),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker died on {request}")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def extract(rev: str, into: str) -> Path:
    """The tree of commit ``rev`` (its diffae_core is what the base worker imports)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "diffae_core"], check=True,
                             capture_output=True).stdout
    path = Path(into) / rev
    with tarfile.open(fileobj=__import__("io").BytesIO(archive)) as tar:
        tar.extractall(path, filter="data")
    return path


def time_case(case: dict, variants: dict[str, tuple[str, Any]], processes: dict[str, tuple[Path, bool]],
              threads: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of every variant of one case, interleaved: one call of each per round.

    variants: label -> (process name, spec overrides or a function of the case giving them);
    processes: name -> (code root, heap reuse), started fresh for this case and closed after it."""
    workers = {name: Worker(root, threads, heap) for name, (root, heap) in processes.items()
               if any(name == process for process, _ in variants.values())}
    times: dict[str, list[float]] = {label: [] for label in variants}
    try:
        for _ in range(repeats):
            for label, (process, overrides) in variants.items():
                extra = overrides(case) if callable(overrides) else overrides
                times[label].append(workers[process].ask({"spec": {**case, **extra}})["seconds"])
    finally:
        for w in workers.values():
            w.close()
    return times


def parse_case(kind: str, text: str) -> dict:
    preset, batch = text.split(":")
    return {"kind": kind, "preset": preset, "batch": int(batch)}


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def table(title: str, cases: list[dict], results: list[dict[str, list[float]]], ratio_to: str) -> str:
    """Markdown: a row per case, median seconds per variant and the speed-up of each over ``ratio_to``."""
    labels = list(results[0])
    head = f"| {title} | " + " | ".join(f"{label} (s)" for label in labels)
    head += " | " + " | ".join(f"x {label}" for label in labels if label != ratio_to) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(labels) - 1)]
    for case, times in zip(cases, results, strict=True):
        med = {label: median(ts) for label, ts in times.items()}
        row = f"| {case['kind']} {case['preset']} b{case['batch']} | " + " | ".join(f"{med[k]:.3f}" for k in labels)
        row += " | " + " | ".join(f"{med[ratio_to] / med[k]:.2f}" for k in labels if k != ratio_to) + " |"
        lines.append(row)
    return "\n".join(lines)


def bf16_error(threads: int, n: int = 8, steps: int = 20) -> dict[str, float]:
    """Reconstruction of n held-out shapes by the shipped demo model in bf16 autocast vs fp32 ([-1,1] units)."""
    import torch

    from diffae_core import DiffAE
    from diffae_core.datasets import shapes_array

    torch.set_num_threads(threads)
    model = DiffAE.load(ROOT / "assets" / "demo-model")
    images, _ = shapes_array(n, size=model.image_size, seed=1, start=10_000)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    out = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        model.inference_dtype = dtype
        out[name] = model.reconstruct(x, steps=steps)
    diff = (out["bf16"] - out["fp32"]).abs()
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(),
            "fp32_vs_input_mean_abs": (out["fp32"] - x).abs().mean().item(),
            "bf16_vs_input_mean_abs": (out["bf16"] - x).abs().mean().item()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="1ef4644", help="the commit to compare against")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--train", nargs="*", default=["tiny32:8", "tiny32:16", "tiny32:32", "demo16:32", "ffhq64:4"])
    p.add_argument("--recon", nargs="*", default=["tiny32:1", "tiny32:8", "ffhq64:1"])
    p.add_argument("--options", action="store_true", help="also time each option on this tree, and the bf16 error")
    p.add_argument("--json", type=Path)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--heap-reuse", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.threads, args.heap_reuse)
        return 0
    sys.path.insert(0, str(ROOT))
    from diffae_core.performance import PerformanceOptions

    with tempfile.TemporaryDirectory() as tmp:
        processes = {"base": (extract(args.base, tmp), False), "new": (ROOT, False),
                     "tuned": (ROOT, PerformanceOptions.for_device("cpu").heap_reuse)}
        print(f"# compare_core: {args.base} vs this tree, {args.threads} thread(s), {args.repeats} rounds, "
              f"load average at start {os.getloadavg()}", flush=True)
        report = run_all(args, processes)
    report["load_average_end"] = os.getloadavg()
    if args.options:
        report["bf16_error"] = bf16_error(args.threads)
        print("\nbf16 vs fp32 reconstruction (demo model, 8 shapes, 20+20 steps):", report["bf16_error"])
    print(f"\nload average at end {report['load_average_end']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def defaults(case: dict) -> dict:
    """This tree's diffae_core.performance defaults on the CPU for the case's preset, as spec overrides;
    a reconstruction's model is frozen, as a serving replica's."""
    from diffae_core.config import get_preset
    from diffae_core.performance import PerformanceOptions

    options = PerformanceOptions.for_device("cpu", get_preset(case["preset"]).image_size)
    return {"channels_last": options.channels_last, "fused": options.fused_optimizer, "frozen": case["kind"] == "recon"}


def run_all(args: argparse.Namespace, processes: dict[str, tuple[Path, bool]]) -> dict:
    """The before/after tables (and with --options the per-option tables); prints each as it completes.

    processes: "base" (the --base commit), "new" (this tree, a plain process), "tuned" (this tree with
    the CPU's process-wide defaults)."""
    report: dict = {}
    headline = {"before": ("base", BEFORE), "after, same options": ("new", BEFORE),
                "after, defaults": ("tuned", defaults), "after, defaults but no heap reuse": ("new", defaults)}
    groups = [("train", args.train, headline), ("recon", args.recon, headline)]
    if args.options:
        train = {k: ("new", v) for k, v in TRAIN_OPTIONS.items()} | {"defaults (+ heap reuse)": ("tuned", defaults)}
        recon = {k: ("new", v) for k, v in RECON_OPTIONS.items()} | {"defaults (+ heap reuse)": ("tuned", defaults)}
        groups += [("train", args.train[1:2], train), ("recon", args.recon[1:2], recon)]
    for index, (kind, texts, variants) in enumerate(groups):
        if not texts:  # e.g. `--recon` with no cases: that table is skipped
            continue
        cases = [parse_case(kind, text) for text in texts]
        results = [time_case(case, variants, processes, args.threads, args.repeats) for case in cases]
        first = next(iter(variants))
        title = "20+20-step reconstruction" if kind == "recon" else "training step"
        print("\n" + table(title, cases, results, first), flush=True)
        report[f"group{index}"] = [{"case": c, "seconds": r} for c, r in zip(cases, results, strict=True)]
    return report


if __name__ == "__main__":
    sys.exit(main())
