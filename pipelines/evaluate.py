"""Evaluate a bundle: reconstruction MSE / PSNR / SSIM / LPIPS and FID, as batch inference with Ray Data.

    python -m pipelines.evaluate --bundle BUNDLE --data SRC --out DIR [--steps 10 20] [--holdout 0.1]

Reconstruction (the official autoencoding protocol): each image of the held-out split is encoded to
z_sem, inverted to x_T by DDIM (``--inversion-steps``, default: the decoding steps) and decoded with
``--steps`` DDIM steps; per image MSE, PSNR (max 1), SSIM and LPIPS on [0,1] images, averaged. FID of
autoencoding compares the reconstructions with the real images; FID of samples compares unconditional
samples (latent DPM + decoder; needs a bundle with a latent net) with the same real images. The
reference set is the evaluated split, so the numbers compare runs and settings here; they are not the
paper's (which uses the whole training set and 50k samples).

Pretrained networks are never downloaded: LPIPS needs ``alexnet-owt-7be5be79.pth`` and FID
``weights-inception-2015-12-05-6726825d.pth`` (see ``diffae_core.metrics.resolve_weights``). When one is
missing that metric is reported as skipped, with the reason, and the rest still runs. ``--fid-feature
pixels`` swaps Inception for 8x8 average-pooled pixels: a weight-free stand-in for smoke tests, not FID.

Work is spread over a Ray Data actor pool (``--concurrency`` actors, a GPU each when the cluster has
GPUs): actors return per-image metrics and FID features (``diffae_core.metrics.FIDFeatures``), and the
driver adds the features to ``diffae_core.metrics.FIDMetric`` (float64 sums, so the result does not depend
on how rows were batched). Output in DIR (local or s3://): ``metrics.json``, ``config.json``,
``grids/reconstructions.png`` (inputs, then one row per step count) and ``grids/samples.png`` (with a
latent net).
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import ray
import torch

from diffae_core import DiffAE, storage
from diffae_core import metrics as M
from diffae_core.bundle import LATENT, read_config, read_manifest
from diffae_core.images import make_grid

from . import cluster, jobkit
from .data import SPLITS
from .inference import ActorPool, BundleActor, ImageInput
from .jobkit import option

FEATURES = ("inception", "pixels")
RECON_METRICS = ("mse", "psnr", "ssim", "lpips")


@dataclass(kw_only=True)
class EvalJob(ImageInput, ActorPool):
    """Evaluate a bundle: reconstruction MSE/PSNR/SSIM/LPIPS and FID (Ray Data). Steps are DDIM step counts."""

    job_name: ClassVar[str] = "evaluate"

    bundle: str = option(help="the bundle to evaluate (path or s3://)", path=True)
    out: str = option(help="output directory (path or s3://) for metrics.json and grids/", path=True)
    split: str = option("heldout", choices=SPLITS,
                        help="'heldout': images whose sha1(id) falls below --holdout; also FID's reference set")
    holdout: float = option(0.1, help="held-out fraction defining the splits (use the training run's)")
    steps: tuple[int, ...] = option((10,), help="DDIM decoding steps (one evaluation each)")
    inversion_steps: int | None = option(None, help="DDIM inversion steps (default: the decoding steps)")
    lpips: bool = option(True, help="compute LPIPS")
    fid: bool = option(True, help="compute FID")
    fid_feature: str = option("inception", choices=FEATURES,
                              help="'pixels': a weight-free stand-in for Inception (smoke tests; not FID)")
    fid_weights: str | None = option(None, help="Inception weights file (default: $DIFFAE_FID_WEIGHTS, $TORCH_HOME)")
    lpips_weights: str | None = option(None, help="AlexNet weights file (default: $DIFFAE_ALEXNET_WEIGHTS, $TORCH_HOME)")
    num_samples: int | None = option(None, help="unconditional samples for FID (default: the number of images)")
    sample_steps: int = option(20, help="DDIM steps of the decoder when sampling")
    latent_steps: int = option(20, help="DDIM steps of the latent DPM when sampling")
    grid_images: int = option(8, help="images per grid row")
    batch_size: int = option(32, help="images per model call")
    seed: int = option(0, help="seed of the sampling noise")

    def validate(self) -> None:
        super().validate()
        if not self.steps or min(self.steps) < 1:
            raise ValueError(f"steps must be positive DDIM step counts, got {self.steps}")
        if self.fid_feature not in FEATURES:
            raise ValueError(f"fid_feature must be one of {FEATURES}, got {self.fid_feature!r}")
        if self.precision not in cluster.PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(cluster.PRECISIONS)}, got {self.precision!r}")


@dataclass
class EvalResult:
    out: str  # the output directory
    metrics: dict[str, Any]  # what metrics.json holds
    grids: list[str] = field(default_factory=list)  # URIs of the PNG grids


# ---- features for FID ---------------------------------------------------------------------------
def quantise(images01: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] float in [0,1] -> uint8, as the official PNG round trip (x*255 + 0.5, clamped, truncated)."""
    return (images01 * 255 + 0.5).clamp(0, 255).to(torch.uint8)


