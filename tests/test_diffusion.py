"""Schedules, respacing and the DDIM maths against the official numbers (tests/golden)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffae_core.config import DiffusionConfig
from diffae_core.diffusion import GaussianDiffusion, beta_schedule, ddim_timesteps

GOLDEN = Path(__file__).parent / "golden"


def test_ddim_timesteps_match_official_for_every_supported_n():
    table = json.loads((GOLDEN / "ddim_timesteps.json").read_text())
    for n, stride in table["ddim_stride"].items():
        assert ddim_timesteps(int(n)) == list(range(0, 1000, stride)), n
    assert ddim_timesteps(20) == list(range(0, 1000, 50))
    assert ddim_timesteps(250)[-1] == 996


@pytest.mark.parametrize("n", [150, 300, 400])
def test_ddim_timesteps_fall_back_to_official_even_spacing(n):
    table = json.loads((GOLDEN / "ddim_timesteps.json").read_text())
    assert n in table["ddim_invalid"]
    steps = ddim_timesteps(n)
    assert steps == table["ddpm_even"][str(n)]
    assert len(steps) == n and steps[0] == 0 and steps[-1] == 999


def test_every_step_count_is_valid_and_sorted():
    for n in range(1, 1001):
        steps = ddim_timesteps(n)
        assert len(steps) == n and steps == sorted(set(steps)) and 0 <= steps[0] and steps[-1] < 1000


@pytest.mark.parametrize("bad", [0, -3, 1001, 10**6])
def test_ddim_timesteps_rejects_out_of_range(bad):
    with pytest.raises(ValueError, match="steps must be in"):
        ddim_timesteps(bad)


def test_beta_schedules_match_official_alphas_cumprod():
    table = json.loads((GOLDEN / "beta_schedules.json").read_text())
    for name in ("linear", "const0.008"):
        ac = np.cumprod(1 - beta_schedule(name, 1000))
        np.testing.assert_allclose(ac[table["t"]], table[name], rtol=1e-12)
    assert beta_schedule("linear").dtype == np.float64


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        beta_schedule("quadratic")


def test_q_sample_and_losses():
    d = GaussianDiffusion(DiffusionConfig())
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 10, 500, 999])
    ac = torch.tensor(np.cumprod(1 - beta_schedule("linear"))[t.numpy()], dtype=torch.float32).view(-1, 1, 1, 1)
    torch.testing.assert_close(d.q_sample(x0, t, noise), ac.sqrt() * x0 + (1 - ac).sqrt() * noise)
    perfect = d.training_loss(lambda x_t, tt: noise, x0, t, noise)
    assert perfect.shape == (4,) and torch.all(perfect == 0)
    mse = d.training_loss(lambda x_t, tt: noise + 0.5, x0, t, noise)
    torch.testing.assert_close(mse, torch.full((4,), 0.25))
    l1 = GaussianDiffusion(DiffusionConfig(loss="l1")).training_loss(lambda x_t, tt: noise + 0.5, x0, t, noise)
    torch.testing.assert_close(l1, torch.full((4,), 0.5))


def test_ddim_round_trip_is_exact_for_the_optimal_denoiser_of_one_point():
    # Data = a single point x*: the optimal eps is (x_t - sqrt(a_t) x*) / sqrt(1 - a_t), its x0-hat is
    # x* at every t, and the DDIM path is x_t = sqrt(a_t) x* + sqrt(1 - a_t) eps with eps constant.
    d = GaussianDiffusion(DiffusionConfig(beta_schedule="const0.008", clip_denoised=False))
    ac = torch.tensor(d.alphas_cumprod, dtype=torch.float32)
    target = torch.randn(3, 512)

    def eps_fn(x_t, t):
        a = ac[t][:, None]
        return (x_t - a.sqrt() * target) / (1 - a).sqrt()

    noise = torch.randn(3, 512)
    start = ac[0].sqrt() * target + (1 - ac[0]).sqrt() * noise
    x_T = d.ddim_invert(eps_fn, start, steps=10)
    torch.testing.assert_close(x_T, noise, atol=1e-3, rtol=1e-3)  # eps is constant along the path
    torch.testing.assert_close(d.ddim_sample(eps_fn, x_T, steps=10), target, atol=1e-4, rtol=1e-4)


def test_network_sees_original_timesteps_in_order():
    d = GaussianDiffusion(DiffusionConfig())
    seen = []

    def eps_fn(x_t, t):
        seen.append(t.tolist())
        return torch.zeros_like(x_t)

    d.ddim_sample(eps_fn, torch.zeros(2, 3, 4, 4), steps=10)
    assert seen == [[s, s] for s in range(900, -1, -100)]
    seen.clear()
    d.ddim_invert(eps_fn, torch.zeros(2, 3, 4, 4), steps=10)
    assert seen == [[s, s] for s in range(0, 1000, 100)]


def test_inversion_last_step_returns_the_rederived_eps():
    # With a_next = 0 at the last step the official inversion returns eps', not sqrt(a) x0 + ...
    d = GaussianDiffusion(DiffusionConfig())
    const = torch.full((1, 3, 4, 4), 0.3)
    out = d.ddim_invert(lambda x_t, t: const.expand_as(x_t), torch.zeros(1, 3, 4, 4), steps=1)
    torch.testing.assert_close(out, const)
