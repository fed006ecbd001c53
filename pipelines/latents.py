"""The latents directory that ``diffae infer-latents`` writes and the latent-DPM and classifier jobs read.

    DIR/latents/*.parquet   id, z_sem (fixed_size_list<float32>[Z]), and the data set's attribute columns
    DIR/stats.safetensors   z_mean, z_std [Z] float32 (std unbiased, N-1) + metadata: count, attributes,
                            the sha256 of the autoencoder weights that produced the latents
    DIR/summary.json        the same numbers for people, plus timings
    DIR/config.json         the resolved settings of the run

This is our form of the official ``latent.pkl`` (``conds``, ``conds_mean``, ``conds_std``): the latent DPM
trains on (z - z_mean) / z_std.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from diffae_core import DiffAE, storage
from diffae_core.bundle import MANIFEST, autoencoder_sha256

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

    fs, path = storage.filesystem(storage.join(uri, LATENTS_DIR), endpoint)
    return ray.data.read_parquet(path, filesystem=fs, columns=columns)


def read_stats(uri: str, endpoint: str | None = None) -> LatentStats:
    """The :class:`LatentStats` written by :func:`infer_latents` at ``uri``."""
    path = storage.join(uri, STATS_FILE)
    if not storage.exists(path, endpoint):
        raise FileNotFoundError(f"{path} not found: compute latents first with `diffae infer-latents --out {uri}`")
    return LatentStats.from_bytes(storage.read_bytes(path, endpoint))


def check_same_autoencoder(bundle: str, latents: str, endpoint: str | None = None) -> str:
    """The bundle's autoencoder sha256, after checking that the latents were computed with it (a head
    trained on another encoder's z_sem would be silently wrong)."""
    sha = autoencoder_sha256(bundle, endpoint)
    computed_with = read_stats(latents, endpoint).autoencoder_sha256
    if computed_with and computed_with != sha:
        raise ValueError(f"{latents} was computed with another autoencoder ({computed_with[:12]}...) than "
                         f"{bundle}'s ({sha[:12]}...): run `diffae infer-latents --bundle {bundle}` again")
    return sha


def attach_to_bundle(source: str, out: str | None, attach: Callable[[DiffAE], None],
                     expected_autoencoder: str | None = None, endpoint: str | None = None) -> str:
    """Add a head to a bundle and save it; returns the URI written.

    ``out`` None updates ``source`` in place; otherwise ``out`` is written, starting from the bundle already
    at ``out`` when there is one (so a latent DPM and a classifier trained one after the other into the same
    ``out`` both end up in it) and from ``source`` when there is none. ``expected_autoencoder`` (the sha256
    recorded with the latents) guards against attaching a head trained on another encoder's z_sem. The
    manifest is written last, so an interrupted save is refused at load time, never half-read.
    """
    target = out or source
    base = target if storage.exists(storage.join(target, MANIFEST), endpoint) else source
    sha = autoencoder_sha256(base, endpoint)
    if expected_autoencoder and sha != expected_autoencoder:
        raise ValueError(
            f"{base} has a different autoencoder (sha256 {sha[:12]}...) from the one that computed the latents "
            f"({expected_autoencoder[:12]}...): recompute them with `diffae infer-latents --bundle {base}`"
        )
    model = DiffAE.load(base, endpoint=endpoint)
    attach(model)
    model.save(target, endpoint)
    return target
