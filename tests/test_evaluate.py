"""evaluate on a real local Ray: reconstruction metrics equal a direct computation, FID (pixel-feature stand-in)
equals the Fréchet distance of directly computed features, missing weights are reported as skipped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import micro_config

from diffae_core import DiffAE
from diffae_core import metrics as M
from diffae_core.latent import LatentMLP
from pipelines.cli import main as cli_main
from pipelines.data import load_dataset
from pipelines.evaluate import EvalJob, PixelFeatures, evaluate, quantise, sample_noise

pytestmark = pytest.mark.timeout(600)

DATA, HOLDOUT = "shapes:48", 0.25


@pytest.fixture(scope="module")
def bundle_with_latent(tmp_path_factory) -> str:
    """A freshly initialised micro autoencoder with a latent net: the metrics are compared with a direct
    computation, so the weights need not be trained."""
    torch.manual_seed(0)
    model = DiffAE(micro_config())
    z_dim = model.config.z_dim
    model.attach_latent(LatentMLP(model.config.latent), torch.zeros(z_dim), torch.ones(z_dim))
    path = tmp_path_factory.mktemp("eval") / "bundle"
    model.save(path)
    return str(path)


def features(x: torch.Tensor) -> np.ndarray:
    """The pixel stand-in's features of images in [-1,1], after the 8-bit round trip FID applies."""
    return PixelFeatures()(quantise((x.float() + 1) / 2).float() / 255).double().numpy()


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    return M.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def test_evaluate_matches_direct_computation(ray_cluster, bundle_with_latent, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights-here"))  # never found, never downloaded
    job = EvalJob(bundle=bundle_with_latent, data=DATA, out=str(tmp_path / "eval"), holdout=HOLDOUT, steps=(3, 5),
                  fid_feature="pixels", num_samples=12, sample_steps=3, latent_steps=4, grid_images=4,
                  batch_size=5, concurrency=2)
    result = evaluate(job)
    m = result.metrics
    print(json.dumps(m, indent=1, default=str))

    rows = sorted(load_dataset(DATA, 16, split="heldout", holdout=HOLDOUT).take_all(), key=lambda r: r["id"])
    x = torch.from_numpy(np.stack([r["image"] for r in rows]))
    model = DiffAE.load(bundle_with_latent)
    assert m["images"] == len(rows) >= 6
    real = features(x)
    for steps in (3, 5):
        r = model.reconstruct(x, steps=steps)
        x01, r01 = (x + 1) / 2, (r + 1) / 2
        got = m["reconstruction"][str(steps)]
        assert got["decoding_steps"] == got["inversion_steps"] == steps
        assert got["mse"] == pytest.approx(float(M.mse(x01, r01).mean()), rel=1e-4, abs=1e-7)
        assert got["psnr"] == pytest.approx(float(M.psnr(x01, r01).mean()), rel=1e-4)
        assert got["ssim"] == pytest.approx(float(M.ssim(x01, r01).mean()), rel=1e-4)
        assert got["lpips"] is None
        assert m["fid"]["autoencoding"][str(steps)] == pytest.approx(frechet(real, features(r)), rel=1e-2, abs=1e-4)
    noise, latent_noise = sample_noise(range(12), 16, model.config.z_dim, 0)
    samples = model.sample(12, steps=3, latent_steps=4, noise=noise, latent_noise=latent_noise)
    assert m["fid"]["samples"] == pytest.approx(frechet(real, features(samples)), rel=1e-2)
    assert m["fid"]["status"] == "ok" and m["fid"]["num_samples"] == 12
    assert m["lpips"]["status"] == "skipped" and "alexnet-owt-7be5be79.pth" in m["lpips"]["reason"]
    saved = json.loads((Path(job.out) / "metrics.json").read_text())
    assert saved["reconstruction"] == m["reconstruction"]
    assert {Path(g).name for g in result.grids} == {"reconstructions.png", "samples.png"}
    assert all(Path(g).stat().st_size > 100 for g in result.grids)


def test_evaluate_cli_reports_missing_inception_as_skipped(ray_cluster, bundle_with_latent, tmp_path, monkeypatch,
                                                           capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights-here"))
    out = tmp_path / "eval"
    assert cli_main(["evaluate", "--bundle", bundle_with_latent, "--data", DATA, "--holdout", str(HOLDOUT), "--out", str(out),
                     "--steps", "2", "--limit", "4", "--grid-images", "2"]) == 0
    printed = capsys.readouterr().out
    assert "fid skipped" in printed and "lpips skipped" in printed
    m = json.loads((out / "metrics.json").read_text())
    assert m["images"] == 4 and m["fid"]["status"] == "skipped"
    assert "weights-inception-2015-12-05-6726825d.pth" in m["fid"]["reason"]
    assert m["reconstruction"]["2"]["mse"] > 0 and (out / "grids" / "reconstructions.png").is_file()
