"""Tests of diffae_core.metrics: known answers from independent computations, and the weights policy."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from diffae_core import metrics
from diffae_core.metrics import (
    ALEXNET_WEIGHTS,
    ALEXNET_WEIGHTS_ENV,
    FID_INCEPTION_WEIGHTS,
    FID_WEIGHTS_ENV,
    FIDMetric,
    MissingWeightsError,
    frechet_distance,
    load_lpips,
    lpips,
    mse,
    psnr,
    resolve_weights,
    ssim,
)

C1, C2 = 0.01**2, 0.03**2


def _rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _gaussian_1d() -> np.ndarray:
    g = np.array([math.exp(-((i - 5) ** 2) / (2 * 1.5**2)) for i in range(11)])
    return g / g.sum()


def _ssim_loop_reference(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """SSIM by explicit weighted sums over each zero-padded 11x11 neighbourhood, in float64."""
    w = np.outer(_gaussian_1d(), _gaussian_1d())
    b, c, h, wd = x.shape
    pad = ((0, 0), (0, 0), (5, 5), (5, 5))
    xp, yp = np.pad(x, pad), np.pad(y, pad)
    out = np.zeros(b)
    for n in range(b):
        total = 0.0
        for ch in range(c):
            for i in range(h):
                for j in range(wd):
                    px, py = xp[n, ch, i : i + 11, j : j + 11], yp[n, ch, i : i + 11, j : j + 11]
                    mx, my = (w * px).sum(), (w * py).sum()
                    vx, vy = (w * px * px).sum() - mx**2, (w * py * py).sum() - my**2
                    cxy = (w * px * py).sum() - mx * my
                    total += ((2 * mx * my + C1) * (2 * cxy + C2)) / ((mx**2 + my**2 + C1) * (vx + vy + C2))
        out[n] = total / (c * h * wd)
    return out


# --- SSIM ------------------------------------------------------------------------------------------------


def test_ssim_of_identical_images_is_one():
    x = _rand(3, 3, 20, 20)
    assert ssim(x, x).shape == (3,)
    torch.testing.assert_close(ssim(x, x), torch.ones(3), atol=1e-6, rtol=0)


def test_ssim_matches_loop_reference():
    # non-square and structured (x, y correlated) so that every term of the formula matters
    x = _rand(2, 3, 10, 13, seed=1, dtype=torch.float64)
    y = (0.6 * x + 0.4 * _rand(2, 3, 10, 13, seed=2, dtype=torch.float64)).clamp(0, 1)
    expected = torch.from_numpy(_ssim_loop_reference(x.numpy(), y.numpy()))
    torch.testing.assert_close(ssim(x, y), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(ssim(x.float(), y.float()).double(), expected, atol=1e-6, rtol=0)


def test_ssim_of_constant_images_has_closed_form_with_zero_padding():
    # Constant images a, b: a pixel whose window keeps weight s inside the image (the rest is zero padding)
    # sees mu = a*s, var = a^2*s*(1-s), cov = a*b*s*(1-s). Where s = 1 this is (2ab+C1)/(a^2+b^2+C1).
    a, b, h, w = 0.3, 0.7, 16, 18
    g = _gaussian_1d()

    def inside(n: int) -> np.ndarray:
        return np.array([sum(g[k] for k in range(11) if 0 <= i + k - 5 < n) for i in range(n)])

    s = np.outer(inside(h), inside(w))
    v = s * (1 - s)
    expected_map = ((2 * a * b * s * s + C1) * (2 * a * b * v + C2)) / (
        ((a * a + b * b) * s * s + C1) * ((a * a + b * b) * v + C2)
    )
    x = torch.full((1, 3, h, w), a, dtype=torch.float64)
    y = torch.full((1, 3, h, w), b, dtype=torch.float64)
    assert ssim(x, y).item() == pytest.approx(expected_map.mean(), abs=1e-12)
    # the interior value alone is the textbook closed form; the border makes the mean differ from it
    interior = (2 * a * b + C1) / (a * a + b * b + C1)
    assert expected_map[8, 9] == pytest.approx(interior, abs=1e-12)
    assert abs(expected_map.mean() - interior) > 1e-3


def test_ssim_decreases_with_noise_and_is_per_image_and_symmetric():
    x = _rand(1, 3, 32, 32, seed=3)
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    little, more = (x + 0.05 * noise).clamp(0, 1), (x + 0.2 * noise).clamp(0, 1)
    assert 1 > ssim(x, little).item() > ssim(x, more).item()
    batch = ssim(torch.cat([x, x]), torch.cat([little, more]))
    torch.testing.assert_close(batch, torch.cat([ssim(x, little), ssim(x, more)]))
    torch.testing.assert_close(ssim(more, x), ssim(x, more))


# --- MSE / PSNR ------------------------------------------------------------------------------------------


def test_mse_and_psnr_known_answers():
    x = 0.9 * _rand(2, 3, 8, 8, dtype=torch.float64)
    y = x + torch.tensor([0.1, 0.01], dtype=torch.float64).view(2, 1, 1, 1)
    torch.testing.assert_close(mse(x, y), torch.tensor([1e-2, 1e-4], dtype=torch.float64))
    torch.testing.assert_close(psnr(x, y), torch.tensor([20.0, 40.0], dtype=torch.float64))
    assert torch.isinf(psnr(x, x)).all()


# --- input validation ------------------------------------------------------------------------------------


def _squared_error_lpips(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return lpips(x, y, net=_SquaredErrorNet())


@pytest.mark.parametrize("fn", [ssim, mse, psnr, _squared_error_lpips], ids=["ssim", "mse", "psnr", "lpips"])
@pytest.mark.parametrize(
    "x, y, message",
    [
        (torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 9), "same shape"),
        (torch.zeros(3, 8, 8), torch.zeros(3, 8, 8), "4-D"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "float"),
        (np.zeros((2, 3, 8, 8)), np.zeros((2, 3, 8, 8)), "torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_value_errors(fn, x, y, message):
    with pytest.raises(ValueError, match=message):
        fn(x, y)


def test_lpips_and_fid_require_three_channels():
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match="3 channels"):
        lpips(x, x, net=_SquaredErrorNet())
    with pytest.raises(ValueError, match="3 channels"):
        FIDMetric(feature=_ChannelStats()).update(x, real=True)


# --- weights resolution ----------------------------------------------------------------------------------


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(ALEXNET_WEIGHTS_ENV, raising=False)
    monkeypatch.delenv(FID_WEIGHTS_ENV, raising=False)
    return tmp_path


def test_resolve_weights_prefers_argument_then_env_then_hub(empty_torch_home, monkeypatch):
    hub = empty_torch_home / "hub" / "checkpoints" / "w.pth"
    hub.parent.mkdir(parents=True)
    env, arg = empty_torch_home / "env.pth", empty_torch_home / "arg.pth"
    for p in (hub, env, arg):
        p.write_bytes(b"x")
    assert resolve_weights("w.pth", "DIFFAE_TEST_W") == hub
    monkeypatch.setenv("DIFFAE_TEST_W", str(env))
    assert resolve_weights("w.pth", "DIFFAE_TEST_W") == env
    assert resolve_weights("w.pth", "DIFFAE_TEST_W", arg) == arg
    monkeypatch.setenv("DIFFAE_TEST_W", str(empty_torch_home / "nope.pth"))
    with pytest.raises(MissingWeightsError, match="DIFFAE_TEST_W"):
        resolve_weights("w.pth", "DIFFAE_TEST_W")


# --- LPIPS -----------------------------------------------------------------------------------------------


class _SquaredErrorNet(nn.Module):
    """Stands in for LPIPS: mean squared difference of its [-1,1] inputs, shaped [B,1,1,1]."""

    def forward(self, in0: torch.Tensor, in1: torch.Tensor) -> torch.Tensor:
        self.seen = (in0, in1)
        return (in0 - in1).pow(2).mean(dim=(1, 2, 3), keepdim=True)


def test_lpips_rescales_to_minus_one_one_and_returns_per_image():
    x, y = _rand(2, 3, 8, 8, seed=5), _rand(2, 3, 8, 8, seed=6)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 0.0, 1.0
    net = _SquaredErrorNet()
    out = lpips(x, y, net=net)
    assert out.shape == (2,)
    torch.testing.assert_close(out, 4 * mse(x, y))  # (2x-1) - (2y-1) = 2(x-y)
    assert net.seen[0].min().item() == -1.0 and net.seen[0].max().item() == 1.0


class _FlatNet(nn.Module):
    def forward(self, in0: torch.Tensor, in1: torch.Tensor) -> torch.Tensor:
        return (in0 - in1).flatten(1).mean(1)


def test_lpips_rejects_a_network_with_the_wrong_output_shape():
    x = _rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"\[B,1,1,1\]"):
        lpips(x, x, net=_FlatNet())


def test_lpips_missing_alexnet_weights_says_which_file_and_where(empty_torch_home):
    x = _rand(1, 3, 16, 16)
    with pytest.raises(MissingWeightsError, match=ALEXNET_WEIGHTS) as info:
        lpips(x, x)
    assert isinstance(info.value, FileNotFoundError)
    assert str(empty_torch_home / "hub" / "checkpoints") in str(info.value)
    with pytest.raises(MissingWeightsError, match="nowhere.pth"):
        load_lpips(weights=empty_torch_home / "nowhere.pth")


@pytest.fixture(scope="module")
def standin_alexnet(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A random AlexNet trunk saved like torchvision's file (features.* keys), under a fake $TORCH_HOME."""
    import torchvision

    torch.manual_seed(0)
    features = torchvision.models.alexnet(weights=None).features
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    home = tmp_path_factory.mktemp("torch_home")
    path = home / "hub" / "checkpoints" / ALEXNET_WEIGHTS
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return home, state


