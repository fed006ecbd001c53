"""Train the latent DPM on normalised z_sem with Ray Train (DDP) and add it to a bundle.

    python -m pipelines.train_latent --bundle BUNDLE --latents LATENTS_DIR [--out BUNDLE2] [--storage RUNS]

The official recipe (templates_latent.py): an MLP skip-net predicting epsilon of a T=1000 process with
constant betas 0.008 and an L1 loss (``config.latent_diffusion``), on z = (z_sem - mean) / std with the
statistics from ``diffae infer-latents``; AdamW lr 1e-4 wd 0.01 for the FFHQ/CelebA presets, Adam for LSUN
(``config.latent_train``, the default recipe here); EMA 0.9999; gradient clipping 1.0. Only the latent MLP
is built and optimised: the autoencoder never enters the workers.

Each worker loads its shard of the latents once into memory (they are small: 70k x 512 floats = 140 MB)
and draws shuffled batches epoch by epoch, as the official DataLoader over ``conds`` does; the shared loop
(pipelines.training) checkpoints to ``STORAGE/NAME`` and resumes after a failure, or when the same
command runs again with the same ``--name``.

The EMA weights and the statistics are added to the bundle: in place by default, or into ``--out`` (a new
bundle directory, or an existing one that already holds this autoencoder, e.g. with a classifier).
``DiffAE.load(bundle).sample(n)`` then generates unconditionally.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from diffae_core import storage
from diffae_core.bundle import read_config
from diffae_core.config import DiffusionConfig, LatentConfig, TrainConfig
from diffae_core.diffusion import GaussianDiffusion
from diffae_core.latent import LatentMLP

from . import jobkit, training
from .jobkit import option
from .latents import Z_COLUMN, attach_to_bundle, check_same_autoencoder, read_latents, read_stats
from .streams import EpochSampler


@dataclass(kw_only=True)
class LatentTrainJob(training.TrainerJob):
    """Train the latent DPM on z_sem with Ray Train and add it to a bundle."""

    job_name: ClassVar[str] = "train-latent"
    recipe_path: ClassVar[str] = "train"

    bundle: str = option(help="the autoencoder bundle (path or s3://) the latents came from", path=True)
    latents: str = option(help="output directory of `diffae infer-latents`", path=True)
    out: str | None = option(None, path=True, help="bundle to write (default: add the latent DPM to --bundle in place)")
    train: TrainConfig = option(default_factory=TrainConfig, cli=False, help="the recipe (default: the bundle's)")
    checkpoint_every: int = option(5_000_000, help="samples between checkpoints (the last step always checkpoints)")
    log_every: int = option(100, help="steps between progress updates and reported metrics")

    @classmethod
    def base(cls, given: dict[str, Any]) -> dict[str, Any]:
        """The bundle's own latent recipe (``config.latent_train``)."""
        if "bundle" not in given:
            return {}
        config = read_config(given["bundle"], storage.s3_endpoint(given.get("s3_endpoint")))
        return {"train": dataclasses.asdict(config.latent_train)}

    def validate(self) -> None:
        training.Schedule(self.train.total_samples, self.train.batch_size, self.checkpoint_every, self.log_every)


@dataclass
class LatentTrainResult:
    bundle: str  # the bundle written
    run_dir: str
    steps: int
    samples: int
    history: list[tuple[int, float]]  # (step, mean loss over the preceding report window, all ranks)


