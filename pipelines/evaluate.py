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
GPUs); actors return per-image metrics and feature vectors, and the driver reduces them (float64 sums,
so the result does not depend on how rows were batched). Output in DIR (local or s3://):
``metrics.json``, ``config.json``, ``grids/reconstructions.png`` (inputs, then one row per step count)
and ``grids/samples.png`` (with a latent net).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from diffae_core import metrics as M
from diffae_core.bundle import load_bundle
from diffae_core.images import make_grid

from . import runtime, storage

FEATURES = ("inception", "pixels")
RECON_METRICS = ("mse", "psnr", "ssim", "lpips")


@dataclass
class EvalJob:
    """What to evaluate and how. Steps are DDIM step counts (respaced), not original timesteps."""

    bundle: str
    data: str  # image source (see pipelines.data); the evaluated split of it is also FID's reference set
    out: str  # output directory, local or s3://
    split: str = "heldout"  # "heldout" | "train" | "all" (see pipelines.data.is_heldout)
    holdout: float = 0.1  # the held-out fraction that defines the splits (use the training run's)
    limit: int | None = None  # evaluate at most this many images
    crop: str = "center"
    steps: tuple[int, ...] = (10,)  # decoding steps; one reconstruction evaluation per value
    inversion_steps: int | None = None  # DDIM inversion steps (None = the decoding steps)
    lpips: bool = True
    fid: bool = True
    fid_feature: str = "inception"  # "inception" (FID) or "pixels" (weight-free stand-in, for smoke tests)
    fid_weights: str | None = None  # Inception weights file (default: $DIFFAE_FID_WEIGHTS, $TORCH_HOME)
    lpips_weights: str | None = None  # AlexNet weights file (default: $DIFFAE_ALEXNET_WEIGHTS, $TORCH_HOME)
    num_samples: int | None = None  # unconditional samples for FID (None = as many as evaluated images)
    sample_steps: int = 20
    latent_steps: int = 20
    grid_images: int = 8
    batch_size: int = 32
    concurrency: int = 1
    num_gpus: float | None = None  # per actor; None = 1 when the cluster has GPUs
    precision: str = "fp32"
    seed: int = 0
    endpoint: str | None = None

    def validate(self) -> None:
        if not self.steps or min(self.steps) < 1:
            raise ValueError(f"steps must be positive DDIM step counts, got {self.steps}")
        if self.fid_feature not in FEATURES:
            raise ValueError(f"fid_feature must be one of {FEATURES}, got {self.fid_feature!r}")
        if self.precision not in runtime.PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(runtime.PRECISIONS)}, got {self.precision!r}")


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
    """uint8 [B,3,H,W] -> [B,192]: 8x8 average-pooled pixels in [0,1]. A weight-free stand-in for Inception."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 8).flatten(1)


def feature_network(kind: str, weights: str | None, device: torch.device) -> torch.nn.Module:
    """The FID feature extractor: uint8 [B,3,H,W] -> [B,D] (Inception pool3: D = 2048)."""
    if kind == "pixels":
        return PixelFeatures().to(device)
    from torchmetrics.image.fid import NoTrainInceptionV3

    return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                              feature_extractor_weights_path=weights).to(device)


class FeatureMoments:
    """Running count, sum and sum of outer products of feature rows (float64) -> mean and covariance."""

    def __init__(self) -> None:
        self.n, self.s1, self.s2 = 0, None, None

    def update(self, feats: np.ndarray) -> None:
        f = np.asarray(feats, dtype=np.float64)
        if f.shape[0] == 0:
            return
        if self.s1 is None:
            self.s1, self.s2 = np.zeros(f.shape[1]), np.zeros((f.shape[1], f.shape[1]))
        self.n += f.shape[0]
        self.s1 += f.sum(0)
        self.s2 += f.T @ f

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"FID needs at least 2 images per set, got {self.n}")
        mu = self.s1 / self.n
        return mu, (self.s2 - self.n * np.outer(mu, mu)) / (self.n - 1)


def fid(a: FeatureMoments, b: FeatureMoments) -> float:
    return M.frechet_distance(*a.mean_cov(), *b.mean_cov())


# ---- Ray Data actors ----------------------------------------------------------------------------
class _BundleActor:
    def __init__(self, bundle: str, num_gpus: float, precision: str, endpoint: str | None,
                 fid_feature: str | None, fid_weights: str | None):
        self.device = runtime.inference_device(num_gpus)
        self.model = load_bundle(bundle, device=self.device, endpoint=endpoint)
        self.model.inference_dtype = runtime.PRECISIONS[precision]
        self.features = feature_network(fid_feature, fid_weights, self.device) if fid_feature else None

    @torch.no_grad()
    def feats(self, images01: torch.Tensor) -> np.ndarray:
        return self.features(quantise(images01.float())).double().cpu().numpy()


class Reconstructor(_BundleActor):
    """Image rows -> per-image reconstruction metrics (``mse_T{s}`` ...) and FID features for each step count.

    Input (numpy batch): ``image`` [B,3,S,S] float32 in [-1,1], ``id``. Output: ``id``, one float column per
    metric and step count, and with FID on ``feat_real`` / ``feat_T{s}`` [B, D] float64 rows.
    """

    def __init__(self, bundle: str, steps: Sequence[int], inversion_steps: int | None, lpips_weights: str | None,
                 num_gpus: float = 0.0, precision: str = "fp32", endpoint: str | None = None,
                 fid_feature: str | None = None, fid_weights: str | None = None):
        super().__init__(bundle, num_gpus, precision, endpoint, fid_feature, fid_weights)
        self.steps, self.inversion_steps = list(steps), inversion_steps
        self.lpips_net = M.load_lpips(self.device, lpips_weights) if lpips_weights else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(batch["image"], dtype=np.float32)).to(self.device)
        x01 = (x + 1) / 2
        z = self.model.encode(x)
        out: dict[str, np.ndarray] = {"id": np.asarray(batch["id"])}
        if self.features is not None:
            out["feat_real"] = self.feats(x01)
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
                out[f"feat_T{s}"] = self.feats(r01)
        return out


def sample_noise(ids: Sequence[int], image_size: int, z_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_T [n,3,S,S], latent noise [n,Z]) with each sample's noise fixed by (seed, id), whatever the batching."""
    xs, zs = [], []
    for i in ids:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, int(i)]).generate_state(1)[0]))
        xs.append(torch.randn(3, image_size, image_size, generator=g))
        zs.append(torch.randn(z_dim, generator=g))
    return torch.stack(xs), torch.stack(zs)


