"""Encode a data set with a bundle's (EMA) semantic encoder: z_sem parquet + the z statistics.

    python -m pipelines.infer_latents --bundle BUNDLE --data SRC --out DIR [--concurrency N --batch-size B]

Batch inference runs as Ray Data ``map_batches`` on a pool of :class:`LatentEncoder` actors (each loads the
bundle once; a GPU each when the cluster has GPUs). Images are encoded as given: no flips, as the official
``infer_whole_dataset``. Output layout (a local directory or an s3:// prefix)::

    DIR/latents/*.parquet   id, z_sem (fixed_size_list<float32>[Z]), and the data set's attribute columns
    DIR/stats.safetensors   z_mean, z_std [Z] float32 (std unbiased, N-1) + metadata: count, attributes,
                            the sha256 of the autoencoder weights that produced the latents
    DIR/summary.json        the same numbers for people, plus timings
    DIR/config.json         the resolved settings of this run

This is our form of the official ``latent.pkl`` (``conds``, ``conds_mean``, ``conds_std``): the latent DPM
trains on (z - z_mean) / z_std.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from diffae_core.bundle import AUTOENCODER, load_bundle, read_manifest

from . import runtime, storage

LATENTS_DIR = "latents"
STATS_FILE = "stats.safetensors"
Z_COLUMN = "z_sem"
ID_COLUMN = "id"
IMAGE_COLUMN = "image"


@dataclass
class LatentStats:
    """Statistics of z_sem over a data set (the official ``conds_mean`` / ``conds_std``).

    mean, std: [Z] float32 (std is the unbiased N-1 estimate); count: N rows; attributes: names of the
    attribute columns stored next to z_sem; autoencoder_sha256: which weights encoded them.
    """

    mean: torch.Tensor
    std: torch.Tensor
    count: int
    attributes: list[str]
    autoencoder_sha256: str | None

    def to_bytes(self) -> bytes:
        metadata = {
            "count": str(self.count),
            "attributes": json.dumps(self.attributes),
            "autoencoder_sha256": self.autoencoder_sha256 or "",
        }
        return st_save({"z_mean": self.mean.float().contiguous(), "z_std": self.std.float().contiguous()},
                       metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes) -> LatentStats:
        tensors = st_load(data)
        # safetensors layout: u64 little-endian header length, then a JSON header holding "__metadata__"
        (header_len,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
        return cls(
            mean=tensors["z_mean"], std=tensors["z_std"], count=int(meta.get("count", 0)),
            attributes=json.loads(meta.get("attributes", "[]")),
            autoencoder_sha256=meta.get("autoencoder_sha256") or None,
        )


class RunningMoments:
    """Mean and unbiased variance of rows streamed in batches (Chan et al.'s parallel update, float64).

    Merging per-batch (count, mean, M2) is exact up to float64 rounding and does not lose precision the
    way a running sum of squares does when the mean is large relative to the spread.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None

    def update(self, rows: np.ndarray) -> None:
        """rows: [b, Z] (any float dtype)."""
        rows = np.asarray(rows, dtype=np.float64)
        b = rows.shape[0]
        if b == 0:
            return
        batch_mean = rows.mean(axis=0)
        batch_m2 = ((rows - batch_mean) ** 2).sum(axis=0)
        if self.mean is None:
            self.count, self.mean, self.m2 = b, batch_mean, batch_m2
            return
        total = self.count + b
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (b / total)
        self.m2 = self.m2 + batch_m2 + delta**2 * (self.count * b / total)
        self.count = total

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [Z], unbiased std [Z]) as float32."""
        if self.count < 2:
            raise ValueError(f"need at least 2 latents for an unbiased std, got {self.count}")
        std = np.sqrt(self.m2 / (self.count - 1))
        return torch.from_numpy(self.mean).float(), torch.from_numpy(std).float()


def z_array(table: pa.Table, column: str = Z_COLUMN) -> np.ndarray:
    """The z_sem column of an arrow batch as a [b, Z] float32 array (zero-copy when possible)."""
    col = table.column(column).combine_chunks()
    width = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


def z_column(z: np.ndarray) -> pa.FixedSizeListArray:
    """[b, Z] float32 -> a fixed_size_list<float32>[Z] column (readable by any parquet reader)."""
    z = np.ascontiguousarray(z, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(z.reshape(-1)), z.shape[1])


class LatentEncoder:
    """Ray Data callable class: image batches -> id, z_sem and the pass-through attribute columns.

    Loads the bundle once per actor. Input batch (numpy format): ``image`` [B,3,S,S] float32 in [-1,1],
    ``id``, any attribute columns. Output: a pyarrow table without ``image``, with ``z_sem`` [B, Z].
    """

    def __init__(self, bundle: str, num_gpus: float = 0.0, precision: str = "fp32", endpoint: str | None = None):
        self.model = load_bundle(bundle, device=runtime.inference_device(num_gpus), endpoint=endpoint)
        self.model.inference_dtype = runtime.PRECISIONS[precision]

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if IMAGE_COLUMN not in batch or ID_COLUMN not in batch:
            raise ValueError(f"image rows need '{IMAGE_COLUMN}' and '{ID_COLUMN}' columns, got {sorted(batch)}")
        x = torch.from_numpy(np.ascontiguousarray(batch[IMAGE_COLUMN], dtype=np.float32))
        z = self.model.encode(x).cpu().numpy()
        columns = {k: pa.array(v) for k, v in batch.items() if k != IMAGE_COLUMN}
        columns[Z_COLUMN] = z_column(z)
        return pa.table(columns)


def encode_dataset(images, bundle: str, *, batch_size: int = 64, concurrency: int = 1, num_gpus: float = 0.0,
                   precision: str = "fp32", endpoint: str | None = None):
    """Lazily map a Ray Dataset of image rows to latent rows (see :class:`LatentEncoder`)."""
    import ray

    return images.map_batches(
        LatentEncoder,
        fn_constructor_kwargs={"bundle": bundle, "num_gpus": num_gpus, "precision": precision,
                               "endpoint": endpoint},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_gpus=num_gpus,
        batch_format="numpy",
    )


def attribute_columns(schema: pa.Schema) -> list[str]:
    """Scalar numeric/bool columns other than id and z_sem: the per-image attributes."""
    return [
        f.name for f in schema
        if f.name not in (ID_COLUMN, Z_COLUMN) and (pa.types.is_integer(f.type) or pa.types.is_boolean(f.type)
                                                   or pa.types.is_floating(f.type))
    ]


def read_latents(uri: str, columns: list[str] | None = None, endpoint: str | None = None):
    """The latent rows written by :func:`infer_latents` at ``uri`` as a Ray Dataset."""
    import ray

    fs, path = storage.filesystem(storage.uri_join(uri, LATENTS_DIR), endpoint)
    return ray.data.read_parquet(path, filesystem=fs, columns=columns)


def read_stats(uri: str, endpoint: str | None = None) -> LatentStats:
    """The :class:`LatentStats` written by :func:`infer_latents` at ``uri``."""
    path = storage.uri_join(uri, STATS_FILE)
    if not runtime.exists(path, endpoint):
        raise FileNotFoundError(f"{path} not found: compute latents first with `diffae infer-latents --out {uri}`")
    return LatentStats.from_bytes(runtime.read_bytes(path, endpoint))


def autoencoder_sha256(bundle: str, endpoint: str | None = None) -> str:
    """sha256 of a bundle's autoencoder weights (identifies which encoder produced latents)."""
    return read_manifest(bundle, endpoint)["files"][AUTOENCODER]["sha256"]


