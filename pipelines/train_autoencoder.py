"""Train a Diff-AE autoencoder with Ray Train (DDP over N workers, or elastic MIN-MAX, CPU or GPU) fed by Ray Data.

    python -m pipelines.train_autoencoder --data DATA --storage RUNS [--preset ffhq64] [--num-workers N|MIN-MAX]

The official recipe by default (Adam 1e-4, gradient clip 1.0, EMA 0.9999, the preset's global batch and
sample budget); every knob can be overridden by a flag or a YAML/JSON ``--config`` file (this job's settings,
``preset``, a partial ``model`` mapping of ModelConfig fields, recipe fields flat). The run lives in
``STORAGE/NAME`` (local or ``s3://``): ``config.json``, Ray Train checkpoints, ``grids/step-*.png`` (inputs /
EMA reconstructions / decodes of their z_sem from fixed noise), ``summary.json`` and, at the end, ``bundle/``
(EMA weights, loadable with ``DiffAE.load``). A failed worker group restarts from the latest checkpoint (up
to ``--max-failures`` times; an elastic run continues with the workers that are left and grows back when
nodes return); ``--resume NAME`` continues a stopped run to exactly its planned sample count.

Each step the global RNG is re-seeded from (seed, rank, step), so a resumed run draws the same timesteps,
noise and dropout as an uninterrupted one; see pipelines.training for the sample accounting.
"""

from __future__ import annotations

import dataclasses
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from diffae_core import DiffAE, storage
from diffae_core.config import PRESETS, ModelConfig, get_preset
from diffae_core.diffusion import PREDICTIONS
from diffae_core.images import make_grid
from diffae_core.performance import PerformanceOptions, apply, optimizer_kwargs

from . import cluster, jobkit
from .data import CROPS, open_images, source_uri
from .jobkit import Flag, option
from .streams import Position, ShardStream, reshard
from .training import (
    LoopContext,
    Optimization,
    RayTrainContext,
    Schedule,
    StepOutput,
    TrainerJob,
    TrainTask,
    derived_seed,
    run_loop,
    speed_options,
)

DEFAULT_PRESET = "ffhq64"
CHECKPOINT_FORMAT = "diffae-ray-autoencoder-checkpoint"


@dataclass(kw_only=True)
class TrainJobConfig(TrainerJob):
    """Train a Diff-AE autoencoder with Ray Train, fed by Ray Data. ``model.train`` is the optimisation recipe."""

    job_name: ClassVar[str] = "train_autoencoder"
    recipe_path: ClassVar[str] = "model.train"
    base_keys: ClassVar[tuple[str, ...]] = ("preset", "resume_run")
    extra_flags: ClassVar[tuple[Flag, ...]] = (
        Flag("--preset", "preset", f"model preset (default: {DEFAULT_PRESET})", choices=sorted(PRESETS)),
        Flag("--image-size", "model.unet.image_size", "override the preset's image size", type=int),
        Flag("--prediction", "model.diffusion.prediction",
             "what the decoder predicts: eps (official presets) or v (demo16; learns z_sem faster)", choices=PREDICTIONS),
        Flag("--resume", "resume_run", "continue the stopped run STORAGE/RUN with its saved settings "
             "(flags given now override them, e.g. --max-samples)", metavar="RUN"),
    )

    data: str = option(help="images: folder | parquet | s3:// URI | shapes[:N] | fashion-mnist[:t10k] | digits",
                       path=source_uri)
    model: ModelConfig = option(default_factory=lambda: get_preset(DEFAULT_PRESET), cli=False,
                                help="the model and its recipe (a preset, then --config's `model` mapping)")
    precision: str = option("auto", choices=("auto", *cluster.PRECISIONS),
                            help="auto: bf16 (or fp16) autocast on GPU, fp32 on CPU")
    channels_last: bool | None = option(None, help="NHWC weights and activations (default: diffae_core.performance's: "
                                        "on for CUDA, on for CPU from 32 px)")
    tf32: bool | None = option(None, help="TF32 matmuls and convolutions on CUDA (default: on for CUDA)")
    fused_optimizer: bool | None = option(None, help="fused Adam/AdamW kernel instead of foreach (default: on)")
    compile: bool | None = option(None, help="torch.compile the encoder and the UNet (default: off)")
    heap_reuse: bool | None = option(None, help="glibc keeps freed feature maps in the heap instead of unmapping "
                                     "them, saving a page fault per page per step (default: on for CPU)")
    grid_every: int = option(20_000, help="samples between PNG grids (official sample_every_samples)")
    crop: str = option("center", choices=CROPS, help="'celeba-d2c': the official CelebA crop")
    flip: bool = option(True, help="random horizontal flip")
    holdout: float = option(0.0, help="leave out this fraction of images (by id hash) for evaluation")
    shuffle_buffer: int = option(0, help="rows per worker's local shuffle buffer (0 = 4 local batches)")
    grid_images: int = option(8, help="images per grid row")
    grid_steps: int = option(20, help="DDIM steps for the grids' inversion and decoding")
    resume: bool = option(False, cli=False, help="continue the run storage/name (set by --resume RUN)")
    ledger_dir: str | None = option(None, cli=False, path=True,
                                    help="audit: each rank appends one JSON line per step (ids, samples) here")
    fault_injection_step: int = option(0, cli=False, help="test only: the last rank exits at this step")

    @classmethod
    def base(cls, given: dict[str, Any]) -> dict[str, Any]:
        """A preset's model and recipe, or with --resume the saved settings of that run."""
        run = given.get("resume_run")
        if run:
            root = given.get("storage", "runs")
            saved = storage.read_json(storage.join(root, run, "config.json"), storage.s3_endpoint(given.get("s3_endpoint")))
            return {**saved["config"], "storage": root, "name": run, "resume": True}
        return {"model": get_preset(given.get("preset") or DEFAULT_PRESET).to_dict()}

    def validate(self) -> None:
        low, high = cluster.worker_range(self.num_workers)
        recipe = self.model.train
        if recipe.batch_size < high or recipe.total_samples < 1:
            raise ValueError(f"the global batch ({recipe.batch_size}) must be at least the number of workers "
                             f"({high}) and the sample budget positive ({recipe.total_samples})")
        if self.precision not in ("auto", *cluster.PRECISIONS):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")
        Schedule(recipe.total_samples, recipe.batch_size, self.checkpoint_every, self.log_every, self.grid_every)