class PixelFeatures(torch.nn.Module):
    """[B,3,H,W] in [0,1] -> [B,192]: 8x8 average-pooled pixels. A weight-free stand-in for Inception."""

    num_features = 192

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(images01.float(), 8).flatten(1)


def fid_features(kind: str | None, weights: str | None, device: torch.device) -> M.FIDFeatures | None:
    """The FID feature network a worker runs (None: FID off)."""
    if kind is None:
        return None
    return M.FIDFeatures(PixelFeatures() if kind == "pixels" else None, weights).to(device)


# ---- Ray Data actors ----------------------------------------------------------------------------
class Reconstructor(BundleActor):
    """Image rows -> per-image reconstruction metrics (``mse_T{s}`` ...) and FID features for each step count.

    Input (numpy batch): ``image`` [B,3,S,S] float32 in [-1,1], ``id``. Output: ``id``, one float column per
    metric and step count, and with FID on ``feat_real`` / ``feat_T{s}`` [B, D] float64 rows.
    """

    def __init__(self, bundle: str, steps: Sequence[int], inversion_steps: int | None, lpips_weights: str | None,
                 fid_feature: str | None, fid_weights: str | None, num_gpus: float = 0.0, precision: str = "fp32",
                 endpoint: str | None = None):
        super().__init__(bundle, num_gpus, precision, endpoint, parts=("encoder", "unet"))
        self.steps, self.inversion_steps = list(steps), inversion_steps
        self.lpips_net = M.load_lpips(self.device, lpips_weights) if lpips_weights else None
        self.features = fid_features(fid_feature, fid_weights, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = self.images(batch, self.device)
        x01 = (x + 1) / 2
        z = self.model.encode(x)
        out: dict[str, np.ndarray] = {"id": np.asarray(batch["id"])}
        if self.features is not None:
            out["feat_real"] = self.features(x01).cpu().numpy()
        for s in self.steps:
            x_T = self.model.encode_stochastic(x, z, steps=self.inversion_steps or s)
            r01 = (self.model.decode(x_T, z, steps=s).float() + 1) / 2
            out[f"mse_T{s}"] = M.mse(x01, r01).cpu().numpy()
            out[f"psnr_T{s}"] = M.psnr(x01, r01).cpu().numpy()
            out[f"ssim_T{s}"] = M.ssim(x01, r01).cpu().numpy()
            if self.lpips_net is not None:
                with torch.no_grad():
                    out[f"lpips_T{s}"] = M.lpips(x01, r01, net=self.lpips_net).cpu().numpy()
            if self.features is not None:
                out[f"feat_T{s}"] = self.features(r01).cpu().numpy()
        return out


def sample_noise(ids: Sequence[int], image_size: int, z_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_T [n,3,S,S], latent noise [n,Z]) with each sample's noise fixed by (seed, id), whatever the batching."""
    xs, zs = [], []
    for i in ids:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, int(i)]).generate_state(1)[0]))
        xs.append(torch.randn(3, image_size, image_size, generator=g))
        zs.append(torch.randn(z_dim, generator=g))
    return torch.stack(xs), torch.stack(zs)


