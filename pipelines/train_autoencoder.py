"""Train a Diff-AE autoencoder with Ray Train (DDP over N workers, CPU or GPU) fed by Ray Data.

    python -m pipelines.train_autoencoder --data DATA --storage RUNS [--preset ffhq64] [--num-workers N] ...

The official recipe by default (Adam 1e-4, gradient clip 1.0, EMA 0.9999, the preset's global batch and
sample budget); every knob can be overridden by a flag or a YAML/JSON ``--config`` file (keys: the
flags' names with underscores, ``preset``, a partial ``model`` mapping of ModelConfig fields, and the
recipe's ``TrainConfig`` fields). Precedence: preset < config file < flags. The run lives in
``STORAGE/NAME`` (local or ``s3://``): ``config.json`` (resolved settings), Ray Train checkpoints,
``grids/step-*.png`` (inputs / EMA reconstructions / decodes from fixed noise), ``summary.json`` and, at
the end, ``bundle/`` (EMA weights, loadable with ``DiffAE.load``). A failed worker group restarts
from the latest checkpoint (up to ``--max-failures`` times); ``--resume NAME`` continues a stopped run
to exactly its planned sample count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from diffae_core.config import PRESETS, ModelConfig, TrainConfig, get_preset
from diffae_core.diffusion import PREDICTIONS

from . import runtime, storage
from .data import CROPS

DEFAULT_PRESET = "ffhq64"
JOB = "train_autoencoder"


@dataclass
class TrainJobConfig:
    """Everything an autoencoder run needs. ``model.train`` is the optimisation recipe."""

    data: str  # image source, see pipelines.data (folder | parquet | s3:// | shapes[:N] | fashion-mnist | digits)
    storage: str = "runs"  # runs root, local path or s3://bucket/prefix; the run lives in storage/name
    name: str = ""  # run name ("" = autoencoder-<timestamp>)
    model: ModelConfig = field(default_factory=lambda: get_preset(DEFAULT_PRESET))
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    precision: str = "auto"  # auto (bf16 on GPU if supported, else fp16; fp32 on CPU) | fp32 | bf16 | fp16
    checkpoint_every: int = 100_000  # samples between checkpoints (official save_every_samples)
    grid_every: int = 20_000  # samples between PNG grids (official sample_every_samples)
    log_every: int = 10  # steps between progress updates / reported metrics
    progress_bar: bool = True  # rank 0 draws a bar (loss, images/s); without it, a log line per log_every
    max_failures: int = 3  # worker-group restarts before the run fails
    keep_checkpoints: int = 2
    s3_endpoint: str | None = None  # resolved on the driver and handed to the workers
    crop: str = "center"  # or "celeba-d2c"
    flip: bool = True  # random horizontal flip
    holdout: float = 0.0  # train on images outside this held-out fraction (see pipelines.data.is_heldout)
    shuffle_buffer: int = 0  # rows in each worker's local shuffle buffer (0 = 4 local batches)
    grid_images: int = 8
    grid_steps: int = 20  # DDIM steps for the grids' inversion and decoding
    resume: bool = False  # continue the run storage/name (which must exist)
    ledger_dir: str | None = None  # audit: each rank appends one JSON line per step (ids, samples) here
    fault_injection_step: int = 0  # test only: the last rank exits at this step unless resuming

    @property
    def run_dir(self) -> str:
        return storage.uri_join(self.storage, self.name)

    def settings(self) -> dict[str, Any]:
        """The job fields (without the model) as JSON-ready values."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}

    def validate(self) -> None:
        recipe = self.model.train
        w = self.num_workers
        if w < 1:
            raise ValueError(f"num_workers must be >= 1, got {w}")
        if recipe.batch_size % w or recipe.total_samples % w:
            raise ValueError(
                f"the global batch ({recipe.batch_size}) and the sample budget ({recipe.total_samples}) must be "
                f"multiples of the number of workers ({w}), so every worker trains on the same number of images"
            )
        if self.precision not in ("auto", *runtime.PRECISIONS):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")
        for name in ("checkpoint_every", "grid_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class TrainResult:
    run_dir: str
    bundle: str
    metrics: dict[str, Any]  # the last metrics rank 0 reported (step, samples_seen, loss, images_per_second, ...)
    summary: dict[str, Any]  # what summary.json holds
    checkpoint: str | None  # URI-less path of the latest checkpoint in its storage filesystem


def train_autoencoder(job: TrainJobConfig) -> TrainResult:
    """Run (or resume) a training job on the connected Ray cluster; ``ray.init()`` first if needed."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from .autoencoder_worker import train_worker
    from .data import open_images
    from .ray_logs import tolerate_replayed_bar_updates

    if job.progress_bar:
        tolerate_replayed_bar_updates()  # rank 0's bar is drawn here, on the driver

    job = dataclasses.replace(job, name=job.name or runtime.default_run_name("autoencoder"),
                              storage=storage.absolute(job.storage), data=storage.absolute(job.data),
                              ledger_dir=storage.absolute(job.ledger_dir))
    job.validate()
    runtime.ensure_ray()
    endpoint = runtime.resolve_endpoint(job.s3_endpoint)
    config_uri = storage.uri_join(job.run_dir, "config.json")
    exists = runtime.exists(config_uri, endpoint)
    if exists and not job.resume:
        raise FileExistsError(f"run {job.run_dir} already exists: continue it with --resume {job.name}, "
                              "or choose another --name")
    if job.resume and not exists:
        raise FileNotFoundError(f"no run to resume at {job.run_dir} (it has no config.json)")
    resolved = {"settings": job.settings(), "model": job.model.to_dict()}
    runtime.save_run_config(job.run_dir, JOB, resolved, endpoint)

    recipe = job.model.train
    data = open_images(job.data, job.model.image_size, split="train", holdout=job.holdout, flip=job.flip,
                       crop=job.crop, s3_endpoint=endpoint, seed=recipe.seed, shuffle_seed=recipe.seed)
    storage_path, storage_fs = storage.ray_storage(job.storage, endpoint)
    resources = {"CPU": job.cpus_per_worker, **({"GPU": 1} if job.use_gpu else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job, "run_dir": job.run_dir, "endpoint": endpoint, "skips": data.skips,
                           "resolved_config": resolved},
        scaling_config=ray.train.ScalingConfig(num_workers=job.num_workers, use_gpu=job.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=job.name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=job.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.keep_checkpoints),
        ),
        datasets={"train": data.dataset},
    )
    start = time.time()
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    skips = data.skips.summary()
    bundle = storage.uri_join(job.run_dir, "bundle")
    summary = {
        "run_dir": job.run_dir,
        "bundle": bundle,
        "samples_seen": metrics.get("samples_seen"),
        "total_samples": recipe.total_samples,
        "steps": metrics.get("step"),
        "epochs": metrics.get("epoch"),
        "loss": metrics.get("loss"),
        "images_per_second": metrics.get("images_per_second"),
        "num_workers": job.num_workers,
        "seconds": round(time.time() - start, 1),
        "skipped_images": skips["skipped"],
        "skipped_examples": skips["skipped_examples"],
    }
    runtime.write_json(storage.uri_join(job.run_dir, "summary.json"), summary, endpoint)
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    return TrainResult(job.run_dir, bundle, metrics, summary, checkpoint)


# ---- command line -----------------------------------------------------------------------------
def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="images: folder | parquet | s3:// URI | shapes[:N] | fashion-mnist[:t10k] | "
                                  "digits (required unless --resume)")
    p.add_argument("--storage", help="runs root: local folder or s3://bucket/prefix (default: runs)")
    p.add_argument("--name", help="run name (default: autoencoder-<timestamp>)")
    p.add_argument("--resume", metavar="RUN", help="continue the stopped run STORAGE/RUN with its saved config "
                                                   "(flags given now override it, e.g. --max-samples)")
    p.add_argument("--preset", choices=sorted(PRESETS), help=f"model preset (default: {DEFAULT_PRESET})")
    p.add_argument("--image-size", type=int, help="override the preset's image size")
    p.add_argument("--prediction", choices=PREDICTIONS,
                   help="what the decoder predicts: eps (official presets) or v (demo16; learns z_sem faster)")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    runtime.add_train_flags(p)  # --config, --batch-size, --lr, ..., --max-samples, --seed
    p._option_string_actions["--config"].help = (
        "YAML/JSON file: any of this job's settings (flag names with underscores), 'preset', a partial "
        "'model' mapping of ModelConfig fields, and recipe fields (batch_size, lr, ...); flags win over it")
    g = p.add_argument_group("schedule")
    g.add_argument("--warmup-steps", type=int, help="linear learning-rate warm-up steps (official: 0)")
    g.add_argument("--checkpoint-every", type=int, help="samples between checkpoints (default: 100000)")
    g.add_argument("--grid-every", type=int, help="samples between PNG grids (default: 20000)")
    g.add_argument("--log-every", type=int, help="steps between progress lines and reported metrics (default: 10)")
    g.add_argument("--no-progress-bar", dest="progress_bar", action="store_false", default=None,
                   help="a log line every --log-every steps instead of a progress bar")
    g.add_argument("--grid-images", type=int, help="images per grid row (default: 8)")
    g.add_argument("--grid-steps", type=int, help="DDIM steps for the grids (default: 20)")
    g = p.add_argument_group("cluster")
    g.add_argument("--num-workers", type=int, help="Ray Train workers (default: 1)")
    g.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker")
    g.add_argument("--cpus-per-worker", type=float, help="CPUs reserved per worker (default: 1)")
    g.add_argument("--precision", choices=["auto", *runtime.PRECISIONS],
                   help="auto: bf16 (or fp16) autocast on GPU, fp32 on CPU (default: auto)")
    g.add_argument("--max-failures", type=int, help="worker-group restarts from the last checkpoint (default: 3)")
    g.add_argument("--keep-checkpoints", type=int, help="checkpoints kept in the run directory (default: 2)")
    g = p.add_argument_group("data")
    g.add_argument("--crop", choices=CROPS, help="'celeba-d2c': the official CelebA crop (default: center)")
    g.add_argument("--no-flip", dest="flip", action="store_false", default=None, help="no random horizontal flip")
    g.add_argument("--holdout", type=float, help="leave out this fraction of images (by id hash) for evaluation")
    g.add_argument("--shuffle-buffer", type=int, help="rows per worker's local shuffle buffer (0 = 4 batches)")
    runtime.add_storage_flags(p)
    return p


_MODEL_KEYS = {"preset", "model"}


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def resolve_job(args: argparse.Namespace) -> TrainJobConfig:
    """Flags + optional config file (or the saved config of the run being resumed) -> a TrainJobConfig."""
    endpoint = runtime.resolve_endpoint(args.s3_endpoint)
    job_fields = {f.name for f in dataclasses.fields(TrainJobConfig)} - {"model"}
    recipe_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if args.resume:
        root = args.storage or "runs"
        saved = runtime.read_json(storage.uri_join(root, args.resume, "config.json"), endpoint)["config"]
        settings, model_dict = dict(saved["settings"]), saved["model"]
        settings.update(storage=root, name=args.resume, resume=True)
        file: dict[str, Any] = {}
    else:
        file = runtime.read_overrides(args.config, endpoint)
        unknown = sorted(set(file) - job_fields - recipe_fields - _MODEL_KEYS)
        if unknown:
            raise ValueError(f"{args.config}: unknown setting(s) {unknown}; known: "
                             f"{sorted(job_fields | recipe_fields | _MODEL_KEYS)}")
        settings = {k: v for k, v in file.items() if k in job_fields}
        model_dict = get_preset(args.preset or file.get("preset") or DEFAULT_PRESET).to_dict()
        model_dict = _merge(model_dict, file.get("model") or {})
    if args.image_size is not None:
        model_dict = _merge(model_dict, {"unet": {"image_size": args.image_size}})
    if args.prediction is not None:
        model_dict = _merge(model_dict, {"diffusion": {"prediction": args.prediction}})
    model = ModelConfig.from_dict(model_dict)
    file_recipe = {k: v for k, v in file.items() if k in recipe_fields}
    model.train = runtime.resolve_train_config(model.train, file_recipe, **runtime.train_flags(args),
                                               warmup_steps=args.warmup_steps)
    flags = {name: getattr(args, name, None) for name in job_fields if name not in ("resume", "name", "storage")}
    settings.update({k: v for k, v in flags.items() if v is not None})
    if not args.resume:
        settings.update({k: v for k, v in (("name", args.name), ("storage", args.storage)) if v is not None})
    if not settings.get("data"):
        raise SystemExit("error: --data is required (or --resume RUN)")
    return TrainJobConfig(model=model, **settings)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    job = resolve_job(args)
    if args.print_config:
        print(json.dumps({"settings": job.settings(), "model": job.model.to_dict()}, indent=2))
        return 0
    result = train_autoencoder(job)
    print(f"trained {result.summary['samples_seen']} samples in {result.summary['steps']} steps "
          f"({result.summary['seconds']} s); skipped {result.summary['skipped_images']} unreadable image(s); "
          f"bundle: {result.bundle}")
    print(json.dumps(runtime.json_safe(result.summary)))
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m pipelines.train_autoencoder"))
