"""Evaluation metrics of the official Diff-AE protocol.

Reconstruction metrics are per image, on images in [0,1] of shape [B,C,H,W], and return [B]:

* :func:`ssim` - 11x11 Gaussian window (sigma 1.5), depthwise convolution with zero padding 5,
  C1 = 0.01**2, C2 = 0.03**2, SSIM map averaged over C,H,W (the official ``ssim.py``);
* :func:`mse` and :func:`psnr` (max value 1);
* :func:`lpips` - LPIPS v0.1 with the AlexNet trunk (``lpips==0.1.4``, ``LPIPS(net='alex')``).

Generation quality is measured by :class:`FIDMetric` (streaming FID over Inception-v3 pool3 features) and
the plain maths of :func:`frechet_distance`.

Pretrained weights are never downloaded: they are resolved by :func:`resolve_weights` from an explicit
path, an environment variable, or ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``),
and a missing file raises :class:`MissingWeightsError` saying where to put it.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"  # torchvision's ImageNet AlexNet, the LPIPS trunk
ALEXNET_WEIGHTS_ENV = "DIFFAE_ALEXNET_WEIGHTS"
FID_INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's port of TF's FID net
FID_WEIGHTS_ENV = "DIFFAE_FID_WEIGHTS"

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2


class MissingWeightsError(FileNotFoundError):
    """A pretrained weights file that a metric needs is not on this machine (it is never downloaded)."""


def _check_images(x: Any, name: str, channels: int | None) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(
            f"{name} must be a torch.Tensor of images [B,C,H,W] in [0,1], got {type(x).__name__}"
        )
    if x.dim() != 4:
        raise ValueError(f"{name} must be a 4-D batch of images [B,C,H,W], got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(
            f"{name} must have {channels} channels [B,{channels},H,W], got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(
            f"{name} must be a float tensor in [0,1], got dtype {x.dtype}; convert uint8 images with x.float() / 255"
        )


def _check_pair(x: Any, y: Any, channels: int | None) -> None:
    _check_images(x, "x", channels)
    _check_images(y, "y", channels)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")


# ---------------------------------------------------------------------------------------------------------
# SSIM, MSE, PSNR


def _gaussian_window(dtype: torch.dtype, device: torch.device) -> Tensor:
    """The [11,11] SSIM window: outer product of a normalised 1-D Gaussian (sigma 1.5); sums to 1."""
    offsets = torch.arange(SSIM_WINDOW, dtype=torch.float64) - SSIM_WINDOW // 2
    g = torch.exp(-(offsets**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    return torch.outer(g, g).to(dtype=dtype, device=device)


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """Structural similarity per image, exactly as the official Diff-AE evaluation computes it.

    :param x: [B,C,H,W] float images in [0,1] (the protocol uses C=3; any C works, channels are independent).
    :param y: same shape as ``x``.
    :return: [B] mean of the SSIM map over C,H,W; 1 for identical images.

    Local statistics come from an 11x11 Gaussian window (sigma 1.5) applied per channel with zero padding,
    so pixels near the border see a window partly filled with zeros. That biases the border values, but the
    published numbers were computed this way, so we keep it.
    """
    _check_pair(x, y, channels=None)
    c = x.shape[1]
    window = _gaussian_window(x.dtype, x.device).repeat(c, 1, 1, 1)  # [C,1,11,11]: one copy per channel

    def local_mean(t: Tensor) -> Tensor:
        return F.conv2d(t, window, padding=SSIM_WINDOW // 2, groups=c)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x * mu_x
    var_y = local_mean(y * y) - mu_y * mu_y
    cov_xy = local_mean(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + SSIM_C1) * (2 * cov_xy + SSIM_C2)) / (
        (mu_x * mu_x + mu_y * mu_y + SSIM_C1) * (var_x + var_y + SSIM_C2)
    )
    return ssim_map.mean(dim=(1, 2, 3))


def mse(x: Tensor, y: Tensor) -> Tensor:
    """Mean squared error per image.

    :param x: [B,C,H,W] float images in [0,1].
    :param y: same shape as ``x``.
    :return: [B] mean of (x - y)**2 over C,H,W.
    """
    _check_pair(x, y, channels=None)
    return (x - y).pow(2).mean(dim=(1, 2, 3))


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Peak signal-to-noise ratio per image in dB, with peak value 1 (images in [0,1]).

    :param x: [B,C,H,W] float images in [0,1].
    :param y: same shape as ``x``.
    :return: [B] 20*log10(1/sqrt(mse)); +inf for identical images.
    """
    return 20 * torch.log10(1.0 / torch.sqrt(mse(x, y)))


