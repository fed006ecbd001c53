"""The CPU demo recipe: high-t biased timestep sampling and the demo16 preset."""

from __future__ import annotations

import pytest
import torch

from diffae_core import DiffAE
from diffae_core.config import PRESETS, DiffusionConfig, ModelConfig, TrainConfig, get_preset
from diffae_core.diffusion import GaussianDiffusion


def test_default_sampling_is_the_official_uniform_draw():
    d = GaussianDiffusion(DiffusionConfig())
    a = d.sample_t(64, torch.device("cpu"), torch.Generator().manual_seed(3))
    b = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert TrainConfig().high_t_fraction == 0.0


def test_high_t_mixture_has_the_requested_share():
    d = GaussianDiffusion(DiffusionConfig())
    t = d.sample_t(20_000, torch.device("cpu"), torch.Generator().manual_seed(0), high_fraction=0.5,
                   high_start=0.6)
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() < 1000
    # P(t >= 600) = 0.5 + 0.5 * 0.4 = 0.7 ; P(t < 600) = 0.5 * 0.6 = 0.3
    assert abs((t >= 600).float().mean().item() - 0.7) < 0.02
    every = d.sample_t(1000, torch.device("cpu"), torch.Generator().manual_seed(0), high_fraction=1.0,
                       high_start=0.9)
    assert every.min() >= 900


def test_bad_mixture_is_an_error():
    d = GaussianDiffusion(DiffusionConfig())
    with pytest.raises(ValueError):
        d.sample_t(4, torch.device("cpu"), high_fraction=0.5, high_start=1.0)


def test_model_training_loss_uses_the_config_knob(monkeypatch):
    cfg = get_preset("demo16")
    model = DiffAE(cfg)
    seen = {}

    def fake_loss(eps_fn, x0, t, noise, x0_weight_max=0.0):
        seen["t"] = t
        return torch.zeros(x0.shape[0])

    monkeypatch.setattr(model.diffusion, "training_loss", fake_loss)
    torch.manual_seed(0)
    model.training_loss(torch.zeros(256, 3, 16, 16))
    share = (seen["t"] >= cfg.train.high_t_start * 1000).float().mean().item()
    expected = cfg.train.high_t_fraction + (1 - cfg.train.high_t_fraction) * (1 - cfg.train.high_t_start)
    assert abs(share - expected) < 0.1


def test_demo16_preset_trains_and_round_trips():
    cfg = get_preset("demo16")
    assert cfg.image_size == 16 and cfg.unet.dropout == 0.0 and cfg.train.high_t_fraction > 0
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    # the official presets keep the official uniform sampling
    for name, preset in PRESETS.items():
        if name != "demo16":
            assert preset.train.high_t_fraction == 0.0 and preset.train.warmup_steps == 0
    torch.manual_seed(0)
    model = DiffAE(cfg).train()
    loss = model.training_loss(torch.rand(4, 3, 16, 16) * 2 - 1)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.encoder.parameters())


def test_x0_weighting_is_off_by_default_and_truncated():
    d = GaussianDiffusion(DiffusionConfig())
    x0 = torch.zeros(3, 3, 4, 4)
    noise = torch.ones(3, 3, 4, 4)
    t = torch.tensor([0, 500, 999])
    plain = d.training_loss(lambda x_t, tt: noise + 0.5, x0, t, noise)
    assert torch.allclose(plain, torch.full((3,), 0.25))
    weighted = d.training_loss(lambda x_t, tt: noise + 0.5, x0, t, noise, x0_weight_max=20.0)
    ac = d.alphas_cumprod
    expected = torch.tensor([1.0, min(20.0, (1 - ac[500]) / ac[500]), 20.0]) * 0.25
    assert weighted[0] == plain[0]  # SNR >= 1: unchanged
    assert torch.allclose(weighted, expected.float())
    assert TrainConfig().x0_weight_max == 0.0


def _oracle(d: GaussianDiffusion, x0: torch.Tensor, prediction: str):
    """A network that knows x0: returns the exact eps or v for any x_t."""
    ac = torch.from_numpy(d.alphas_cumprod).float()

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = ac[t].view(-1, 1, 1, 1)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if prediction == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0

    return fn


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_v_and_eps_prediction_share_one_sampler(prediction):
    """The exact eps or v gives zero training loss, and DDIM from any x_T lands on x0 (both targets)."""
    d = GaussianDiffusion(DiffusionConfig(prediction=prediction))
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 1.6 - 0.8
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 300, 700, 999])
    assert d.training_loss(_oracle(d, x0, prediction), x0, t, noise).max() < 1e-8
    wrong = d.training_loss(_oracle(d, x0, "v" if prediction == "eps" else "eps"), x0, t, noise)
    assert wrong[1:].min() > 1e-3  # the other target is a different function of x_t
    out = d.ddim_sample(_oracle(d, x0, prediction), torch.randn(x0.shape, generator=g), steps=10)
    assert (out - x0).abs().max() < 1e-3
    x_T = d.ddim_invert(_oracle(d, x0, prediction), x0, steps=10)
    assert (d.ddim_sample(_oracle(d, x0, prediction), x_T, steps=10) - x0).abs().max() < 1e-3


def test_prediction_defaults_to_the_official_eps_and_rejects_typos():
    assert DiffusionConfig().prediction == "eps"
    assert all(p.diffusion.prediction == p.latent_diffusion.prediction == "eps"
               for name, p in PRESETS.items() if name != "demo16")
    with pytest.raises(ValueError, match="prediction"):
        GaussianDiffusion(DiffusionConfig(prediction="x0"))
    legacy = get_preset("tiny32").to_dict()
    del legacy["diffusion"]["prediction"]  # a bundle written before the field existed
    assert ModelConfig.from_dict(legacy).diffusion.prediction == "eps"