class SampleFeatures(BundleActor):
    """Rows of sample indices (``id``) -> FID features ``feat`` [B, D] of unconditional samples."""

    def __init__(self, bundle: str, sample_steps: int, latent_steps: int, seed: int, fid_feature: str,
                 fid_weights: str | None, num_gpus: float = 0.0, precision: str = "fp32", endpoint: str | None = None):
        super().__init__(bundle, num_gpus, precision, endpoint, parts=("unet", "latent"))
        self.sample_steps, self.latent_steps, self.seed = sample_steps, latent_steps, seed
        self.features = fid_features(fid_feature, fid_weights, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        noise, latent_noise = sample_noise(batch["id"], self.model.image_size, self.model.config.z_dim, self.seed)
        x = self.model.sample(len(noise), steps=self.sample_steps, latent_steps=self.latent_steps,
                              noise=noise.to(self.device), latent_noise=latent_noise.to(self.device))
        return {"feat": self.features((x.float() + 1) / 2).cpu().numpy()}


def _grids(bundle: str, images: np.ndarray, steps: Sequence[int], inversion_steps: int | None, sample_steps: int,
           latent_steps: int, seed: int, num_gpus: float, endpoint: str | None) -> dict[str, bytes]:
    """PNG bytes of the reconstruction grid (inputs, then one row per step count) and, with a latent net, of
    samples from fixed noise. Runs as a Ray task (on a GPU when given one)."""
    model = DiffAE.load(bundle, device=cluster.inference_device(num_gpus), endpoint=endpoint)
    x = torch.from_numpy(images).to(model.device)
    z = model.encode(x)
    rows = [x] + [model.decode(model.encode_stochastic(x, z, steps=inversion_steps or s), z, steps=s) for s in steps]
    upscale = max(1, 64 // model.image_size)

    def png(t: torch.Tensor) -> bytes:
        buf = io.BytesIO()
        make_grid(t.float().cpu(), nrow=len(x), upscale=upscale).save(buf, format="PNG")
        return buf.getvalue()

    out = {"reconstructions.png": png(torch.cat(rows))}
    if model.latent_net is not None:
        noise, latent_noise = sample_noise(range(len(x)), model.image_size, model.config.z_dim, seed)
        out["samples.png"] = png(model.sample(len(x), steps=sample_steps, latent_steps=latent_steps,
                                              noise=noise.to(model.device), latent_noise=latent_noise.to(model.device)))
    return out


# ---- the job's parts --------------------------------------------------------------------------------
def _weights_or_reason(enabled: bool, filename: str, env_var: str, path: str | None, what: str
                       ) -> tuple[str | None, str | None]:
    if not enabled:
        return None, f"{what} disabled"
    try:
        return str(M.resolve_weights(filename, env_var, path)), None
    except M.MissingWeightsError as exc:
        return None, str(exc)


@dataclass
class _Networks:
    """The pretrained networks this evaluation can use, or why not (a file that is not on this machine)."""

    lpips_weights: str | None
    lpips_reason: str | None
    fid_feature: str | None  # None: FID skipped
    fid_weights: str | None
    fid_reason: str | None

    @classmethod
    def resolve(cls, job: EvalJob) -> _Networks:
        lpips, lpips_reason = _weights_or_reason(job.lpips, M.ALEXNET_WEIGHTS, M.ALEXNET_WEIGHTS_ENV,
                                                 job.lpips_weights, "LPIPS")
        if job.fid and job.fid_feature == "pixels":
            return cls(lpips, lpips_reason, "pixels", None, None)
        fid, fid_reason = _weights_or_reason(job.fid, M.FID_INCEPTION_WEIGHTS, M.FID_WEIGHTS_ENV, job.fid_weights, "FID")
        return cls(lpips, lpips_reason, job.fid_feature if fid_reason is None else None, fid, fid_reason)


def _fid_metrics(kind: str | None, steps: Sequence[int]) -> dict[str, M.FIDMetric]:
    """One feature-fed FIDMetric per comparison: "T{s}" (autoencoding at s steps) and "samples"."""
    if kind is None:
        return {}
    dim = PixelFeatures.num_features if kind == "pixels" else 2048
    return {name: M.FIDMetric(num_features=dim) for name in [*(f"T{s}" for s in steps), "samples"]}


def reconstruct(job: EvalJob, images: Any, nets: _Networks, gpus: float, fids: dict[str, M.FIDMetric]
                ) -> tuple[int, dict[str, Any]]:
    """(images evaluated, {steps: mean metrics}); adds real and reconstruction features to ``fids``."""
    per_image = job.map(images, Reconstructor, gpus, bundle=job.bundle, steps=list(job.steps),
                        inversion_steps=job.inversion_steps, lpips_weights=nets.lpips_weights,
                        fid_feature=nets.fid_feature, fid_weights=nets.fid_weights)
    sums: dict[str, float] = {}
    count = 0
    for batch in per_image.iter_batches(batch_size=256, batch_format="numpy"):
        count += len(batch["id"])
        for key, values in batch.items():
            if key.split("_T")[0] in RECON_METRICS:
                sums[key] = sums.get(key, 0.0) + float(np.asarray(values, dtype=np.float64).sum())
        if fids:
            real = torch.from_numpy(np.stack(batch["feat_real"]))
            for s in job.steps:
                fids[f"T{s}"].update_features(real, real=True)
                fids[f"T{s}"].update_features(torch.from_numpy(np.stack(batch[f"feat_T{s}"])), real=False)
            fids["samples"].update_features(real, real=True)
    if count == 0:
        raise ValueError(f"no images to evaluate in split {job.split!r} of {job.data} (holdout {job.holdout})")
    return count, {
        str(s): {"decoding_steps": s, "inversion_steps": job.inversion_steps or s,
                 **{m: (sums[f"{m}_T{s}"] / count if f"{m}_T{s}" in sums else None) for m in RECON_METRICS}}
        for s in job.steps
    }


def sample_fid(job: EvalJob, n: int, nets: _Networks, gpus: float, fid: M.FIDMetric) -> dict[str, Any]:
    """FID of ``n`` unconditional samples against the real features already in ``fid``."""
    if LATENT not in read_manifest(job.bundle, job.s3_endpoint)["files"]:
        return {"samples": None,
                "samples_reason": "the bundle has no latent DPM: train one with `diffae train latent` to sample"}
    features = job.map(ray.data.range(n), SampleFeatures, gpus, bundle=job.bundle, sample_steps=job.sample_steps,
                       latent_steps=job.latent_steps, seed=job.seed, fid_feature=nets.fid_feature,
                       fid_weights=nets.fid_weights)
    for batch in features.iter_batches(batch_size=256, batch_format="numpy"):
        fid.update_features(torch.from_numpy(np.stack(batch["feat"])), real=False)
    return {"samples": fid.compute(), "num_samples": n, "sample_steps": job.sample_steps,
            "latent_steps": job.latent_steps}


def write_grids(job: EvalJob, images: Any, gpus: float) -> list[str]:
    rows = np.stack([r["image"] for r in images.take(job.grid_images)])
    pngs = ray.get(ray.remote(num_gpus=gpus)(_grids).remote(
        job.bundle, rows, list(job.steps), job.inversion_steps, job.sample_steps, job.latent_steps, job.seed, gpus,
        job.s3_endpoint))
    uris = []
    for name, png in pngs.items():
        uris.append(storage.join(job.out, "grids", name))
        storage.write_bytes(uris[-1], png, job.s3_endpoint)
    return uris


def evaluate(job: EvalJob) -> EvalResult:
    """Run the evaluation on the connected Ray cluster (connecting first if needed); write and return metrics.

    ``metrics`` (also ``out/metrics.json``): ``images`` (count), ``reconstruction`` {steps: {mse, psnr, ssim,
    lpips}}, ``lpips`` and ``fid`` (each with ``status`` "ok" or "skipped" and a ``reason``; FID values under
    ``fid.autoencoding[steps]`` and ``fid.samples``), ``skipped_images`` and ``grids``.
    """
    started = time.time()
    job = job.prepared()
    cluster.connect()
    gpus = cluster.inference_gpus(job.num_gpus)
    job.save_config(job.out)
    nets = _Networks.resolve(job)
    data = job.open_images(read_config(job.bundle, job.s3_endpoint).image_size)
    images = data.dataset.select_columns(["image", "id"])
    fids = _fid_metrics(nets.fid_feature, job.steps)
    count, reconstruction = reconstruct(job, images, nets, gpus, fids)
    fid: dict[str, Any] = {"status": "ok" if fids else "skipped", "reason": nets.fid_reason,
                           "feature": job.fid_feature, "reference_images": count}
    if fids:
        fid["autoencoding"] = {str(s): fids[f"T{s}"].compute() for s in job.steps}
        fid.update(sample_fid(job, job.num_samples or count, nets, gpus, fids["samples"]))
    metrics = {
        "bundle": job.bundle, "data": job.data, "split": job.split, "holdout": job.holdout, "images": count,
        "reconstruction": reconstruction,
        "lpips": {"status": "ok" if nets.lpips_weights else "skipped", "reason": nets.lpips_reason},
        "fid": fid, "skipped_images": data.skips.count(), "grids": write_grids(job, images, gpus),
        "seconds": round(time.time() - started, 1),
    }
    storage.write_json(storage.join(job.out, "metrics.json"), metrics, job.s3_endpoint)
    return EvalResult(out=job.out, metrics=metrics, grids=metrics["grids"])


def _run(job: EvalJob) -> dict[str, Any]:
    result = evaluate(job)
    for steps, values in result.metrics["reconstruction"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if k in RECON_METRICS and v is not None)
        print(f"reconstruction at {steps} steps: {shown}")
    for name in ("lpips", "fid"):
        if result.metrics[name]["status"] == "skipped":
            print(f"{name} skipped: {result.metrics[name]['reason']}")
    return result.metrics


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    return jobkit.run_cli(EvalJob, argv, prog, _run)


if __name__ == "__main__":
    raise SystemExit(main(prog="python -m pipelines.evaluate"))
