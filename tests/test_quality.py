"""The oracle-judged quality checks of diffae_core.quality, on a real (micro) trained model."""

from __future__ import annotations

import pytest
import torch

from diffae_core import quality
from diffae_core.datasets import shapes_array


def _shapes(n: int, size: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    arr, attrs = shapes_array(n, size=size, seed=3, start=start)
    images = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1
    return images, torch.from_numpy(attrs)


def test_oracle_reads_the_true_attributes_of_real_shapes():
    images, attrs = _shapes(48, 32)
    assert torch.equal(quality.oracle(images), attrs)


@pytest.fixture(scope="module")
def judged(trained_micro):
    images, attrs = _shapes(12, 16)
    metrics, z, x_T, rec = quality.stochastic_reconstruction(trained_micro, images, steps=50, batch=5)
    return trained_micro, images, attrs, metrics, z, x_T, rec


def test_stochastic_reconstruction_is_near_exact_and_keeps_attributes(judged):
    _, images, attrs, metrics, z, x_T, rec = judged
    assert z.shape == (12, 512) and x_T.shape == images.shape == rec.shape
    assert metrics["psnr_db"] > 25, metrics
    assert 0.0 <= metrics["ssim"] <= 1.0
    # what the function reports is what the oracle says of its own output
    assert metrics["oracle_agreement"] == pytest.approx(
        (quality.oracle(rec) == quality.oracle(images)).all(dim=1).float().mean().item())


def test_semantic_reconstruction_agreement_is_consistent(judged):
    model, images, attrs, _, z, _, _ = judged
    metrics, out = quality.semantic_reconstruction(model, images, attrs, steps=10, z=z, batch=5)
    assert out.shape == images.shape
    per = metrics["agreement"]
    assert set(per) == {"square", "red", "large", "left"}
    assert metrics["agreement_all"] <= min(per.values()) + 1e-9
    expected = (quality.oracle(out) == attrs).all(dim=1).float().mean().item()
    assert metrics["agreement_all"] == pytest.approx(expected)


def test_manipulation_needs_a_classifier_and_alpha_zero_is_reconstruction(judged):
    model, images, attrs, _, z, x_T, _ = judged
    with pytest.raises(ValueError, match="classifier"):
        quality.manipulation(model, attrs, z, x_T)
    torch.manual_seed(0)
    edited = model.__class__(model.config).eval()
    edited.load_state_dict(model.state_dict(), strict=False)
    edited.attach_classifier(torch.randn(4, 512), torch.zeros(4), z.mean(0), z.std(0) + 1e-3,
                             ("square", "red", "large", "left"))
    result = quality.manipulation(edited, attrs, z, x_T, alphas=(0.0,), steps=10, batch=5)
    rec = edited.decode(x_T, z, steps=10)
    read = quality.oracle(rec)
    for a, name in enumerate(("square", "red", "large", "left")):
        flipped = (read[:, a] == 1 - attrs[:, a]).float().mean().item()
        assert result[name]["flip_rate"] == pytest.approx(flipped)
        assert 0.0 <= result[name]["success"] <= result[name]["flip_rate"] + 1e-9