def test_lpips_loads_trunk_from_torch_home_and_heads_from_the_package(standin_alexnet, monkeypatch):
    import lpips as lpips_package

    home, state = standin_alexnet
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.delenv(ALEXNET_WEIGHTS_ENV, raising=False)
    net = load_lpips("cpu")
    assert load_lpips(torch.device("cpu")) is net  # cached per (device, file)
    torch.testing.assert_close(net.net.get_submodule("slice1.0").weight, state["features.0.weight"])
    torch.testing.assert_close(net.net.get_submodule("slice5.10").bias, state["features.10.bias"])
    heads = torch.load(
        Path(lpips_package.__file__).parent / "weights/v0.1/alex.pth", map_location="cpu", weights_only=True
    )
    torch.testing.assert_close(net.lin3.model[-1].weight, heads["lin3.model.1.weight"])
    assert not any(p.requires_grad for p in net.parameters())

    x, y = _rand(2, 3, 64, 64, seed=7), _rand(2, 3, 64, 64, seed=8)
    d = lpips(x, y)
    assert d.shape == (2,) and (d > 0).all()
    torch.testing.assert_close(lpips(x, x), torch.zeros(2))
    torch.testing.assert_close(
        d, lpips(x.double(), y.double(), weights=home / "hub" / "checkpoints" / ALEXNET_WEIGHTS)
    )


