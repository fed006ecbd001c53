"""infer_latents, train_latent and train_classifier on a real local Ray with the micro model and `shapes`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import micro_config

from diffae_core import DiffAE
from diffae_core.config import TrainConfig
from diffae_core.datasets import SHAPES_ATTRIBUTES
from pipelines.data import load_dataset
from pipelines.infer_latents import infer_latents
from pipelines.latents import Z_COLUMN, read_latents, read_stats, z_array
from pipelines.train_classifier import ClassifierJob, train_classifier
from pipelines.train_latent import LatentTrainJob, train_latent

SHAPES = 320  # images: enough for a held-out AUROC, a few seconds to encode at 16 px


@pytest.fixture(scope="module")
def micro_model() -> DiffAE:
    """A freshly initialised micro16 Diff-AE. Its encoder already maps the shapes' colour, size and position
    to linearly separable z_sem, and it costs nothing to build (training one takes minutes on a busy machine)."""
    torch.manual_seed(0)
    return DiffAE(micro_config()).eval()


@pytest.fixture(scope="module")
def bundle(micro_model, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("bundle") / "micro"
    micro_model.save(path)
    return str(path)


@pytest.fixture(scope="module")
def latents(ray_cluster, bundle, tmp_path_factory):
    """(latents dir, stats) of `shapes` at 16 px encoded by the bundle's encoder on an actor pool."""
    out = str(tmp_path_factory.mktemp("latents"))
    stats = infer_latents(load_dataset(f"shapes:{SHAPES}", 16), bundle, out, batch_size=64, concurrency=2)
    return out, stats


def test_infer_latents_rows_and_statistics_equal_a_direct_computation(latents, micro_model):
    out, stats = latents
    rows = sorted(load_dataset(f"shapes:{SHAPES}", 16).take_all(), key=lambda r: r["id"])
    x = torch.from_numpy(np.stack([r["image"] for r in rows]))
    z = micro_model.encode(x).double()

    assert stats.count == SHAPES and stats.attributes == list(SHAPES_ATTRIBUTES)
    torch.testing.assert_close(stats.mean.double(), z.mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.std.double(), z.std(0, unbiased=True), atol=1e-5, rtol=0)
    stored = read_stats(out)
    assert torch.equal(stored.mean, stats.mean) and torch.equal(stored.std, stats.std)
    assert stored.count == SHAPES and stored.autoencoder_sha256

    assert read_latents(out).count() == SHAPES
    table = pq.read_table(Path(out) / "latents").sort_by("id")  # plain parquet: readable without Ray
    assert table.column("id").to_pylist() == [r["id"] for r in rows]
    torch.testing.assert_close(torch.from_numpy(z_array(table, Z_COLUMN)).double(), z, atol=1e-5, rtol=0)
    for name in SHAPES_ATTRIBUTES:
        assert table.column(name).to_pylist() == [r[name] for r in rows]
    summary = json.loads((Path(out) / "summary.json").read_text())
    assert summary["count"] == SHAPES


def test_train_latent_loss_falls_and_the_bundle_samples_deterministically(ray_cluster, latents, bundle, tmp_path):
    out_dir, stats = latents
    recipe = TrainConfig(batch_size=64, lr=1e-3, optimizer="adamw", weight_decay=0.01, total_samples=64 * 240,
                         ema_decay=0.99, ema_warmup_steps=20, seed=0)
    job = LatentTrainJob(bundle=bundle, latents=out_dir, storage=str(tmp_path / "runs"), name="latent",
                         out=str(tmp_path / "with-latent"), train=recipe, cpus_per_worker=0.5, log_every=40,
                         checkpoint_every=64 * 120)
    result = train_latent(job)

    assert result.steps == 240 and result.samples == 64 * 240
    losses = [loss for _, loss in result.history]
    assert len(losses) == 6 and losses[-1] < 0.85 * losses[0], losses
    config = json.loads((tmp_path / "runs" / "latent" / "config.json").read_text())
    assert config["job"] == "train-latent" and config["config"]["train"]["total_samples"] == 64 * 240

    model = DiffAE.load(result.bundle)
    torch.testing.assert_close(model.latent_mean, stats.mean)
    torch.testing.assert_close(model.latent_std, stats.std)
    noise, latent_noise = torch.randn(3, 3, 16, 16), torch.randn(3, 512)
    a = model.sample(3, steps=5, latent_steps=10, noise=noise, latent_noise=latent_noise)
    b = DiffAE.load(result.bundle).sample(3, steps=5, latent_steps=10, noise=noise, latent_noise=latent_noise)
    assert a.shape == (3, 3, 16, 16) and torch.isfinite(a).all() and torch.equal(a, b)
    assert not torch.equal(a[0], a[1])
    # the source bundle was left alone (--out given)
    assert DiffAE.load(bundle).latent_net is None


def test_train_classifier_beats_chance_on_heldout_shapes(ray_cluster, latents, bundle, tmp_path):
    out_dir, _ = latents
    job = ClassifierJob(bundle=bundle, latents=out_dir, storage=str(tmp_path / "runs"), name="cls",
                        out=str(tmp_path / "with-classifier"), holdout=0.25,
                        train=TrainConfig(batch_size=32, lr=1e-3, optimizer="adam", grad_clip=0.0,
                                          total_samples=32 * 1500, seed=0))
    result = train_classifier(job)
    metrics = result.metrics
    print(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=1))

    assert metrics["train_count"] + metrics["heldout_count"] == SHAPES and metrics["heldout_count"] >= 50
    held = metrics["heldout"]
    assert set(held) == set(SHAPES_ATTRIBUTES)
    assert held["red"]["auroc"] > 0.95 and held["large"]["auroc"] > 0.9
    assert metrics["mean_auroc"] > 0.8
    saved = json.loads((tmp_path / "runs" / "cls" / "metrics.json").read_text())
    assert saved["mean_auroc"] == pytest.approx(metrics["mean_auroc"])

    model = DiffAE.load(result.bundle)
    assert model.attributes == list(SHAPES_ATTRIBUTES)
    rows = sorted(load_dataset(f"shapes:{SHAPES}", 16).take(64), key=lambda r: r["id"])
    x = torch.from_numpy(np.stack([r["image"] for r in rows]))
    predicted = (model.classify(model.encode(x))[:, 1] > 0).long()
    truth = torch.tensor([r["red"] for r in rows])
    assert (predicted == truth).float().mean() > 0.9