@dataclass
class TrainResult:
    run_dir: str
    bundle: str
    metrics: dict[str, Any]  # the last metrics rank 0 reported (step, samples_seen, loss, samples_per_second, ...)
    summary: dict[str, Any]  # what summary.json holds
    checkpoint: str | None  # path of the latest checkpoint inside its storage filesystem


# ---- inside each Ray Train worker --------------------------------------------------------------
def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--precision`` on ``device`` (None: fp32)."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    dtype = cluster.PRECISIONS[precision]
    if dtype is torch.float16 and device.type != "cuda":
        raise ValueError("fp16 training needs a GPU; use --precision fp32 or bf16 on CPU")
    return dtype


class _Loss(torch.nn.Module):
    """DiffAE.training_loss as a module's forward, so DDP's gradient hooks see the call."""

    def __init__(self, model: DiffAE):
        super().__init__()
        self.model = model

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        return self.model.training_loss(x0)


class AutoencoderTask(TrainTask):
    """The autoencoder's side of the shared loop: a Ray Data shard, DiffAE's loss, grids and the bundle."""

    def __init__(self, job: TrainJobConfig, ctx: LoopContext, skips: Any) -> None:
        self.job, self.ctx, self.skips = job, ctx, skips
        recipe = job.model.train
        self.dtype = autocast_dtype(job.precision, ctx.device)
        torch.manual_seed(recipe.seed)  # identical initial weights on every rank
        speed = speed_options(job, ctx.device, job.model.image_size)
        self.model = apply(DiffAE(job.model).to(ctx.device).train(), speed.replace(compile=False))
        self.opt = Optimization(self.model, recipe, fp16=self.dtype is torch.float16,
                                optimizer_options=optimizer_kwargs(speed))
        if speed.compile:  # after the EMA's deepcopy: a copy of a compiled module would run the original's weights
            apply(self.model, PerformanceOptions(compile=True))
        self.loss = ctx.prepare(_Loss(self.model))
        self.start, self.stream = Position(), None
        self.grid_images: torch.Tensor | None = None

    def _stream(self) -> ShardStream:
        if self.stream is None:  # after restore(): the checkpoint says where to start
            import ray.train

            local = -(-self.job.model.train.batch_size // self.ctx.world)
            self.stream = ShardStream(ray.train.get_dataset_shard("train"), self.ctx, self.job.model.train.seed,
                                      local, self.job.shuffle_buffer or 4 * local, self.start)
        return self.stream

    def step(self, n: int, weight: float, step: int) -> StepOutput:
        x, ids, epochs = self._stream().take(n)
        if x is None:  # no rows for this rank on a short last step: a zero-weight stand-in joins DDP's all-reduce
            size = self.job.model.image_size
            x, weight = torch.zeros(1, 3, size, size), 0.0
        elif self.grid_images is None:
            self.grid_images = x[: self.job.grid_images].clone()
        torch.manual_seed(derived_seed(self.job.model.train.seed, self.ctx.rank, step))  # t, noise, dropout
        with torch.autocast(self.ctx.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            loss = self.loss(x.to(self.ctx.device, non_blocking=True))
        self.opt.step(loss * weight, step)
        return StepOutput(loss.detach().float(), ids, epochs)

    def state_dict(self) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "model": self.model.state_dict(), **self.opt.state_dict(),
                "grid_images": self.grid_images}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state)
        self.grid_images = state["grid_images"].cpu() if state.get("grid_images") is not None else None

    def local_state(self) -> dict[str, int]:
        return dataclasses.asdict(self.stream.position if self.stream is not None else self.start)

    def load_local_states(self, states: Sequence[Any], rank: int, world: int) -> None:
        self.start = Position(**states[rank]) if len(states) == world else reshard(states, world)

    def on_report(self, metrics: dict[str, Any], grid: bool) -> None:
        metrics["epoch"] = self.stream.position.epoch
        metrics["skipped_images"] = self.skips.count()
        if grid and self.grid_images is not None and len(self.grid_images):
            uri = storage.join(self.job.run_dir, "grids", f"step-{metrics['step']:08d}.png")
            storage.write_bytes(uri, grid_png(self.opt.ema.shadow, self.grid_images, self.job.model.train.seed,
                                              self.job.grid_steps), self.job.s3_endpoint)

    def export(self) -> None:
        self.opt.ema.shadow.save(storage.join(self.job.run_dir, "bundle"), self.job.s3_endpoint)