# ---------------------------------------------------------------------------------------------------------
# Pretrained weights


def resolve_weights(filename: str, env_var: str, path: str | os.PathLike | None = None) -> Path:
    """Find a pretrained weights file without ever downloading it.

    Looks, in order, at ``path``, at the environment variable ``env_var``, and at
    ``torch.hub.get_dir()/checkpoints/filename`` (that is ``$TORCH_HOME/hub/checkpoints``, where torch's own
    downloads land, so a machine that ever fetched the file finds it there).

    :raises MissingWeightsError: the chosen location has no file; the message names the file and where to put it.
    """
    if path is not None:
        candidate, source = Path(path), "the weights argument"
    elif os.environ.get(env_var):
        candidate, source = Path(os.environ[env_var]), f"${env_var}"
    else:
        candidate, source = Path(torch.hub.get_dir()) / "checkpoints" / filename, None
    if candidate.is_file():
        return candidate
    if source is not None:
        raise MissingWeightsError(
            f"{candidate} (from {source}) is not a file; it should be a copy of '{filename}'"
        )
    raise MissingWeightsError(
        f"pretrained weights '{filename}' not found at {candidate}. Copy the file there "
        f"(torch.hub.get_dir()/checkpoints; set $TORCH_HOME to move that directory), or point ${env_var} "
        f"or the weights argument at it. diffae_core never downloads weights."
    )


# ---------------------------------------------------------------------------------------------------------
# LPIPS

_LPIPS_CACHE: dict[tuple[str, str], nn.Module] = {}
_LPIPS_LOCK = threading.Lock()


