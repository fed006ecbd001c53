"""Plumbing shared by the Ray jobs: Ray start-up, output URIs, resolved configs, recipe overrides.

Every job writes its outputs under a directory URI (a local path, ``file://`` or ``s3://bucket/prefix``)
through :mod:`pipelines.storage`, so the same command works on a laptop and against S3. The S3 endpoint
(``--s3-endpoint`` or the standard AWS variables) is resolved once on the driver with
:func:`resolve_endpoint` and passed to actors and workers explicitly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from diffae_core import DiffAE
from diffae_core.bundle import AUTOENCODER, CONFIG, MANIFEST, load_bundle, read_manifest, save_bundle
from diffae_core.config import ModelConfig, TrainConfig

from . import storage

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def ensure_ray() -> None:
    """Connect to Ray unless already connected.

    Under ``ray job submit`` (or with ``RAY_ADDRESS`` set) ``ray.init()`` joins that cluster; otherwise it
    starts a local instance. Tests start their own Ray first, and this leaves it alone.
    """
    import ray

    if not ray.is_initialized():
        ray.init()


def gpus_in_cluster() -> float:
    """How many GPUs the connected Ray cluster has (0 on a CPU-only cluster)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def resolve_num_gpus(requested: float | None) -> float:
    """GPUs per inference actor: the request, or 1 when the cluster has any GPU and none was requested."""
    if requested is not None:
        if requested < 0:
            raise ValueError(f"--num-gpus must be >= 0, got {requested}")
        return requested
    return 1.0 if gpus_in_cluster() > 0 else 0.0


def inference_device(num_gpus: float) -> torch.device:
    """The device an actor granted ``num_gpus`` GPUs computes on (Ray sets CUDA_VISIBLE_DEVICES)."""
    return torch.device("cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu")


def resolve_endpoint(flag: str | None) -> str | None:
    """The S3 endpoint for this run: ``--s3-endpoint``, else the driver's AWS variables (or None)."""
    return storage.s3_endpoint(flag)


def write_bytes(uri: str, data: bytes, endpoint: str | None = None) -> None:
    fs, path = storage.resolve(uri, endpoint)
    storage.write_bytes(fs, path, data)


def read_bytes(uri: str, endpoint: str | None = None) -> bytes:
    fs, path = storage.resolve(uri, endpoint)
    if not storage.exists(fs, path):
        raise FileNotFoundError(f"{uri} does not exist")
    return storage.read_bytes(fs, path)


def exists(uri: str, endpoint: str | None = None) -> bool:
    fs, path = storage.resolve(uri, endpoint)
    return storage.exists(fs, path)


def json_safe(value: Any) -> Any:
    """Dataclasses, tensors, tuples and non-finite floats -> plain JSON values (NaN/inf become None)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_safe(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return json_safe(value.item())
    return value


def write_json(uri: str, obj: Any, endpoint: str | None = None) -> None:
    write_bytes(uri, (json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n").encode(), endpoint)


def read_json(uri: str, endpoint: str | None = None) -> Any:
    return json.loads(read_bytes(uri, endpoint))


def save_run_config(out_dir: str, job: str, config: Any, endpoint: str | None = None) -> str:
    """Write ``out_dir/config.json``: the job name, its command line and its fully resolved settings."""
    uri = storage.uri_join(out_dir, "config.json")
    write_json(uri, {"job": job, "argv": sys.argv, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "config": config}, endpoint)
    return uri


def default_run_name(job: str) -> str:
    return f"{job}-{time.strftime('%Y%m%d-%H%M%S')}"


def read_overrides(path: str | None, endpoint: str | None = None) -> dict[str, Any]:
    """A YAML or JSON mapping of overrides (local path or URI); {} when ``path`` is None."""
    if path is None:
        return {}
    import yaml  # YAML is a superset of JSON, so one parser reads both

    data = yaml.safe_load(read_bytes(path, endpoint))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def resolve_train_config(base: TrainConfig, file_overrides: Mapping[str, Any], **flags: Any) -> TrainConfig:
    """``base`` recipe, then the file's overrides, then the flags that were given (None = not given)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(file_overrides) - known)
    if unknown:
        raise ValueError(f"unknown training setting(s) {unknown}; known: {sorted(known)}")
    merged = {**dataclasses.asdict(base), **file_overrides, **{k: v for k, v in flags.items() if v is not None}}
    cfg = TrainConfig(**merged)
    if cfg.optimizer not in ("adam", "adamw"):
        raise ValueError(f"optimizer must be 'adam' or 'adamw', got {cfg.optimizer!r}")
    if cfg.batch_size < 1 or cfg.total_samples < 1 or cfg.lr <= 0:
        raise ValueError(f"batch_size, total_samples and lr must be positive, got {cfg}")
    return cfg


