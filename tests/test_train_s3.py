"""S3 end to end on a moto server: prepare a local folder to s3:// -> train with checkpoints on s3:// ->
export the bundle to s3:// -> DiffAE.load it. Also counts the corrupt files of the folder."""

from __future__ import annotations

import json

import boto3
import numpy as np
import pytest
import torch
from conftest import micro_config
from PIL import Image

from diffae_core import DiffAE
from diffae_core.config import TrainConfig
from pipelines import data
from pipelines.export import export_bundle, list_checkpoints
from pipelines.train_autoencoder import TrainJobConfig, train_autoencoder

pytestmark = pytest.mark.timeout(600)

N_GOOD, N_CORRUPT = 24, 2


def make_folder(root) -> None:
    rng = np.random.default_rng(0)
    (root / "a").mkdir(parents=True)
    for i in range(N_GOOD):
        h, w = 20 + i % 5, 24 - i % 3  # mixed sizes: resize + centre crop to 16
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / ("a" if i % 2 else ".") / f"{i}.png")
    for i in range(N_CORRUPT):
        (root / f"bad{i}.jpg").write_bytes(b"not an image at all" + bytes(i))


def test_s3_prepare_train_export_load(ray_cluster, s3_bucket, s3_endpoint, tmp_path):
    make_folder(tmp_path / "imgs")
    prepared = f"s3://{s3_bucket}/data/shards"
    summary = data.prepare(str(tmp_path / "imgs"), prepared, 16, rows_per_file=10)
    assert summary["images"] == N_GOOD and summary["skipped"] == N_CORRUPT

    model = micro_config()
    model.train = TrainConfig(batch_size=8, lr=1e-3, total_samples=48, ema_decay=0.9, ema_warmup_steps=2, seed=0)
    job = TrainJobConfig(data=prepared, storage=f"s3://{s3_bucket}/runs", name="s3run", model=model, num_workers=1,
                         cpus_per_worker=1.0, checkpoint_every=24, grid_every=48, log_every=2, grid_images=2,
                         grid_steps=2)
    result = train_autoencoder(job)
    assert result.summary["samples_seen"] == 48 and result.summary["skipped_images"] == 0

    keys = {o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(
        Bucket=s3_bucket, Prefix="runs/s3run/")["Contents"]}
    print(sorted(keys))
    assert "runs/s3run/config.json" in keys and "runs/s3run/summary.json" in keys
    assert any(k.startswith("runs/s3run/grids/") and k.endswith(".png") for k in keys)
    assert any(k.startswith("runs/s3run/bundle/") for k in keys)
    checkpoints = list_checkpoints(result.run_dir)
    assert checkpoints and checkpoints[-1] == "checkpoint-step00000006"

    exported = export_bundle(result.run_dir, f"s3://{s3_bucket}/bundles/micro")
    assert exported.step == 6 and exported.samples_seen == 48 and exported.weights == "ema"
    loaded = DiffAE.load(exported.bundle)
    by_training = DiffAE.load(result.bundle)  # the bundle the run wrote itself: the same EMA weights
    for (name, a), (_, b) in zip(loaded.state_dict().items(), by_training.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    online = DiffAE.load(export_bundle(result.run_dir, f"s3://{s3_bucket}/bundles/online", weights="online").bundle)
    assert any(not torch.equal(a, b) for a, b in zip(online.parameters(), loaded.parameters(), strict=True))

    x = torch.from_numpy(np.stack([r["image"] for r in data.load_dataset(prepared, 16).take(2)]))
    z = loaded.encode(x)
    assert z.shape == (2, loaded.config.z_dim) and torch.isfinite(loaded.decode(torch.randn_like(x), z, 2)).all()
    info = json.loads(boto3.client("s3", endpoint_url=s3_endpoint).get_object(
        Bucket=s3_bucket, Key="data/shards/dataset.json")["Body"].read())
    assert info["skipped"] == N_CORRUPT
