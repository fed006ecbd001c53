"""The per-worker training loop of ``train_autoencoder`` (runs inside each Ray Train worker).

Sample accounting: the global batch B is split evenly over W workers (B and the sample budget must
be multiples of W), step s trains on ``min(B, total - s*B)`` samples, so a run ends at exactly
``total_samples``. Each worker reads its shard as one endless stream of epochs: an epoch that ends
mid-batch is continued by the next one, so every batch is full. Because every worker receives the same
number of rows per epoch (Ray Train's equal split) and consumes the same number per step, all
workers cross epoch boundaries in the same step, which is what Ray Data's epoch barrier needs.

Determinism and resumption: the global RNG is re-seeded from (seed, rank, step) before every step and
the local shuffle from (seed, epoch, rank), so a resumed run draws the same timesteps, noise, dropout
and shuffle as an uninterrupted one. Checkpoints hold model, EMA, optimizer (and fp16 scaler) state,
step, samples seen, every worker's (epoch, rows consumed in that epoch) and the resolved config; on
restore each worker skips the rows its shard already delivered in the interrupted epoch.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from diffae_core import DiffAE
from diffae_core.ema import EMA
from diffae_core.images import make_grid

from . import runtime, storage

if TYPE_CHECKING:
    from .train_autoencoder import TrainJobConfig

STATE_FILE = "state.pt"
CHECKPOINT_FORMAT = "diffae-ray-autoencoder-checkpoint"


def _progress_bar(total: int, done: int, name: str):
    """A progress bar in images for rank 0, drawn on the driver (``ray.experimental.tqdm_ray``)."""
    from ray.experimental import tqdm_ray

    bar = tqdm_ray.tqdm(total=total, desc=f"train {name}", unit="img")
    if done:
        bar.update(done)  # a resumed run starts where its checkpoint left off
    return bar


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


class _Collate(NumpyBatchCollateFn):
    """numpy batch -> (images [n,3,S,S] float32 CPU tensor, ids). Ids are strings, which torch cannot hold."""

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, list[str]]:
        return torch.from_numpy(np.ascontiguousarray(batch["image"], dtype=np.float32)), [str(i) for i in batch["id"]]


class ShardStream:
    """A worker's data shard as an endless stream of rows, cut into batches of any size.

    position = (epoch, rows of that epoch already taken). Epoch e is shuffled with a local buffer seeded
    from (seed, e, rank); ``skip`` rows are discarded when a resumed worker re-enters epoch ``epoch``.
    """

    def __init__(self, shard: Any, epoch: int, offset: int, seed: int, rank: int, batch_rows: int,
                 shuffle_buffer: int):
        self.shard, self.seed, self.rank = shard, seed, rank
        self.batch_rows = batch_rows
        self.shuffle_buffer = max(shuffle_buffer, batch_rows)
        self.epoch, self.offset = epoch, 0
        self._skip = offset
        self._iter: Any = None
        self._epoch_rows = 0  # rows the current epoch's iterator has delivered so far
        self._pending: tuple[torch.Tensor, list[str]] | None = None  # rows delivered but not yet taken

    def _next_chunk(self) -> tuple[torch.Tensor, list[str]] | None:
        if self._iter is None:
            self._iter = iter(self.shard.iter_torch_batches(
                batch_size=self.batch_rows, collate_fn=_Collate(), drop_last=False, prefetch_batches=2,
                local_shuffle_buffer_size=self.shuffle_buffer,
                local_shuffle_seed=_seed(self.seed, self.epoch, self.rank) % (2**31),
            ))
        return next(self._iter, None)

    def take(self, n: int) -> tuple[torch.Tensor, list[str], list[int]]:
        """The next n rows: (images [n,3,S,S] float32 in [-1,1], ids, epoch of each row)."""
        parts, ids, epochs = [], [], []
        while len(ids) < n:
            if self._pending is not None:
                (x, chunk_ids), self._pending = self._pending, None
            else:
                chunk = self._next_chunk()
                if chunk is None:  # the epoch is exhausted: the next one continues the batch
                    if self._epoch_rows == 0:
                        raise RuntimeError(
                            f"worker {self.rank} received no images in epoch {self.epoch}: the data set is empty, "
                            "smaller than the number of workers, or every image was skipped as unreadable"
                        )
                    self.epoch, self.offset, self._iter, self._epoch_rows, self._skip = self.epoch + 1, 0, None, 0, 0
                    continue
                x, chunk_ids = chunk
                self._epoch_rows += len(chunk_ids)
                if self._skip:  # resumed mid-epoch: drop the rows this epoch delivered before the restart
                    drop = min(self._skip, len(chunk_ids))
                    self._skip -= drop
                    self.offset += drop
                    x, chunk_ids = x[drop:], chunk_ids[drop:]
            use = min(n - len(ids), len(chunk_ids))
            if use < len(chunk_ids):
                self._pending = (x[use:], chunk_ids[use:])
            parts.append(x[:use])
            ids.extend(chunk_ids[:use])
            epochs.extend([self.epoch] * use)
            self.offset += use
        return torch.cat(parts), ids, epochs


class _Loss(torch.nn.Module):
    """DiffAE.training_loss as a module's forward, so DDP's gradient hooks see the call."""

    def __init__(self, model: DiffAE):
        super().__init__()
        self.model = model

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        return self.model.training_loss(x0)


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    dtype = runtime.PRECISIONS[precision]
    if dtype is torch.float16 and device.type != "cuda":
        raise ValueError("fp16 training needs a GPU; use --precision fp32 or bf16 on CPU")
    return dtype


def _gather_positions(stream: ShardStream, world: int, device: torch.device) -> torch.Tensor:
    """[W, 2] int64 (epoch, rows taken in it) of every worker; a collective every rank must join."""
    mine = torch.tensor([[stream.epoch, stream.offset]], dtype=torch.int64, device=device)
    if world == 1:
        return mine.cpu()
    out = [torch.zeros_like(mine) for _ in range(world)]
    torch.distributed.all_gather(out, mine)
    return torch.cat(out).cpu()


def _resume_position(positions: torch.Tensor, rank: int, world: int) -> tuple[int, int]:
    """This worker's (epoch, offset); with a different worker count the rows are shared out evenly."""
    if positions.shape[0] == world:
        return int(positions[rank, 0]), int(positions[rank, 1])
    epoch = int(positions[:, 0].min())
    taken = int(positions[positions[:, 0] == epoch, 1].sum())
    return epoch, taken // world