# ---- inside each Ray Train worker --------------------------------------------------------------
class LatentTask(training.TrainTask):
    """The latent DPM's side of the shared loop: an in-memory shard of normalised z, the diffusion loss."""

    def __init__(self, config: dict[str, Any], ctx: training.LoopContext) -> None:
        import ray.train

        self.ctx, recipe = ctx, TrainConfig(**config["train"])
        torch.manual_seed(recipe.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
        self.model = LatentMLP(LatentConfig(**config["latent"])).to(ctx.device)
        self.opt = training.Optimization(self.model, recipe)
        self.net = ctx.prepare(self.model)
        self.diffusion = GaussianDiffusion(DiffusionConfig(**config["diffusion"]))
        chunks = [b[Z_COLUMN] for b in ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=8192, dtypes=torch.float32, device="cpu")]
        if not chunks:
            raise RuntimeError("this worker's shard of the latents is empty: use fewer workers than latent rows")
        self.z = ((torch.cat(chunks) - config["mean"]) / config["std"]).to(ctx.device)
        self.gen = torch.Generator(device=ctx.device).manual_seed(recipe.seed * 1009 + ctx.rank + 1)
        self.sampler = EpochSampler(self.z.shape[0], self.gen)
        self.history: list[tuple[int, float]] = []

    def step(self, n: int, weight: float, step: int) -> training.StepOutput:
        z0 = self.z[self.sampler.next(n)] if n else torch.zeros(1, self.z.shape[1], device=self.ctx.device)
        weight = weight if n else 0.0  # a zero-weight stand-in joins DDP's all-reduce on a short last step
        t = torch.randint(0, self.diffusion.T, (z0.shape[0],), device=self.ctx.device, generator=self.gen)
        noise = torch.randn(z0.shape, device=self.ctx.device, generator=self.gen)
        loss = self.diffusion.training_loss(lambda z_t, tt: self.net(z_t, tt), z0, t, noise).mean()
        self.opt.step(loss * weight, step)
        return training.StepOutput(loss.detach())

    def state_dict(self) -> dict[str, Any]:
        return {"net": self.model.state_dict(), **self.opt.state_dict(), "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["net"])
        self.opt.load_state_dict(state)
        self.history = [tuple(h) for h in state["history"]]

    def local_state(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_local_states(self, states: Sequence[Any], rank: int, world: int) -> None:
        # each rank continues its own stream when the world size and its shard are unchanged
        if len(states) == world and states[rank]["perm"].numel() in (0, self.z.shape[0]):
            self.sampler.load_state_dict(states[rank])

    def on_report(self, metrics: dict[str, Any], grid: bool) -> None:
        self.history.append((metrics["step"], metrics["loss"]))
        metrics["epoch"] = self.sampler.epoch


def _worker(config: dict[str, Any]) -> None:
    ctx = training.RayTrainContext(config["name"])
    training.run_loop(LatentTask(config, ctx), ctx, training.Schedule(**config["schedule"]), config["progress"])


# ---- on the driver -------------------------------------------------------------------------------
def train_latent(job: LatentTrainJob) -> LatentTrainResult:
    """Run the Ray Train job and add the EMA latent net + z statistics to the bundle (see module doc)."""
    job = job.named("train-latent").prepared()
    stats = read_stats(job.latents, job.s3_endpoint)
    config = read_config(job.bundle, job.s3_endpoint)
    latent_cfg = config.latent or LatentConfig(num_channels=config.z_dim)
    if latent_cfg.num_channels != stats.mean.numel():
        raise ValueError(f"the latent net takes {latent_cfg.num_channels}-d z but the latents are {stats.mean.numel()}-d")
    sha = check_same_autoencoder(job.bundle, job.latents, job.s3_endpoint)
    job.save_config(job.run_dir)
    train = job.train
    schedule = {"total_samples": train.total_samples, "batch_size": train.batch_size,
                "checkpoint_every": job.checkpoint_every, "log_every": job.log_every, "config": job.to_dict()}
    loop_config = {"name": job.name, "schedule": schedule, "train": dataclasses.asdict(train),
                   "latent": dataclasses.asdict(latent_cfg), "diffusion": dataclasses.asdict(config.latent_diffusion),
                   "mean": stats.mean, "std": stats.std}
    result = job.fit(_worker, loop_config, {"train": read_latents(job.latents, [Z_COLUMN], job.s3_endpoint)},
                     job.console("train-latent", train.total_samples, train.batch_size, "latent"))
    if result.checkpoint is None:
        raise RuntimeError(f"the latent run {job.run_dir} ended without a checkpoint")
    state = training.load_checkpoint(result.checkpoint)

    def attach(model: Any) -> None:
        model.config.latent = latent_cfg
        model.attach_latent(state["ema"]["shadow"], stats.mean, stats.std)

    written = attach_to_bundle(job.bundle, job.out, attach, expected_autoencoder=sha, endpoint=job.s3_endpoint)
    steps = int(state["step"])
    history = [(int(s), float(v)) for s, v in state["history"]]
    summary = {"bundle": written, "steps": steps, "samples": int(state["samples_seen"]), "history": history}
    storage.write_json(storage.join(job.run_dir, "summary.json"), summary, job.s3_endpoint)
    return LatentTrainResult(bundle=written, run_dir=job.run_dir, steps=steps, samples=summary["samples"],
                             history=history)


def _run(job: LatentTrainJob) -> dict[str, Any]:
    result = train_latent(job)
    return {"bundle": result.bundle, "run": result.run_dir, "steps": result.steps, "samples": result.samples,
            "final_loss": result.history[-1][1] if result.history else None}


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    return jobkit.run_cli(LatentTrainJob, argv, prog, _run)


if __name__ == "__main__":
    raise SystemExit(main(prog="python -m pipelines.train_latent"))
