"""End-to-end training throughput (images/s) of ``train_autoencoder`` with 1 and 2 Ray Train workers.

    python benchmarks/train_throughput.py [--preset tiny32] [--image-size 32] [--batch-size 32]
                                          [--steps 30] [--workers 1 2] [--num-cpus 4] [--cpus-per-worker 1]

Runs the real job (Ray Data ``shapes`` -> TorchTrainer DDP on CPU, gloo) for ``--steps`` global steps per
worker count and prints the images/s rank 0 reports over the second half of the run (start-up and the
first steps excluded), plus the wall time of the whole fit() including start-up. The global batch is the
same for every worker count, so 2 workers split each step; on a 2-core machine they compete for the
same cores, and the number shows the DDP overhead rather than a speed-up.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny32")
    p.add_argument("--image-size", type=int, help="override the preset's image size")
    p.add_argument("--batch-size", type=int, default=32, help="global batch")
    p.add_argument("--steps", type=int, default=30, help="global steps per run")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--use-gpu", action="store_true")
    args = p.parse_args(argv)
    import ray

    from diffae_core.config import get_preset
    from pipelines.train_autoencoder import TrainJobConfig, train_autoencoder

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short Unix socket paths
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    print(f"# train throughput, {machine()}, Ray {ray.__version__} num_cpus={args.num_cpus}, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"# preset {args.preset}, global batch {args.batch_size}, {args.steps} steps, "
          f"{args.cpus_per_worker} CPU per worker")
    print("workers  images/s (2nd half)  fit() wall s")
    with tempfile.TemporaryDirectory() as runs:
        for workers in args.workers:
            model = get_preset(args.preset)
            if args.image_size:
                model.unet.image_size = args.image_size
            model.train.batch_size = args.batch_size
            model.train.total_samples = args.batch_size * args.steps
            half = max(1, args.steps // 2)
            job = TrainJobConfig(data=f"shapes:{args.batch_size * args.steps}", storage=runs, name=f"w{workers}",
                                 model=model, num_workers=workers, use_gpu=args.use_gpu,
                                 cpus_per_worker=args.cpus_per_worker, log_every=half,
                                 checkpoint_every=10**12, grid_every=10**12)
            start = time.perf_counter()
            result = train_autoencoder(job)
            wall = time.perf_counter() - start
            print(f"{workers:7}  {result.metrics['samples_per_second']:19.1f}  {wall:12.1f}", flush=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