def _load_alexnet_trunk(model: nn.Module, path: Path) -> None:
    """Copy torchvision AlexNet ``features.*`` tensors from ``path`` into an ``lpips.LPIPS`` trunk."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    # lpips splits torchvision's `features` Sequential into slice1..slice5 whose children keep their original
    # indices as names, so `features.3.weight` lives at `slice2.3.weight`. Only `features.*` is needed: LPIPS
    # never uses AlexNet's classifier.
    trunk = {}
    for slice_name, block in model.net.named_children():
        for key in block.state_dict():
            if f"features.{key}" not in state:
                raise ValueError(
                    f"{path} is not a torchvision AlexNet state dict: it has no 'features.{key}'"
                )
            trunk[f"{slice_name}.{key}"] = state[f"features.{key}"]
    try:
        model.net.load_state_dict(trunk)
    except RuntimeError as err:
        raise ValueError(f"{path} does not fit torchvision's AlexNet: {err}") from err


def load_lpips(device: str | torch.device = "cpu", weights: str | os.PathLike | None = None) -> nn.Module:
    """The LPIPS v0.1 AlexNet network of the official protocol, cached per (device, weights file).

    The five linear heads ship inside the ``lpips`` package; the AlexNet trunk is read from
    ``alexnet-owt-7be5be79.pth`` found by :func:`resolve_weights` (``weights``, ``$DIFFAE_ALEXNET_WEIGHTS``,
    ``$TORCH_HOME/hub/checkpoints``). The module takes images in [-1,1] and returns [B,1,1,1]; its parameters
    are frozen, gradients still flow to the inputs.

    :raises MissingWeightsError: the AlexNet file is not there.
    """
    path = resolve_weights(ALEXNET_WEIGHTS, ALEXNET_WEIGHTS_ENV, weights).resolve()
    device = torch.device(device)
    key = (str(device), str(path))
    with _LPIPS_LOCK:
        if key not in _LPIPS_CACHE:
            import lpips as lpips_package  # imported here: the function below is also called `lpips`

            with warnings.catch_warnings():
                # lpips passes torchvision the deprecated `pretrained=False`; pnet_rand=True builds the trunk
                # without asking torchvision to download it, and we fill it from the local file below.
                warnings.simplefilter("ignore", UserWarning)
                model = lpips_package.LPIPS(
                    pretrained=True, net="alex", version="0.1", pnet_rand=True, verbose=False
                )
            _load_alexnet_trunk(model, path)
            _LPIPS_CACHE[key] = model.eval().requires_grad_(False).to(device)
        return _LPIPS_CACHE[key]


def lpips(
    x: Tensor, y: Tensor, net: nn.Module | None = None, weights: str | os.PathLike | None = None
) -> Tensor:
    """LPIPS distance per image (AlexNet, v0.1), as the official evaluation computes it.

    :param x: [B,3,H,W] float images in [0,1]; rescaled here to [-1,1], the range LPIPS expects.
    :param y: same shape as ``x``.
    :param net: a module with LPIPS's ``forward(in0, in1)`` on [-1,1] images returning [B,1,1,1]
        (tests inject a small one); default: :func:`load_lpips` on ``x.device`` with ``weights``.
    :param weights: path to ``alexnet-owt-7be5be79.pth`` when ``net`` is None.
    :return: [B] distances, 0 for identical images.
    :raises MissingWeightsError: ``net`` is None and the AlexNet weights are not on this machine.
    """
    _check_pair(x, y, channels=3)
    in0, in1 = x * 2 - 1, y * 2 - 1
    if net is None:
        net = load_lpips(x.device, weights)
        in0, in1 = in0.float(), in1.float()  # the pretrained network is float32
    out = net(in0, in1)
    if out.shape != (x.shape[0], 1, 1, 1):
        raise ValueError(
            f"the LPIPS network must return [B,1,1,1] = [{x.shape[0]},1,1,1], got {tuple(out.shape)}"
        )
    return out.reshape(x.shape[0])


# ---------------------------------------------------------------------------------------------------------
# FID


def _as_float64(a: Any) -> Tensor:
    if isinstance(a, Tensor):
        return a.detach().to("cpu", torch.float64)
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64.

    d = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrt(sigma1 sigma2)).

    :param mu1: [D] mean (tensor or array-like); ``mu2`` likewise.
    :param sigma1: [D,D] symmetric positive semi-definite covariance; ``sigma2`` likewise.
    :return: the distance (>= 0 up to rounding).
    """
    mu1, sigma1, mu2, sigma2 = (_as_float64(a) for a in (mu1, sigma1, mu2, sigma2))
    d = mu1.shape[0] if mu1.dim() == 1 else -1
    if d < 0 or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"expected means [D] and covariances [D,D], got {tuple(mu1.shape)}, {tuple(sigma1.shape)}, "
            f"{tuple(mu2.shape)}, {tuple(sigma2.shape)}"
        )
    # tr(sqrt(S1 S2)) = tr(sqrt(R S2 R)) with R = sqrt(S1). R S2 R is symmetric PSD, so eigvalsh gives real,
    # stable eigenvalues, where a matrix square root of the non-symmetric S1 S2 turns complex when the
    # covariances are near-singular (fewer samples than feature dimensions).
    w, v = torch.linalg.eigh(sigma1)
    root1 = (v * w.clamp_min(0).sqrt()) @ v.T
    inner = root1 @ sigma2 @ root1
    inner = (inner + inner.T) / 2  # remove rounding asymmetry before eigvalsh
    trace_sqrt = torch.linalg.eigvalsh(inner).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt)


def _to_uint8(images01: Tensor) -> Tensor:
    # The official protocol writes images to PNG and reads them back (torchvision's save_image: x*255 + 0.5,
    # clamped, truncated), so FID sees 8-bit images; rounding here reproduces that without the disk trip.
    return (images01 * 255 + 0.5).clamp(0, 255).to(torch.uint8)


