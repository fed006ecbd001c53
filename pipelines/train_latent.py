"""Train the latent DPM on normalised z_sem with Ray Train (DDP) and add it to a bundle.

    python -m pipelines.train_latent --bundle BUNDLE --latents LATENTS_DIR [--out BUNDLE2] [--storage RUNS]

The official recipe (templates_latent.py): an MLP skip-net predicting epsilon of a T=1000 process with
constant betas 0.008 and an L1 loss (``config.latent_diffusion``), on z = (z_sem - mean) / std with the
statistics from ``diffae infer-latents``; AdamW lr 1e-4 wd 0.01 for the FFHQ/CelebA presets, Adam for LSUN
(``config.latent_train``); EMA 0.9999; gradient clipping 1.0. Only the latent MLP is built and optimised:
the autoencoder never enters the workers.

Each worker loads its shard of the latents once into memory (they are small: 70k x 512 floats = 140 MB)
and draws shuffled batches epoch by epoch, as the official DataLoader over ``conds`` does. Rank 0
checkpoints every ``--checkpoint-every`` samples to ``STORAGE/NAME`` (local or s3://); a restarted worker
group, or the same command run again with the same ``--name``, resumes from the latest checkpoint.

The EMA weights and the statistics are added to the bundle: in place by default, or into ``--out`` (a new
bundle directory, or an existing one that already holds this autoencoder, e.g. with a classifier).
``DiffAE.load(bundle).sample(n)`` then generates unconditionally.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffae_core.config import DiffusionConfig, LatentConfig, TrainConfig
from diffae_core.diffusion import GaussianDiffusion
from diffae_core.ema import EMA
from diffae_core.latent import LatentMLP

from . import runtime, storage
from .infer_latents import Z_COLUMN, autoencoder_sha256, read_latents, read_stats

STATE_FILE = "state.pt"


@dataclass
class LatentTrainJob:
    """Everything a latent-DPM run needs; saved as the run's resolved config."""

    bundle: str  # the autoencoder bundle the latents came from
    latents: str  # output directory of `diffae infer-latents`
    storage: str  # runs root (path or s3://); the run lives in storage/name
    name: str
    out: str | None = None  # bundle to write; None = add the latent DPM to `bundle` in place
    train: TrainConfig = field(default_factory=TrainConfig)
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    checkpoint_every: int = 5_000_000  # samples between checkpoints (the last step always checkpoints)
    log_every: int = 100  # steps between progress lines / reported metrics
    max_failures: int = 3
    endpoint: str | None = None

    @property
    def run_dir(self) -> str:
        return storage.uri_join(self.storage, self.name)


@dataclass
class LatentTrainResult:
    bundle: str  # the bundle written
    run_dir: str
    steps: int
    samples: int
    history: list[tuple[int, float]]  # (step, mean loss over the preceding log window, all ranks)