def grid_png(model: DiffAE, images: torch.Tensor, seed: int, steps: int) -> bytes:
    """PNG rows: inputs [n,3,S,S], their reconstructions (DDIM inversion + decoding) and decodes of their
    z_sem from fixed noise."""
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)).to(model.device)
    x = images.to(model.device)
    z = model.encode(x)
    recon = model.decode(model.encode_stochastic(x, z, steps=steps), z, steps=steps)
    samples = model.decode(noise, z, steps=steps)
    buf = io.BytesIO()
    make_grid(torch.cat([x, recon, samples]).cpu(), nrow=len(images), upscale=max(1, 64 // images.shape[-1])).save(
        buf, format="PNG")
    return buf.getvalue()


def schedule(job: TrainJobConfig) -> Schedule:
    recipe = job.model.train
    return Schedule(recipe.total_samples, recipe.batch_size, job.checkpoint_every, job.log_every, job.grid_every,
                    config=job.to_dict(), ledger_dir=job.ledger_dir, fault_injection_step=job.fault_injection_step)


def _worker(config: dict[str, Any]) -> None:
    """Ray Train entry point of each worker."""
    job: TrainJobConfig = config["job"]
    ctx = RayTrainContext(job.name)
    run_loop(AutoencoderTask(job, ctx, config["skips"]), ctx, schedule(job), config["progress"])


# ---- on the driver -------------------------------------------------------------------------------
def _check_run_dir(job: TrainJobConfig) -> None:
    exists = storage.exists(storage.join(job.run_dir, "config.json"), job.s3_endpoint)
    if exists and not job.resume:
        raise FileExistsError(f"run {job.run_dir} already exists: continue it with --resume {job.name}, "
                              "or choose another --name")
    if job.resume and not exists:
        raise FileNotFoundError(f"no run to resume at {job.run_dir} (it has no config.json)")


def train_autoencoder(job: TrainJobConfig) -> TrainResult:
    """Run (or resume) a training job on the connected Ray cluster (connecting first if needed)."""
    job = job.named("autoencoder").prepared()
    cluster.connect()
    _check_run_dir(job)
    job.save_config(job.run_dir)
    recipe = job.model.train
    data = open_images(job.data, job.model.image_size, split="train", holdout=job.holdout, flip=job.flip,
                       crop=job.crop, s3_endpoint=job.s3_endpoint, seed=recipe.seed, shuffle_seed=recipe.seed)
    started = time.time()
    result = job.fit(_worker, {"job": job, "skips": data.skips}, {"train": data.dataset},
                     job.console("train", recipe.total_samples, recipe.batch_size, "img"))
    metrics = dict(result.metrics or {})
    summary = {
        "run_dir": job.run_dir, "bundle": storage.join(job.run_dir, "bundle"),
        "samples_seen": metrics.get("samples_seen"), "total_samples": recipe.total_samples,
        "steps": metrics.get("step"), "epochs": metrics.get("epoch"), "loss": metrics.get("loss"),
        "images_per_second": metrics.get("samples_per_second"), "num_workers": job.num_workers,
        "seconds": round(time.time() - started, 1), **data.skips.job_summary(),
    }
    storage.write_json(storage.join(job.run_dir, "summary.json"), summary, job.s3_endpoint)
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    return TrainResult(job.run_dir, summary["bundle"], metrics, summary, checkpoint)


def _run(job: TrainJobConfig) -> dict[str, Any]:
    result = train_autoencoder(job)
    s = result.summary
    print(f"trained {s['samples_seen']} samples in {s['steps']} steps ({s['seconds']} s); skipped "
          f"{s['skipped_images']} unreadable image(s); bundle: {result.bundle}", flush=True)
    return s


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    return jobkit.run_cli(TrainJobConfig, argv, prog, _run, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main(prog="python -m pipelines.train_autoencoder"))