class SampleFeatures(_BundleActor):
    """Rows of sample indices (``id``) -> FID features ``feat`` [B, D] of unconditional samples."""

    def __init__(self, bundle: str, sample_steps: int, latent_steps: int, seed: int, num_gpus: float = 0.0,
                 precision: str = "fp32", endpoint: str | None = None, fid_feature: str = "inception",
                 fid_weights: str | None = None):
        super().__init__(bundle, num_gpus, precision, endpoint, fid_feature, fid_weights)
        self.sample_steps, self.latent_steps, self.seed = sample_steps, latent_steps, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        noise, latent_noise = sample_noise(batch["id"], self.model.image_size, self.model.config.z_dim, self.seed)
        x = self.model.sample(len(noise), steps=self.sample_steps, latent_steps=self.latent_steps,
                              noise=noise.to(self.device), latent_noise=latent_noise.to(self.device))
        return {"feat": self.feats((x.float() + 1) / 2)}


def _grids(bundle: str, images: np.ndarray, steps: Sequence[int], inversion_steps: int | None, sample_steps: int,
           latent_steps: int, seed: int, num_gpus: float, endpoint: str | None) -> dict[str, bytes]:
    """PNG bytes of the reconstruction grid (inputs, then one row per step count) and, with a latent net, of
    samples from fixed noise. Runs as a Ray task (on a GPU when given one)."""
    model = load_bundle(bundle, device=runtime.inference_device(num_gpus), endpoint=endpoint)
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


# ---- the job ------------------------------------------------------------------------------------
def _weights_or_reason(enabled: bool, filename: str, env_var: str, path: str | None, what: str) -> tuple[
        str | None, str | None]:
    if not enabled:
        return None, f"{what} disabled"
    try:
        return str(M.resolve_weights(filename, env_var, path)), None
    except M.MissingWeightsError as exc:
        return None, str(exc)