def _load_shard(mean: torch.Tensor, std: torch.Tensor, device: torch.device) -> torch.Tensor:
    """This worker's latents, normalised: [N_w, Z] float32 on ``device``."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    chunks = [b[Z_COLUMN] for b in shard.iter_torch_batches(batch_size=8192, dtypes=torch.float32, device="cpu")]
    if not chunks:
        raise RuntimeError("this worker's shard of the latents is empty: use fewer workers than latent rows")
    z = torch.cat(chunks).to(device)
    return (z - mean.to(device)) / std.to(device)


def _train_loop(cfg: dict) -> list[tuple[int, float]]:
    """Ray Train worker: DDP training of the latent MLP. Returns the loss history (rank 0's is kept)."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    train = TrainConfig(**cfg["train"])
    device = ray.train.torch.get_device()
    torch.manual_seed(train.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    net = LatentMLP(LatentConfig(**cfg["latent"])).to(device)
    ema = EMA(net, decay=train.ema_decay, warmup_steps=train.ema_warmup_steps)
    optimizer = runtime.build_optimizer(list(net.parameters()), train)
    diffusion = GaussianDiffusion(DiffusionConfig(**cfg["diffusion"]))
    z = _load_shard(cfg["mean"], cfg["std"], device)
    gen = torch.Generator(device=device).manual_seed(train.seed * 1009 + rank + 1)
    sampler = runtime.EpochSampler(z.shape[0], gen)
    step, history = 0, []

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=True)
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step, history = int(state["step"]), [tuple(h) for h in state["history"]]
        # each rank restores its own sampler stream when the world size is unchanged
        samplers = state["samplers"]
        if len(samplers) == world and samplers[rank]["perm"].numel() in (0, z.shape[0]):
            sampler.load_state_dict(samplers[rank])
        if rank == 0:
            print(f"[train-latent] resumed at step {step}", flush=True)

    model = ray.train.torch.prepare_model(net)  # DDP when world > 1
    per_worker = train.batch_size // world
    total_steps, ckpt_steps, log_every = cfg["total_steps"], cfg["checkpoint_steps"], cfg["log_every"]
    loss_sum = torch.zeros((), device=device)
    window, started = 0, time.time()
    while step < total_steps:
        z0 = z[sampler.next(per_worker)]
        t = torch.randint(0, diffusion.T, (per_worker,), device=device, generator=gen)
        noise = torch.randn(z0.shape, device=device, generator=gen)
        loss = diffusion.training_loss(lambda z_t, tt: model(z_t, tt), z0, t, noise).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), train.grad_clip)
        optimizer.step()
        ema.update()
        step += 1
        loss_sum += loss.detach()
        window += 1
        last = step == total_steps
        if step % log_every and step % ckpt_steps and not last:
            continue
        # the same condition holds on every rank, so all ranks reach report() together
        mean_loss = loss_sum / window
        if world > 1:
            dist.all_reduce(mean_loss)
            mean_loss /= world
        elapsed = time.time() - started
        metrics = {"step": step, "samples": step * train.batch_size, "loss": float(mean_loss),
                   "samples_per_second": window * train.batch_size / max(elapsed, 1e-9), "epoch": sampler.epoch}
        history.append((step, metrics["loss"]))
        if rank == 0:
            print(f"[train-latent] step {step}/{total_steps} samples {metrics['samples']} "
                  f"loss {metrics['loss']:.4f} {metrics['samples_per_second']:.0f} samples/s", flush=True)
        save = last or step % ckpt_steps == 0
        samplers = [None] * world
        if save and world > 1:
            dist.all_gather_object(samplers, sampler.state_dict())
        else:
            samplers = [sampler.state_dict()]
        if save and rank == 0:
            with tempfile.TemporaryDirectory() as d:
                torch.save({"net": net.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                            "step": step, "history": history, "samplers": samplers}, Path(d) / STATE_FILE)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)
        loss_sum.zero_()
        window, started = 0, time.time()
    return history


def load_state(checkpoint) -> dict:
    """The training state in a checkpoint written by this job (tensors only: weights_only=True)."""
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)


