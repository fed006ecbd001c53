"""Encode a data set with a bundle's (EMA) semantic encoder: z_sem parquet + the z statistics.

    python -m pipelines.infer_latents --bundle BUNDLE --data SRC --out DIR [--concurrency N --batch-size B]

Batch inference runs as Ray Data ``map_batches`` on a pool of :class:`LatentEncoder` actors (each loads the
bundle's encoder once; a GPU each when the cluster has GPUs). Images are encoded as given: no flips, as the
official ``infer_whole_dataset``. The output directory's layout is described in :mod:`pipelines.latents`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import ray

from diffae_core import storage
from diffae_core.bundle import autoencoder_sha256, read_config

from . import cluster, jobkit
from .inference import ActorPool, BundleActor, ImageInput
from .jobkit import option
from .latents import (
    ID_COLUMN,
    IMAGE_COLUMN,
    LATENTS_DIR,
    STATS_FILE,
    Z_COLUMN,
    LatentStats,
    RunningMoments,
    attribute_columns,
    z_array,
    z_column,
)


@dataclass(kw_only=True)
class InferLatentsJob(ImageInput, ActorPool):
    """Encode a data set to z_sem parquet + mean/std with a bundle's encoder (Ray Data actor pool)."""

    job_name: ClassVar[str] = "infer_latents"

    bundle: str = option(help="the model bundle (path or s3://) whose EMA encoder is used", path=True)
    out: str = option(help="output directory (path or s3://) for latents/ and the statistics", path=True)


class LatentEncoder(BundleActor):
    """Ray Data callable class: image batches -> id, z_sem and the pass-through attribute columns.

    Input batch (numpy format): ``image`` [B,3,S,S] float32 in [-1,1], ``id``, any attribute columns.
    Output: a pyarrow table without ``image``, with ``z_sem`` [B, Z].
    """

    def __init__(self, bundle: str, num_gpus: float = 0.0, precision: str = "fp32", endpoint: str | None = None):
        super().__init__(bundle, num_gpus, precision, endpoint, parts=("encoder",))

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if IMAGE_COLUMN not in batch or ID_COLUMN not in batch:
            raise ValueError(f"image rows need '{IMAGE_COLUMN}' and '{ID_COLUMN}' columns, got {sorted(batch)}")
        z = self.model.encode(self.images(batch, self.device)).cpu().numpy()
        columns = {k: pa.array(v) for k, v in batch.items() if k != IMAGE_COLUMN}
        columns[Z_COLUMN] = z_column(z)
        return pa.table(columns)


def _moments(uri: str, endpoint: str | None) -> tuple[RunningMoments, list[str]]:
    """A second, cheap pass over the written z column: moments in float64, independent of row order."""
    fs, path = storage.filesystem(uri, endpoint)
    written = ray.data.read_parquet(path, filesystem=fs)
    moments = RunningMoments()
    for batch in written.select_columns([Z_COLUMN]).iter_batches(batch_size=4096, batch_format="pyarrow"):
        moments.update(z_array(batch))
    return moments, attribute_columns(written.schema().base_schema)


def infer_latents(images: Any, bundle: str, out: str, *, batch_size: int = 64, concurrency: int = 1,
                  num_gpus: float = 0.0, precision: str = "fp32", endpoint: str | None = None,
                  skips: Any = None) -> LatentStats:
    """Encode every image row of ``images`` (a Ray Dataset), write the parquet and the statistics to ``out``.

    Returns the :class:`LatentStats` also written to ``out/stats.safetensors``. Existing latents under
    ``out/latents`` are replaced. ``skips``: the data set's :class:`pipelines.data.SkipTracker`, whose count
    of unreadable images goes into ``summary.json``.
    """
    started = time.time()
    bundle, out = storage.absolute(bundle), storage.absolute(out)  # actors and tasks have their own cwd
    latents_uri = storage.join(out, LATENTS_DIR)
    pool = ActorPool(batch_size=batch_size, concurrency=concurrency, precision=precision, s3_endpoint=endpoint)
    fs, path = storage.filesystem(latents_uri, endpoint)
    pool.map(images, LatentEncoder, num_gpus, bundle=bundle).write_parquet(path, filesystem=fs,
                                                                           mode=ray.data.SaveMode.OVERWRITE)
    encoded = time.time()

    moments, attributes = _moments(latents_uri, endpoint)
    mean, std = moments.result()
    sha = autoencoder_sha256(bundle, endpoint)
    stats = LatentStats(mean=mean, std=std, count=moments.count, attributes=attributes, autoencoder_sha256=sha)
    storage.write_bytes(storage.join(out, STATS_FILE), stats.to_bytes(), endpoint)
    storage.write_json(storage.join(out, "summary.json"), {
        "count": stats.count, "z_dim": int(mean.numel()), "attributes": attributes,
        "autoencoder_sha256": sha, "bundle": bundle,
        "z_mean_norm": float(mean.norm()), "z_std_mean": float(std.mean()),
        "seconds_encoding": encoded - started, "images_per_second": stats.count / max(encoded - started, 1e-9),
        **(skips.job_summary() if skips is not None else {}),
    }, endpoint)
    return stats


def run(job: InferLatentsJob) -> dict[str, Any]:
    """The job: resolve resources, save the config, encode; returns the summary line."""
    job = job.prepared()
    num_gpus = cluster.inference_gpus(job.num_gpus)
    job.save_config(job.out)
    data = job.open_images(read_config(job.bundle, job.s3_endpoint).image_size)
    stats = infer_latents(data.dataset, job.bundle, job.out, batch_size=job.batch_size, concurrency=job.concurrency,
                          num_gpus=num_gpus, precision=job.precision, endpoint=job.s3_endpoint, skips=data.skips)
    return {"out": job.out, "count": stats.count, "attributes": stats.attributes, "skipped": data.skips.count()}


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    return jobkit.run_cli(InferLatentsJob, argv, prog, run)


if __name__ == "__main__":
    raise SystemExit(main(prog="python -m pipelines.infer_latents"))
