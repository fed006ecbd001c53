"""Ray Data ingest throughput (images/s delivered to a training loop) vs what a training step consumes.

    python benchmarks/ingest.py [--images 2000] [--image-size 32] [--preset tiny32] [--batch-size 32]
                                [--num-cpus 2] [--threads 1]

Sources: the built-in ``shapes`` (rendered in Ray Data tasks) and the same images prepared as parquet
(``diffae data prepare``: PNG decode + preprocessing in Ray Data tasks). Each is read as a training job
reads it (split "train", random flip, batches with a local shuffle buffer, as tensors), after one
warm-up pass. "consumed" is the image rate of one training step of ``--preset`` at ``--batch-size`` on
this machine (the same step as benchmarks/train_step.py). Ingest keeps up when delivered >= consumed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, median, setup_threads, time_calls  # noqa: E402
from benchmarks.train_step import make_step  # noqa: E402


def delivered(source: str, image_size: int, batch: int, images: int) -> float:
    """Images/s the training-style batch iterator yields for ``source`` (second pass; the first warms Ray up)."""
    from pipelines.data import open_images

    rates = []
    for _ in range(2):
        ds = open_images(source, image_size, split="train", flip=True).dataset.limit(images)
        start, n = time.perf_counter(), 0
        # what a training worker does per batch: numpy rows -> a float32 tensor (ids stay strings)
        for b in ds.iter_batches(batch_size=batch, batch_format="numpy", local_shuffle_buffer_size=4 * batch):
            n += len(torch.from_numpy(b["image"]))
        rates.append(n / (time.perf_counter() - start))
    return rates[-1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--preset", default="tiny32", help="model whose training step is the consumer")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-cpus", type=int, default=2, help="logical CPUs of the local Ray")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the timed training step (1, as Ray Train workers get OMP_NUM_THREADS=1)")
    args = p.parse_args(argv)
    import ray

    from pipelines.data import prepare

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short Unix socket paths
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    setup_threads(args.threads)
    print(f"# ingest, {machine()}, Ray {ray.__version__} num_cpus={args.num_cpus}, load {os.getloadavg()[0]:.1f}")
    print(f"# {args.images} images at {args.image_size} px, batch {args.batch_size}")
    rates = {}
    rates["shapes (rendered)"] = delivered(f"shapes:{args.images}", args.image_size, args.batch_size, args.images)
    with tempfile.TemporaryDirectory() as d:
        prepare(f"shapes:{args.images}", f"{d}/parquet", args.image_size, rows_per_file=500)
        rates["parquet (PNG decode)"] = delivered(f"{d}/parquet", args.image_size, args.batch_size, args.images)
    ray.shutdown()

    step = make_step(args.preset, args.batch_size, torch.device("cpu"), False, "foreach", None)
    consumed = args.batch_size / median(time_calls(step, torch.device("cpu"), repeats=5))
    print("source                 images/s delivered  images/s consumed  headroom")
    for name, rate in rates.items():
        print(f"{name:22} {rate:18.0f}  {consumed:17.1f}  {rate / consumed:7.1f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