def test_lpips_equals_the_lpips_package_built_its_own_way(standin_alexnet, monkeypatch):
    # The package builds its trunk from torchvision's AlexNet; hand it one holding the stand-in weights
    # and compare, which checks our key mapping from `features.*` into lpips' slices independently.
    import lpips as lpips_package
    import torchvision

    home, state = standin_alexnet
    alexnet = torchvision.models.alexnet(weights=None)
    alexnet.features.load_state_dict({k.removeprefix("features."): v for k, v in state.items()})
    monkeypatch.setattr(lpips_package.pretrained_networks.tv, "alexnet", lambda **_: alexnet)
    reference = lpips_package.LPIPS(net="alex", verbose=False)

    x, y = _rand(3, 3, 64, 64, seed=11), _rand(3, 3, 64, 64, seed=12)
    expected = reference(2 * x - 1, 2 * y - 1).flatten()
    torch.testing.assert_close(lpips(x, y, weights=home / "hub" / "checkpoints" / ALEXNET_WEIGHTS), expected)


def test_lpips_rejects_a_file_that_is_not_alexnet(tmp_path):
    path = tmp_path / ALEXNET_WEIGHTS
    torch.save({"features.0.weight": torch.zeros(64, 3, 11, 11)}, path)
    with pytest.raises(ValueError, match="not a torchvision AlexNet"):
        load_lpips(weights=path)


def test_lpips_equals_the_lpips_package_with_real_weights():
    real = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS
    if not real.is_file():
        pytest.skip(f"AlexNet weights not in $TORCH_HOME ({real}); the stand-in test covers the loading path")
    import lpips as lpips_package

    x, y = _rand(2, 3, 64, 64, seed=9), _rand(2, 3, 64, 64, seed=10)
    reference = lpips_package.LPIPS(net="alex", verbose=False)(2 * x - 1, 2 * y - 1).flatten()
    torch.testing.assert_close(lpips(x, y, weights=real), reference)


# --- Fréchet distance and FID ----------------------------------------------------------------------------