def build_optimizer(params: Sequence[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam or AdamW with the recipe's lr and weight decay (PyTorch default betas/eps, as the official)."""
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class EpochSampler:
    """Batches of row indices: one random permutation per epoch, batches may straddle epochs.

    Its state (permutation, position, generator) is checkpointed so a resumed run continues the stream.
    """

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.gen = n, generator
        self.perm = torch.empty(0, dtype=torch.int64, device=generator.device)
        self.pos = 0
        self.epoch = 0

    def next(self, batch: int) -> torch.Tensor:
        parts, need = [], batch
        while need > 0:
            if self.pos == self.perm.numel():
                self.perm = torch.randperm(self.n, generator=self.gen, device=self.gen.device)
                self.pos, self.epoch = 0, self.epoch + 1
            take = min(need, self.perm.numel() - self.pos)
            parts.append(self.perm[self.pos:self.pos + take])
            self.pos, need = self.pos + take, need - take
        return torch.cat(parts)

    def state_dict(self) -> dict:
        return {"perm": self.perm.cpu(), "pos": self.pos, "epoch": self.epoch, "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.perm = state["perm"].to(self.gen.device)
        self.pos, self.epoch = int(state["pos"]), int(state["epoch"])
        self.gen.set_state(state["gen"])


def add_train_flags(parser: Any, ema: bool = True) -> None:
    """Flags that override fields of a :class:`TrainConfig` recipe (omitted = keep the recipe's value).

    ``ema=False`` leaves out the EMA flags, for jobs that export their final weights.
    """
    g = parser.add_argument_group("recipe overrides (default: the bundle preset's recipe)")
    g.add_argument("--config", help="YAML/JSON file of recipe fields (batch_size, lr, ...); flags win over it")
    g.add_argument("--batch-size", type=int, help="global batch size (split evenly over workers)")
    g.add_argument("--lr", type=float, help="learning rate")
    g.add_argument("--weight-decay", type=float, help="weight decay")
    g.add_argument("--optimizer", choices=["adam", "adamw"], help="optimiser")
    g.add_argument("--grad-clip", type=float, help="gradient-norm clip (0 = none)")
    if ema:
        g.add_argument("--ema-decay", type=float, help="EMA decay of the weights that are exported")
        g.add_argument("--ema-warmup-steps", type=int, help="ramp the EMA decay over this many steps (short runs)")
    g.add_argument("--max-samples", type=int, dest="total_samples",
                   help="total training samples (steps = ceil(samples / batch size))")
    g.add_argument("--seed", type=int, help="random seed")


def train_flags(args: Any) -> dict[str, Any]:
    """The recipe overrides :func:`add_train_flags` parsed, as keyword arguments."""
    names = ("batch_size", "lr", "weight_decay", "optimizer", "grad_clip", "ema_decay", "ema_warmup_steps",
             "total_samples", "seed")
    return {name: getattr(args, name, None) for name in names}


def add_inference_flags(parser: Any, batch_size: int) -> None:
    """Actor-pool flags shared by the batch-inference jobs."""
    g = parser.add_argument_group("batch inference (Ray Data actor pool)")
    g.add_argument("--batch-size", type=int, default=batch_size, help="images per model call")
    g.add_argument("--concurrency", type=int, default=1, help="number of model actors")
    g.add_argument("--num-gpus", type=float, default=None,
                   help="GPUs per actor (default: 1 when the cluster has GPUs, else 0)")
    g.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                   help="inference precision (bf16/fp16 autocast on GPU)")


def add_data_flags(parser: Any, split: str, holdout: float) -> None:
    """Flags naming the images a job reads (see :func:`pipelines.data.open_images`)."""
    from .data import CROPS, SPLITS

    g = parser.add_argument_group("data")
    g.add_argument("--data", required=True,
                   help="images: folder | parquet | s3:// URI | shapes[:N] | fashion-mnist[:t10k] | digits")
    g.add_argument("--split", choices=SPLITS, default=split,
                   help="'heldout': images whose sha1(id) falls below --holdout; 'train': the others")
    g.add_argument("--holdout", type=float, default=holdout, help="held-out fraction defining the splits")
    g.add_argument("--limit", type=int, help="use at most this many images (after the split)")
    g.add_argument("--crop", choices=CROPS, default="center", help="'celeba-d2c': the official CelebA crop")
    g.add_argument("--attributes", help="CSV or CelebA-HQ annotation file joined on the image id")


def open_data(args: Any, image_size: int, endpoint: str | None):
    """The images named by :func:`add_data_flags`' flags, never flipped (inference and evaluation)."""
    from .data import open_images

    data = open_images(args.data, image_size, split=args.split, holdout=args.holdout, flip=False, crop=args.crop,
                       attributes=args.attributes, s3_endpoint=endpoint)
    if args.limit is not None:
        data.dataset = data.dataset.limit(args.limit)
    return data


def add_storage_flags(parser: Any) -> None:
    parser.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (MinIO, moto); default: AWS variables")


def bundle_config(uri: str, endpoint: str | None = None) -> ModelConfig:
    """A bundle's ModelConfig, read without loading its weights."""
    return ModelConfig.from_dict(read_json(storage.uri_join(uri, CONFIG), endpoint))


def update_bundle(source: str, out: str | None, attach: Callable[[DiffAE], None],
                  expected_autoencoder: str | None = None, endpoint: str | None = None) -> str:
    """Add a head to a bundle and save it; returns the URI written.

    ``out`` None updates ``source`` in place; otherwise ``out`` is written, starting from the bundle already
    at ``out`` when there is one (so a latent DPM and a classifier trained one after the other into the same
    ``out`` both end up in it) and from ``source`` when there is none. ``expected_autoencoder`` (the sha256
    recorded with the latents) guards against attaching a head trained on another encoder's z_sem.
    The manifest is written last, so an interrupted save is refused at load time, never half-read.
    """
    target = out or source
    base = target if exists(storage.uri_join(target, MANIFEST), endpoint) else source
    manifest = read_manifest(base, endpoint)
    sha = manifest["files"][AUTOENCODER]["sha256"]
    if expected_autoencoder and sha != expected_autoencoder:
        raise ValueError(
            f"{base} has a different autoencoder (sha256 {sha[:12]}...) from the one that computed the latents "
            f"({expected_autoencoder[:12]}...): recompute them with `diffae infer-latents --bundle {base}`"
        )
    model = load_bundle(base, endpoint=endpoint)
    attach(model)
    save_bundle(model, target, endpoint)
    return target