class FIDFeatures(nn.Module):
    """FID's feature extractor: float images [B,3,H,W] in [0,1] -> features [B,D] float64.

    Images are quantised to 8 bits first, like the PNG round trip of the official protocol (pytorch_fid
    0.2.0, pool3, 2048-D). The default network is torch-fidelity's port of the TF Inception weights (via
    torchmetrics), so numbers are comparable to, not bit-identical with, the published ones.

    :param feature: optional custom network (tests, weight-free stand-ins): float [B,3,H,W] images in [0,1]
        (already 8-bit quantised) -> [B,D]; give it a ``num_features`` attribute or it is probed once.
    :param weights: path to ``weights-inception-2015-12-05-6726825d.pth`` when ``feature`` is None; default
        ``$DIFFAE_FID_WEIGHTS`` then ``$TORCH_HOME/hub/checkpoints``.
    :raises MissingWeightsError: ``feature`` is None and the Inception weights are not on this machine.
    """

    def __init__(self, feature: nn.Module | None = None, weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.uint8_input = feature is None
        if feature is None:
            from torchmetrics.image.fid import NoTrainInceptionV3

            path = resolve_weights(FID_INCEPTION_WEIGHTS, FID_WEIGHTS_ENV, weights)
            feature = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                         feature_extractor_weights_path=str(path))
            self.num_features = 2048
        else:
            self.num_features = int(getattr(feature, "num_features", 0)) or int(feature(torch.rand(1, 3, 64, 64)).shape[-1])
        self.net = feature

    @torch.no_grad()
    def forward(self, images01: Tensor) -> Tensor:
        _check_images(images01, "images01", channels=3)
        images = _to_uint8(images01)
        return self.net(images if self.uint8_input else images.float() / 255).double()


class _Given(nn.Module):
    """Features computed elsewhere pass through unchanged (the state keeper below sees only features)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


class FIDMetric:
    """Streaming Fréchet Inception Distance between a set of real and a set of generated images.

    The running sums live in torchmetrics' ``FrechetInceptionDistance`` states (float64; summed across
    ranks under torch.distributed). Features come from :class:`FIDFeatures`, here (:meth:`update`) or
    elsewhere: Ray Data workers compute them where the images are and the driver adds them with
    :meth:`update_features`, so every FID number comes from this one path. The distance itself is
    :func:`frechet_distance` of the states' mean and covariance (stable for fewer images than features).

    :param feature, weights: see :class:`FIDFeatures`.
    :param device: where features and sums are computed.
    :param num_features: build a metric that only takes features (no extractor, no weights needed).
    """

    def __init__(
        self,
        feature: nn.Module | None = None,
        weights: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        num_features: int | None = None,
    ) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        self._device = torch.device(device)
        self.features = None if num_features is not None else FIDFeatures(feature, weights).to(self._device)
        dim = num_features if num_features is not None else self.features.num_features
        self._fid = FrechetInceptionDistance(feature=_Given(dim), normalize=False).to(self._device)

    @torch.no_grad()
    def update(self, images01: Tensor, real: bool) -> None:
        """Add a batch of images [B,3,H,W] in [0,1] (any H,W) to the real or the generated set."""
        if self.features is None:
            raise RuntimeError("this FIDMetric takes features only (num_features=...): use update_features")
        self.update_features(self.features(images01.to(self._device)), real)

    def update_features(self, features: Tensor, real: bool) -> None:
        """Add features [B,D] computed by :class:`FIDFeatures` (possibly on other workers) to one set."""
        self._fid.update(features.to(self._device, torch.float64), real=real)

    def _mean_cov(self, real: bool) -> tuple[Tensor, Tensor]:
        side = "real" if real else "fake"
        n = int(getattr(self._fid, f"{side}_features_num_samples"))
        if n < 2:
            raise ValueError(f"FID needs at least 2 images per set, got {n} {side}")
        total, cov_sum = getattr(self._fid, f"{side}_features_sum"), getattr(self._fid, f"{side}_features_cov_sum")
        mean = total / n
        return mean, (cov_sum - n * torch.outer(mean, mean)) / (n - 1)

    def compute(self) -> float:
        """FID between everything added so far (needs at least 2 images on each side)."""
        return frechet_distance(*self._mean_cov(True), *self._mean_cov(False))

    def reset(self) -> None:
        """Forget both sets."""
        self._fid.reset()