def evaluate(job: EvalJob) -> EvalResult:
    """Run the evaluation on the connected Ray cluster (``ray.init()`` first if needed); write and return metrics.

    Returns an :class:`EvalResult` whose ``metrics`` is also written to ``out/metrics.json``:
    ``images`` (count), ``reconstruction`` {steps: {mse, psnr, ssim, lpips}}, ``lpips`` and ``fid`` (each
    with ``status`` "ok" or "skipped" and a ``reason``; FID values under ``fid.autoencoding[steps]`` and
    ``fid.samples``), ``skipped_images`` and ``grids``.
    """
    import ray

    from .data import open_images

    job.validate()
    job = dataclasses.replace(job, bundle=storage.absolute(job.bundle), data=storage.absolute(job.data),
                              out=storage.absolute(job.out))  # Ray actors and tasks have their own cwd
    started = time.time()
    runtime.ensure_ray()
    endpoint = runtime.resolve_endpoint(job.endpoint)
    num_gpus = runtime.resolve_num_gpus(job.num_gpus)
    config = runtime.bundle_config(job.bundle, endpoint)
    runtime.save_run_config(job.out, "evaluate", {**dataclasses.asdict(job), "num_gpus": num_gpus}, endpoint)

    lpips_weights, lpips_reason = _weights_or_reason(job.lpips, M.ALEXNET_WEIGHTS, M.ALEXNET_WEIGHTS_ENV,
                                                     job.lpips_weights, "LPIPS")
    if job.fid_feature == "pixels" and job.fid:
        fid_weights, fid_reason = None, None
    else:
        fid_weights, fid_reason = _weights_or_reason(job.fid, M.FID_INCEPTION_WEIGHTS, M.FID_WEIGHTS_ENV,
                                                     job.fid_weights, "FID")
    fid_feature = job.fid_feature if fid_reason is None else None

    data = open_images(job.data, config.image_size, split=job.split, holdout=job.holdout, flip=False, crop=job.crop,
                       s3_endpoint=endpoint)
    images = data.dataset.limit(job.limit) if job.limit is not None else data.dataset
    images = images.select_columns(["image", "id"])
    common = {"bundle": job.bundle, "num_gpus": num_gpus, "precision": job.precision, "endpoint": endpoint,
              "fid_feature": fid_feature, "fid_weights": fid_weights}
    per_image = images.map_batches(
        Reconstructor, fn_constructor_kwargs={**common, "steps": list(job.steps),
                                              "inversion_steps": job.inversion_steps, "lpips_weights": lpips_weights},
        batch_size=job.batch_size, compute=ray.data.ActorPoolStrategy(size=job.concurrency), num_gpus=num_gpus,
        batch_format="numpy",
    )
    sums: dict[str, float] = {}
    count = 0
    real, recon = FeatureMoments(), {s: FeatureMoments() for s in job.steps}
    for batch in per_image.iter_batches(batch_size=256, batch_format="numpy"):
        count += len(batch["id"])
        for key, values in batch.items():
            if key.split("_T")[0] in RECON_METRICS:
                sums[key] = sums.get(key, 0.0) + float(np.asarray(values, dtype=np.float64).sum())
        if fid_feature:
            real.update(np.stack(batch["feat_real"]))
            for s in job.steps:
                recon[s].update(np.stack(batch[f"feat_T{s}"]))
    if count == 0:
        raise ValueError(f"no images to evaluate in split {job.split!r} of {job.data} (holdout {job.holdout})")
    reconstruction = {
        str(s): {"decoding_steps": s, "inversion_steps": job.inversion_steps or s,
                 **{m: (sums[f"{m}_T{s}"] / count if f"{m}_T{s}" in sums else None) for m in RECON_METRICS}}
        for s in job.steps
    }

    fid_report: dict[str, Any] = {"status": "ok" if fid_feature else "skipped", "reason": fid_reason,
                                  "feature": job.fid_feature, "reference_images": count}
    if fid_feature:
        fid_report["autoencoding"] = {str(s): fid(real, recon[s]) for s in job.steps}
        if _has_latent(job.bundle, endpoint):
            n = job.num_samples or count
            sample_feats = ray.data.range(n).map_batches(
                SampleFeatures, fn_constructor_kwargs={**common, "sample_steps": job.sample_steps,
                                                       "latent_steps": job.latent_steps, "seed": job.seed},
                batch_size=job.batch_size, compute=ray.data.ActorPoolStrategy(size=job.concurrency),
                num_gpus=num_gpus, batch_format="numpy",
            )
            fake = FeatureMoments()
            for batch in sample_feats.iter_batches(batch_size=256, batch_format="numpy"):
                fake.update(np.stack(batch["feat"]))
            fid_report.update(samples=fid(real, fake), num_samples=n, sample_steps=job.sample_steps,
                              latent_steps=job.latent_steps)
        else:
            fid_report.update(samples=None, samples_reason="the bundle has no latent DPM: train one with "
                                                            "`diffae train latent` to sample unconditionally")

    grid_rows = np.stack([r["image"] for r in images.take(job.grid_images)])
    pngs = ray.get(ray.remote(num_gpus=num_gpus)(_grids).remote(
        job.bundle, grid_rows, list(job.steps), job.inversion_steps, job.sample_steps, job.latent_steps, job.seed,
        num_gpus, endpoint))
    grids = []
    for name, png in pngs.items():
        uri = storage.uri_join(job.out, "grids", name)
        runtime.write_bytes(uri, png, endpoint)
        grids.append(uri)

    metrics = {
        "bundle": job.bundle, "data": job.data, "split": job.split, "holdout": job.holdout, "images": count,
        "reconstruction": reconstruction,
        "lpips": {"status": "ok" if lpips_weights else "skipped", "reason": lpips_reason},
        "fid": fid_report,
        "skipped_images": data.skips.count(),
        "grids": grids,
        "seconds": round(time.time() - started, 1),
    }
    runtime.write_json(storage.uri_join(job.out, "metrics.json"), metrics, endpoint)
    return EvalResult(out=job.out, metrics=metrics, grids=grids)


