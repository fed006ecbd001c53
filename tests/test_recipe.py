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