def infer_latents(images, bundle: str, out: str, *, batch_size: int = 64, concurrency: int = 1,
                  num_gpus: float = 0.0, precision: str = "fp32", endpoint: str | None = None,
                  skips=None) -> LatentStats:
    """Encode every image row of ``images`` (a Ray Dataset), write the parquet and the statistics to ``out``.

    Returns the :class:`LatentStats` also written to ``out/stats.safetensors``. Existing latents under
    ``out/latents`` are replaced. ``skips``: the data set's :class:`pipelines.data.SkipTracker`, whose count
    of unreadable images goes into ``summary.json``.
    """
    import ray
    from ray.data._internal.savemode import SaveMode

    started = time.time()
    bundle, out = storage.absolute(bundle), storage.absolute(out)  # actors and tasks have their own cwd
    sha = autoencoder_sha256(bundle, endpoint)
    fs, path = storage.filesystem(storage.uri_join(out, LATENTS_DIR), endpoint)
    latents = encode_dataset(images, bundle, batch_size=batch_size, concurrency=concurrency, num_gpus=num_gpus,
                             precision=precision, endpoint=endpoint)
    latents.write_parquet(path, filesystem=fs, mode=SaveMode.OVERWRITE)
    encoded = time.time()

    # A second, cheap pass over the written z column: moments in float64, independent of row order.
    written = ray.data.read_parquet(path, filesystem=fs)
    attributes = attribute_columns(written.schema().base_schema)
    moments = RunningMoments()
    for batch in written.select_columns([Z_COLUMN]).iter_batches(batch_size=4096, batch_format="pyarrow"):
        moments.update(z_array(batch))
    mean, std = moments.result()
    stats = LatentStats(mean=mean, std=std, count=moments.count, attributes=attributes, autoencoder_sha256=sha)
    runtime.write_bytes(storage.uri_join(out, STATS_FILE), stats.to_bytes(), endpoint)
    runtime.write_json(storage.uri_join(out, "summary.json"), {
        "count": stats.count, "z_dim": int(mean.numel()), "attributes": attributes,
        "autoencoder_sha256": sha, "bundle": bundle,
        "z_mean_norm": float(mean.norm()), "z_std_mean": float(std.mean()),
        "seconds_encoding": encoded - started, "images_per_second": stats.count / max(encoded - started, 1e-9),
        **(skips.summary() if skips is not None else {}),
    }, endpoint)
    return stats


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bundle", required=True, help="the model bundle (path or s3://) whose EMA encoder is used")
    runtime.add_data_flags(p, split="all", holdout=0.0)
    p.add_argument("--out", required=True, help="output directory (path or s3://) for latents/ and stats")
    runtime.add_inference_flags(p, batch_size=64)
    runtime.add_storage_flags(p)
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    endpoint = runtime.resolve_endpoint(args.s3_endpoint)
    runtime.ensure_ray()
    num_gpus = runtime.resolve_num_gpus(args.num_gpus)
    image_size = read_manifest(args.bundle, endpoint)["image_size"]
    settings = {**vars(args), "num_gpus": num_gpus, "image_size": image_size, "s3_endpoint": endpoint}
    runtime.save_run_config(args.out, "infer-latents", settings, endpoint)
    data = runtime.open_data(args, image_size, endpoint)
    stats = infer_latents(data.dataset, args.bundle, args.out, batch_size=args.batch_size, concurrency=args.concurrency,
                          num_gpus=num_gpus, precision=args.precision, endpoint=endpoint, skips=data.skips)
    print(json.dumps({"out": args.out, "count": stats.count, "attributes": stats.attributes,
                      "skipped": data.skips.count()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
