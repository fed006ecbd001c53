"""Bundle format: round trips (local and S3), checksums, and clear errors for damaged bundles."""

import json

import pytest
import torch

from diffae_core import DiffAE
from diffae_core.bundle import BundleError, read_manifest
from diffae_core.latent import LatentMLP


@pytest.fixture(scope="module")
def full_model(trained_micro):
    """The trained micro model with a latent net and a classifier attached (a copy)."""
    import copy

    m = copy.deepcopy(trained_micro)
    torch.manual_seed(5)
    m.attach_latent(LatentMLP(m.config.latent), torch.randn(512) * 0.1, torch.rand(512) + 0.5)
    m.attach_classifier(torch.randn(2, 512), torch.randn(2), torch.randn(512), torch.rand(512) + 0.5, ["round", "red"])
    return m


def assert_same_outputs(a: DiffAE, b: DiffAE, x: torch.Tensor) -> None:
    z = a.encode(x)
    assert torch.equal(z, b.encode(x))
    noise, lat = torch.randn(2, 3, 16, 16), torch.randn(2, 512)
    assert torch.equal(a.sample(2, steps=3, latent_steps=3, noise=noise, latent_noise=lat),
                       b.sample(2, steps=3, latent_steps=3, noise=noise, latent_noise=lat))
    assert torch.equal(a.manipulate(z, "red", 0.2), b.manipulate(z, "red", 0.2))
    assert b.attributes == ["round", "red"]


def test_local_round_trip(full_model, micro_data, tmp_path):
    full_model.save(tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "b").iterdir())
    assert names == ["autoencoder.safetensors", "classifier.safetensors", "config.json", "latent.safetensors",
                     "manifest.json"]
    manifest = read_manifest(str(tmp_path / "b"))
    assert manifest["image_size"] == 16 and len(manifest["files"]["autoencoder.safetensors"]["sha256"]) == 64
    loaded = DiffAE.load(tmp_path / "b")
    assert loaded.config == full_model.config
    assert_same_outputs(full_model, loaded, micro_data[:2])
    assert DiffAE.load(f"file://{tmp_path / 'b'}").config.name == "micro16"


def test_autoencoder_only_bundle_has_no_heads(trained_micro, tmp_path):
    trained_micro.save(tmp_path / "ae")
    loaded = DiffAE.load(tmp_path / "ae")
    assert loaded.latent_net is None and loaded.classifier is None
    assert not (tmp_path / "ae" / "latent.safetensors").exists()


def test_s3_round_trip(full_model, micro_data, s3_bucket):
    uri = f"s3://{s3_bucket}/models/micro"
    full_model.save(uri)
    assert_same_outputs(full_model, DiffAE.load(uri), micro_data[:2])


def test_truncated_file_is_named(full_model, tmp_path):
    full_model.save(tmp_path / "b")
    path = tmp_path / "b" / "latent.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(BundleError, match=r"latent\.safetensors is truncated"):
        DiffAE.load(tmp_path / "b")


def test_flipped_byte_is_named(full_model, tmp_path):
    full_model.save(tmp_path / "b")
    path = tmp_path / "b" / "autoencoder.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"autoencoder\.safetensors is corrupted: sha256"):
        DiffAE.load(tmp_path / "b")


def test_missing_manifest_or_file(full_model, tmp_path):
    full_model.save(tmp_path / "b")
    (tmp_path / "b" / "classifier.safetensors").unlink()
    with pytest.raises(BundleError, match=r"classifier\.safetensors is listed in the manifest but missing"):
        DiffAE.load(tmp_path / "b")
    (tmp_path / "b" / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        DiffAE.load(tmp_path / "b")
    with pytest.raises(BundleError, match="no manifest.json"):
        DiffAE.load(tmp_path / "nowhere")


def test_config_that_does_not_match_weights(full_model, tmp_path):
    full_model.save(tmp_path / "b")
    cfg_path = tmp_path / "b" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["unet"]["model_channels"] = 64
    cfg_path.write_text(json.dumps(cfg))
    manifest_path = tmp_path / "b" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    import hashlib

    data = cfg_path.read_bytes()
    manifest["files"]["config.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"autoencoder\.safetensors does not match config\.json"):
        DiffAE.load(tmp_path / "b")