def train_latent(job: LatentTrainJob) -> LatentTrainResult:
    """Run the Ray Train job and add the EMA latent net + z statistics to the bundle (see module doc)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    job = dataclasses.replace(job, bundle=storage.absolute(job.bundle), latents=storage.absolute(job.latents),
                              storage=storage.absolute(job.storage), out=storage.absolute(job.out))
    train = job.train
    if train.batch_size % job.num_workers:
        raise ValueError(f"batch size {train.batch_size} is not divisible by {job.num_workers} workers")
    stats = read_stats(job.latents, job.endpoint)
    config = runtime.bundle_config(job.bundle, job.endpoint)
    latent_cfg = config.latent or LatentConfig(num_channels=config.z_dim)
    if latent_cfg.num_channels != stats.mean.numel():
        raise ValueError(f"the latent net takes {latent_cfg.num_channels}-d z but the latents are "
                         f"{stats.mean.numel()}-d")
    sha = autoencoder_sha256(job.bundle, job.endpoint)
    if stats.autoencoder_sha256 and stats.autoencoder_sha256 != sha:
        raise ValueError(f"{job.latents} was computed with another autoencoder than {job.bundle}'s; "
                         f"run `diffae infer-latents --bundle {job.bundle}` again")

    total_steps = math.ceil(train.total_samples / train.batch_size)
    loop_config = {
        "train": dataclasses.asdict(train),
        "latent": dataclasses.asdict(latent_cfg),
        "diffusion": dataclasses.asdict(config.latent_diffusion),
        "mean": stats.mean, "std": stats.std,
        "total_steps": total_steps,
        "checkpoint_steps": max(1, job.checkpoint_every // train.batch_size),
        "log_every": max(1, job.log_every),
    }
    runtime.save_run_config(job.run_dir, "train-latent", job, job.endpoint)
    storage_path, storage_fs = storage.ray_storage(job.storage, job.endpoint)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=job.num_workers, use_gpu=job.use_gpu,
                                               resources_per_worker={"CPU": job.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=job.name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=job.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": read_latents(job.latents, columns=[Z_COLUMN], endpoint=job.endpoint)},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"the latent run {job.run_dir} ended without a checkpoint")
    state = load_state(result.checkpoint)
    ema_weights = state["ema"]["shadow"]

    def attach(model) -> None:
        model.config.latent = latent_cfg
        model.attach_latent(ema_weights, stats.mean, stats.std)

    written = runtime.update_bundle(job.bundle, job.out, attach, expected_autoencoder=sha, endpoint=job.endpoint)
    history = [(int(s), float(v)) for s, v in state["history"]]
    runtime.write_json(storage.uri_join(job.run_dir, "summary.json"), {
        "bundle": written, "steps": int(state["step"]), "samples": int(state["step"]) * train.batch_size,
        "history": history,
    }, job.endpoint)
    return LatentTrainResult(bundle=written, run_dir=job.run_dir, steps=int(state["step"]),
                             samples=int(state["step"]) * train.batch_size, history=history)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bundle", required=True, help="the autoencoder bundle (path or s3://) the latents came from")
    p.add_argument("--latents", required=True, help="output directory of `diffae infer-latents`")
    p.add_argument("--out", help="bundle to write (default: add the latent DPM to --bundle in place)")
    p.add_argument("--storage", default="runs", help="runs root (path or s3://) for checkpoints and logs")
    p.add_argument("--name", help="run name under --storage (default: train-latent-<time>); reuse it to resume")
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (DDP)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker")
    p.add_argument("--checkpoint-every", type=int, default=5_000_000, help="samples between checkpoints")
    p.add_argument("--log-every", type=int, default=100, help="steps between progress lines")
    p.add_argument("--max-failures", type=int, default=3, help="worker-group restarts before giving up")
    runtime.add_train_flags(p)
    runtime.add_storage_flags(p)
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    endpoint = runtime.resolve_endpoint(args.s3_endpoint)
    runtime.ensure_ray()
    config = runtime.bundle_config(args.bundle, endpoint)
    train = runtime.resolve_train_config(config.latent_train, runtime.read_overrides(args.config, endpoint),
                                         **runtime.train_flags(args))
    job = LatentTrainJob(
        bundle=args.bundle, latents=args.latents, out=args.out, storage=args.storage,
        name=args.name or runtime.default_run_name("train-latent"), train=train, num_workers=args.num_workers,
        use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker, checkpoint_every=args.checkpoint_every,
        log_every=args.log_every, max_failures=args.max_failures, endpoint=endpoint,
    )
    result = train_latent(job)
    print(json.dumps({"bundle": result.bundle, "run": result.run_dir, "steps": result.steps,
                      "samples": result.samples, "final_loss": result.history[-1][1] if result.history else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