def _has_latent(bundle: str, endpoint: str | None) -> bool:
    from diffae_core.bundle import LATENT, read_manifest

    return LATENT in read_manifest(bundle, endpoint)["files"]


# ---- command line -------------------------------------------------------------------------------
def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bundle", required=True, help="the bundle to evaluate (path or s3://)")
    runtime.add_data_flags(p, split="heldout", holdout=0.1)
    p.add_argument("--out", required=True, help="output directory (path or s3://) for metrics.json and grids/")
    p.add_argument("--steps", type=int, nargs="+", default=[10], help="DDIM decoding steps (one evaluation each)")
    p.add_argument("--inversion-steps", type=int, help="DDIM inversion steps (default: the decoding steps)")
    p.add_argument("--no-lpips", dest="lpips", action="store_false", help="skip LPIPS")
    p.add_argument("--no-fid", dest="fid", action="store_false", help="skip FID")
    p.add_argument("--fid-feature", choices=FEATURES, default="inception",
                   help="'pixels': a weight-free stand-in for Inception (smoke tests; not FID)")
    p.add_argument("--fid-weights", help="Inception weights file (default: $DIFFAE_FID_WEIGHTS, $TORCH_HOME)")
    p.add_argument("--lpips-weights", help="AlexNet weights file (default: $DIFFAE_ALEXNET_WEIGHTS, $TORCH_HOME)")
    p.add_argument("--num-samples", type=int, help="unconditional samples for FID (default: the number of images)")
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps of the decoder when sampling")
    p.add_argument("--latent-steps", type=int, default=20, help="DDIM steps of the latent DPM when sampling")
    p.add_argument("--grid-images", type=int, default=8, help="images per grid row")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    runtime.add_inference_flags(p, batch_size=32)
    runtime.add_storage_flags(p)
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    job = EvalJob(bundle=args.bundle, data=args.data, out=args.out, split=args.split, holdout=args.holdout,
                  limit=args.limit, crop=args.crop, steps=tuple(args.steps), inversion_steps=args.inversion_steps,
                  lpips=args.lpips, fid=args.fid, fid_feature=args.fid_feature, fid_weights=args.fid_weights,
                  lpips_weights=args.lpips_weights, num_samples=args.num_samples, sample_steps=args.sample_steps,
                  latent_steps=args.latent_steps, grid_images=args.grid_images, batch_size=args.batch_size,
                  concurrency=args.concurrency, num_gpus=args.num_gpus, precision=args.precision, seed=args.seed,
                  endpoint=args.s3_endpoint)
    result = evaluate(job)
    for steps, values in result.metrics["reconstruction"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if k in RECON_METRICS and v is not None)
        print(f"reconstruction at {steps} steps: {shown}")
    for name in ("lpips", "fid"):
        if result.metrics[name]["status"] == "skipped":
            print(f"{name} skipped: {result.metrics[name]['reason']}")
    print(json.dumps(runtime.json_safe(result.metrics)))
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m pipelines.evaluate"))
