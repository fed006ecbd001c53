"""HTTP load on the Serve application: requests/s and p50/p95/p99 latency, batching on and off.

    python benchmarks/serve_load.py [--bundle DIR] [--preset tiny32] [--routes encode reconstruct manipulate]
                                    [--concurrency 1 4 16] [--requests 48] [--steps 10] [--max-batch-size 8]

Without --bundle, a bundle of the preset with random weights (plus a random 2-attribute classifier) is
written to a temporary directory: throughput does not depend on what the weights learned. The app runs on
an embedded Ray on 127.0.0.1 with one Encoder and one Decoder replica (fixed, so the numbers show
batching rather than autoscaling); "off" deploys it with max_batch_size 1. Each (route, concurrency)
point is a closed loop: C clients, each sending its next request when the last one answered.
Prints a markdown table and the throughput factor batching gives at the highest concurrency.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine  # noqa: E402
from diffae_core import DiffAE  # noqa: E402
from diffae_core.images import png_bytes  # noqa: E402
from serving.loadgen import ClosedLoop, summary  # noqa: E402


def make_bundle(preset: str, root: str) -> str:
    torch.manual_seed(0)
    model = DiffAE.from_preset(preset)
    z_dim = model.config.z_dim
    model.attach_classifier(torch.randn(2, z_dim), torch.zeros(2), torch.zeros(z_dim), torch.ones(z_dim),
                            ["a", "b"])
    path = str(Path(root) / preset)
    model.save(path)
    return path


def app_args(bundle: str, max_batch_size: int, threads: int) -> dict:
    fixed = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.5, "torch_threads": threads,
             "max_ongoing_requests": 64}
    return {
        "bundle": bundle,
        "limits": {"max_inflight": 1024},
        "batching": {name: {"max_batch_size": max_batch_size, "batch_wait_timeout_s": 0.01}
                     for name in ("Encoder", "Decoder")},
        # logical CPUs sum to 1.7, so the app fits a 2-CPU Ray
        "deployments": {"Encoder": fixed, "Decoder": fixed,
                        "Ingress": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.5},
                        "LatentSampler": {"num_cpus": 0.1}},
    }


def closed_loop(url: str, path: str, body: dict, concurrency: int, requests: int) -> dict:
    """``requests`` calls from ``concurrency`` clients (serving.loadgen); rps and latency percentiles (ms)."""
    result = summary(ClosedLoop(url, path, body, concurrency, max_requests=requests, max_seconds=1800).run())
    return {**result, "failures": result["requests"] - result["codes"].get(200, 0)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", help="a bundle with a classifier (default: random weights of --preset)")
    p.add_argument("--preset", default="tiny32")
    p.add_argument("--routes", nargs="+", default=["encode", "reconstruct", "manipulate"])
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=48, help="requests per point (after 2 warm-up requests)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps of reconstruct / manipulate")
    p.add_argument("--max-batch-size", type=int, default=8, help="batch size when batching is on")
    p.add_argument("--threads", type=int, default=1, help="torch threads per model replica")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    import ray

    from serving.cli import start

    tmp = tempfile.mkdtemp(prefix="serve-load-")
    bundle = args.bundle or make_bundle(args.preset, tmp)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    manifest = json.loads((Path(bundle) / "manifest.json").read_text()) if Path(bundle).exists() else {}
    size = manifest.get("image_size", 32)
    image = base64.b64encode(png_bytes(torch.rand(3, size, size) * 2 - 1)).decode()
    attribute = (manifest.get("attributes") or ["a"])[0]
    bodies = {
        "encode": {"image": image},
        "reconstruct": {"image": image, "steps": args.steps, "seed": 0},
        "manipulate": {"image": image, "attribute": attribute, "alpha": 0.3, "steps": args.steps, "seed": 0},
    }
    print(f"# serve_load, {machine()}, bundle {manifest.get('preset', bundle)} ({size}px), steps={args.steps}, "
          f"{args.requests} requests per point, threads/replica={args.threads}")
    rows = []
    for batching in ("on", "off"):
        url = start(app_args(bundle, args.max_batch_size if batching == "on" else 1, args.threads), port=args.port)
        for route in args.routes:
            for concurrency in args.concurrency:
                path = f"/v1/{route}"
                closed_loop(url, path, bodies[route], min(concurrency, 2), 2)  # warm-up
                result = closed_loop(url, path, bodies[route], concurrency, args.requests)
                rows.append({"batching": batching, "route": route, "concurrency": concurrency, **result})
                print(f"batching {batching:3} {route:12} c={concurrency:<3} {result['rps']:7.2f} req/s  "
                      f"p50 {result['p50']:7.0f} ms  p95 {result['p95']:7.0f} ms  p99 {result['p99']:7.0f} ms  "
                      f"failures {result['failures']}", flush=True)
    from ray import serve

    serve.shutdown()
    ray.shutdown()

    print("\n| route | concurrency | batching | req/s | p50 ms | p95 ms | p99 ms |\n|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["route"], r["concurrency"], r["batching"] == "off")):
        print(f"| {r['route']} | {r['concurrency']} | {r['batching']} | {r['rps']:.2f} | {r['p50']:.0f} | "
              f"{r['p95']:.0f} | {r['p99']:.0f} |")
    top = max(args.concurrency)
    rps = {(r["batching"], r["route"]): r["rps"] for r in rows if r["concurrency"] == top}
    for route in args.routes:
        print(f"batching factor at concurrency {top}, {route}: {rps[('on', route)] / rps[('off', route)]:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "machine": machine(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