def _write_grid(ema_model: DiffAE, images: torch.Tensor, seed: int, steps: int, uri: str, endpoint: str | None) -> None:
    """PNG: inputs, EMA reconstructions (DDIM inversion + decoding), decodes of their z_sem from fixed noise."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=g).to(ema_model.device)
    x = images.to(ema_model.device)
    z = ema_model.encode(x)
    recon = ema_model.decode(ema_model.encode_stochastic(x, z, steps=steps), z, steps=steps)
    samples = ema_model.decode(noise, z, steps=steps)
    grid = make_grid(torch.cat([x, recon, samples]).cpu(), nrow=len(images), upscale=max(1, 64 // images.shape[-1]))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    runtime.write_bytes(uri, buf.getvalue(), endpoint)


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point. loop_config: job (TrainJobConfig), run_dir (URI), endpoint, skips."""
    import ray.train
    import ray.train.torch
    from ray.util.metrics import Counter, Gauge

    job: TrainJobConfig = loop_config["job"]
    run_dir, endpoint = loop_config["run_dir"], loop_config["endpoint"]
    if endpoint:  # so DiffAE.save and diffae_core.storage in this worker reach the driver's S3 endpoint
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    recipe = job.model.train
    total, batch = recipe.total_samples, recipe.batch_size
    local_batch = batch // world
    dtype = _autocast_dtype(job.precision, device)

    torch.manual_seed(recipe.seed)  # identical initial weights on every rank
    model = DiffAE(job.model).to(device).train()
    ema = EMA(model, recipe.ema_decay, recipe.ema_warmup_steps)  # after .to(device): EMA keeps tensor pairs
    optimizer = runtime.build_optimizer(list(model.parameters()), recipe)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    step, samples, epoch, offset, fixed = 0, 0, 0, 0, None

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        step, samples, fixed = int(state["step"]), int(state["samples_seen"]), state["grid_images"].cpu()
        epoch, offset = _resume_position(state["positions"], rank, world)
        if rank == 0:
            print(f"[train] resumed from step {step} ({samples}/{total} samples, epoch {epoch})", flush=True)
    start_step = step
    loss_module = ray.train.torch.prepare_model(_Loss(model))  # DDP (gloo on CPU, nccl on GPU) when world > 1
    stream = ShardStream(ray.train.get_dataset_shard("train"), epoch, offset, recipe.seed, rank, local_batch,
                         job.shuffle_buffer or 4 * local_batch)

    metrics_on = rank == 0
    if metrics_on:
        tags = {"run": job.name}
        gauge_loss = Gauge("diffae_train_loss", "mean training loss over the last report window", ("run",))
        gauge_ips = Gauge("diffae_train_images_per_second", "training throughput, all workers", ("run",))
        counter = Counter("diffae_train_samples_total", "training samples consumed", ("run",))
        for m in (gauge_loss, gauge_ips, counter):
            m.set_default_tags(tags)
    ledger = None
    if job.ledger_dir:
        Path(job.ledger_dir).mkdir(parents=True, exist_ok=True)
        ledger = open(Path(job.ledger_dir) / f"rank{rank}.jsonl", "a")  # noqa: SIM115 (closed at the end)

    # rank 0's bar is drawn by the driver's console (Ray forwards it); log lines stay for checkpoints
    bar = _progress_bar(total, samples, job.name) if rank == 0 and job.progress_bar else None
    loss_sum = torch.zeros((), device=device)
    window_samples, window_steps, window_start = 0, 0, time.perf_counter()
    while samples < total:
        global_n = min(batch, total - samples)
        n = global_n // world
        x, ids, epochs = stream.take(n)
        if fixed is None:
            fixed = x[: job.grid_images].clone()
        x = x.to(device, non_blocking=True)
        torch.manual_seed(_seed(recipe.seed, rank, step))  # t, noise, dropout: reproducible after a resume
        if recipe.warmup_steps > 0:
            for group in optimizer.param_groups:
                group["lr"] = recipe.lr * min(1.0, (step + 1) / recipe.warmup_steps)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_module(x)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if recipe.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        ema.update()
        loss_sum += loss.detach().float()
        window_steps += 1
        step, prev_samples = step + 1, samples
        samples += global_n
        window_samples += global_n
        if ledger is not None:
            ledger.write(json.dumps({"attempt_start": start_step, "step": step, "rank": rank, "n": n,
                                     "samples": samples, "loss": float(loss), "ids": ids, "epochs": epochs}) + "\n")
            ledger.flush()
        if job.fault_injection_step and checkpoint is None and step == job.fault_injection_step and rank == world - 1:
            print(f"[train] fault injection: worker {rank} exits at step {step}", flush=True)
            os._exit(1)

        final = samples >= total
        save = final or samples // job.checkpoint_every > prev_samples // job.checkpoint_every
        grid = final or samples // job.grid_every > prev_samples // job.grid_every
        if not (save or grid or step % job.log_every == 0):
            continue
        # Every rank takes this branch at the same step: the collectives and report() below line up.
        if world > 1:
            torch.distributed.all_reduce(loss_sum)
        # Ranks hold equal sample counts, so the mean of their batch means is the global batch mean.
        last_loss = float(loss_sum) / world / window_steps
        elapsed = time.perf_counter() - window_start
        ips = window_samples / max(elapsed, 1e-9)
        metrics = {"step": step, "samples_seen": samples, "total_samples": total, "epoch": stream.epoch,
                   "loss": last_loss, "images_per_second": ips}
        positions = _gather_positions(stream, world, device) if save else None
        if metrics_on:
            gauge_loss.set(last_loss)
            gauge_ips.set(ips)
            counter.inc(window_samples)
            metrics["skipped_images"] = loop_config["skips"].count()
            if bar is not None:
                bar.set_description(f"train loss {last_loss:.4f} {ips:.1f} img/s")
                bar.update(window_samples)
            if bar is None or save:
                print(f"[train] step {step}/{-(-total // batch)} samples {samples}/{total} "
                      f"({100 * samples / total:.1f}%) loss {last_loss:.4f} {ips:.1f} img/s epoch {stream.epoch}",
                      flush=True)
            if grid and fixed is not None and len(fixed):
                _write_grid(ema.shadow, fixed, recipe.seed, job.grid_steps,
                            storage.uri_join(run_dir, "grids", f"step-{step:08d}.png"), endpoint)
        if save and rank == 0:
            with tempfile.TemporaryDirectory() as d:
                torch.save({
                    "format": CHECKPOINT_FORMAT, "model": model.state_dict(), "ema": ema.state_dict(),
                    "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                    "step": step, "samples_seen": samples, "positions": positions, "grid_images": fixed,
                    "config": json.dumps(loop_config["resolved_config"]),
                }, Path(d) / STATE_FILE)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                                 checkpoint_dir_name=f"checkpoint-step{step:08d}")
        else:
            ray.train.report(metrics)
        loss_sum.zero_()
        window_samples, window_steps, window_start = 0, 0, time.perf_counter()

    if bar is not None:
        bar.close()
    if ledger is not None:
        digest = torch.cat([p.detach().flatten().cpu() for p in model.parameters()]).numpy().tobytes()
        ledger.write(json.dumps({"final": True, "rank": rank, "step": step, "samples": samples,
                                 "param_digest": hashlib.sha256(digest).hexdigest()}) + "\n")
        ledger.close()
    if rank == 0:
        ema.shadow.save(storage.uri_join(run_dir, "bundle"))
        print(f"[train] done: {samples} samples in {step} steps; bundle at {storage.uri_join(run_dir, 'bundle')}",
              flush=True)