def _random_spd(d: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_frechet_distance_known_answers():
    mu, sigma = np.arange(5.0), _random_spd(5, 0)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    # diagonal covariances: |mu1-mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(1 + 4 + 1 + 1, abs=1e-12)
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(mu1, np.diag(s1), mu2, np.eye(4))


def test_frechet_distance_matches_scipy_sqrtm_and_is_symmetric():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = _random_spd(6, 2), _random_spd(6, 3)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(torch.tensor(mu1), torch.tensor(s1), mu2, s2) == pytest.approx(
        expected, rel=1e-10
    )
    # rank-deficient covariances (fewer samples than dimensions) stay real and symmetric
    f1, f2 = rng.normal(size=(4, 8)), rng.normal(size=(4, 8)) + 1
    args = (f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    d = frechet_distance(*args)
    assert math.isfinite(d) and d > 0
    assert frechet_distance(args[2], args[3], args[0], args[1]) == pytest.approx(d, rel=1e-8)


class _ChannelStats(nn.Module):
    """A tiny FID feature extractor: per-channel mean and standard deviation, [B,6]."""

    num_features = 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def _images(n: int, seed: int) -> torch.Tensor:
    # per-image brightness and contrast vary so that the feature covariance is full rank
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=g) * 0.5 + 0.25
    return (base + torch.rand(n, 1, 1, 1, generator=g) * (torch.rand(n, 3, 12, 12, generator=g) - 0.5)).clamp(
        0, 1
    )


def test_fid_with_injected_features_is_zero_for_identical_sets_and_grows_with_shift():
    real = _images(48, seed=0)
    fid = FIDMetric(feature=_ChannelStats())
    fid.update(real[:24], real=True)
    fid.update(real[24:], real=True)
    fid.update(real, real=False)
    assert fid.compute() == pytest.approx(0.0, abs=1e-6)
    fid.reset()
    fid.update(real, real=True)
    fid.update((real * 0.9 + 0.05).clamp(0, 1), real=False)
    small = fid.compute()
    fid.reset()
    fid.update(real, real=True)
    fid.update((real * 0.5 + 0.4).clamp(0, 1), real=False)
    assert fid.compute() > small > 1e-4


def test_fid_equals_frechet_distance_of_8bit_features():
    real, fake = _images(40, seed=1), _images(40, seed=2) ** 1.5
    fid = FIDMetric(feature=_ChannelStats())
    fid.update(real, real=True)
    fid.update(fake, real=False)

    def stats(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        png = (
            np.floor(images.double().numpy() * 255 + 0.5).clip(0, 255) / 255
        )  # as saved to and read from PNG
        f = _ChannelStats()(torch.from_numpy(png)).numpy()
        return f.mean(0), np.cov(f, rowvar=False)

    expected = frechet_distance(*stats(real), *stats(fake))
    assert expected > 1e-3
    assert fid.compute() == pytest.approx(expected, rel=1e-4)


def test_fid_sees_8bit_images_like_the_png_round_trip():
    # save_image rounds to the nearest level: (k+0.7)/255 and (k+1.3)/255 are both stored as k+1
    levels = torch.randint(0, 254, (16, 3, 8, 8), generator=torch.Generator().manual_seed(3)).double()
    fid = FIDMetric(feature=_ChannelStats())
    fid.update((levels + 0.7) / 255, real=True)
    fid.update((levels + 1.3) / 255, real=False)
    assert fid.compute() == pytest.approx(0.0, abs=1e-9)
    # one whole level brighter: every channel mean moves by 1/255, the covariance stays, FID = 3/255^2
    fid.reset()
    fid.update((levels + 0.2) / 255, real=True)
    fid.update((levels + 1.2) / 255, real=False)
    assert fid.compute() == pytest.approx(3 / 255**2, rel=1e-4)


def test_fid_missing_inception_weights_says_which_file_and_where(empty_torch_home):
    with pytest.raises(MissingWeightsError, match=FID_INCEPTION_WEIGHTS) as info:
        FIDMetric()
    assert str(empty_torch_home / "hub" / "checkpoints") in str(info.value)


def test_fid_with_real_inception_weights():
    real_file = Path(torch.hub.get_dir()) / "checkpoints" / FID_INCEPTION_WEIGHTS
    if not real_file.is_file():
        pytest.skip(f"FID Inception weights not in $TORCH_HOME ({real_file})")
    pytest.importorskip("torch_fidelity")
    images = _images(4, seed=4)
    fid = FIDMetric(weights=real_file)
    fid.update(images, real=True)
    fid.update(images, real=False)
    assert abs(fid.compute()) < 1e-2


def test_metrics_module_does_not_import_ray():
    tree = ast.parse(Path(metrics.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in imported if m.split(".")[0] == "ray"}
