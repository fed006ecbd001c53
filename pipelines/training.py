"""The training loop every trainer job shares: restore, step, report, checkpoint, export.

A job plugs in a :class:`TrainTask` (its networks, optimiser, data and loss) and :func:`run_loop` drives it,
inside a Ray Train worker (:class:`RayTrainContext`) or in-process for heads small enough to train on the
driver (:class:`LocalContext`).

Sample accounting. The global batch B is fixed whatever the world size W: step s trains on
``n_s = min(B, total - s*B)`` samples, split over the ranks by :func:`local_batch` (the ``n_s % W`` extra
samples go to consecutive ranks starting at rank ``s % W``, so over W steps every rank trains as many). Each
rank's loss is weighted by its share ``n_r * W / n_s``, so DDP's mean of the ranks' gradients is the gradient
of the global batch's mean loss. A run ends at exactly ``total_samples``, and the mean loss it reports is
the sample-weighted mean over every rank.

Checkpoints (rank 0, every ``checkpoint_every`` samples and at the end) hold the task's state, the step, the
samples seen and every rank's local state (its data position); every rank calls ``ray.train.report`` at the
same steps. After a failure each rank restores the latest checkpoint; the data position is re-sharded over
the new world size (:meth:`TrainTask.load_local_states`), the samples after the checkpoint are trained
again, and every planned sample is counted once.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffae_core.config import TrainConfig
from diffae_core.ema import EMA
from diffae_core.performance import OPTION_NAMES, PerformanceOptions

from . import cluster
from .jobkit import RunDir, option
from .ledger import Ledger
from .progress import ConsoleProgress, driver_progress

STATE_FILE = "state.pt"
CHECKPOINT_PREFIX = "checkpoint-step"


def derived_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (seed, rank, step, ...), the same on every machine."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def local_batch(global_n: int, world: int, rank: int, step: int) -> int:
    """Rank ``rank``'s share of a global batch of ``global_n`` samples at step ``step`` (they sum to global_n)."""
    base, extra = divmod(global_n, world)
    return base + (1 if (rank - step) % world < extra else 0)


def speed_options(job: Any, device: torch.device, image_size: int) -> PerformanceOptions:
    """The defaults for the device and image size (diffae_core.performance) overridden by the job's fields
    of the same names (``channels_last``, ``tf32``, ``fused_optimizer``, ``compile``) that are not None."""
    defaults = PerformanceOptions.for_device(device, image_size)
    return defaults.replace(**{name: getattr(job, name, None) for name in OPTION_NAMES})


# ---- the optimisation step ------------------------------------------------------------------------
class Optimization:
    """The update after a loss: optimiser (Adam/AdamW), fp16 grad scaling, gradient clipping, linear LR
    warm-up and the EMA of the weights, with one state dict for checkpoints."""

    def __init__(self, model: nn.Module, recipe: TrainConfig, fp16: bool = False, ema: bool = True,
                 optimizer_options: dict[str, Any] | None = None) -> None:
        if recipe.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be 'adam' or 'adamw', got {recipe.optimizer!r}")
        cls = torch.optim.AdamW if recipe.optimizer == "adamw" else torch.optim.Adam
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = cls(self.params, lr=recipe.lr, weight_decay=recipe.weight_decay, **(optimizer_options or {}))
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        self.ema = EMA(model, recipe.ema_decay, recipe.ema_warmup_steps) if ema else None
        self.recipe = recipe

    def step(self, loss: torch.Tensor, step: int) -> None:
        """Backward of ``loss`` and one update; ``step`` (0-based) drives the learning-rate warm-up."""
        recipe = self.recipe
        if recipe.warmup_steps > 0:
            for group in self.optimizer.param_groups:
                group["lr"] = recipe.lr * min(1.0, (step + 1) / recipe.warmup_steps)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if recipe.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, recipe.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


# ---- where the loop runs --------------------------------------------------------------------------
class LoopContext(ABC):
    """Rank, world, device, collectives and reporting of the process the loop runs in."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    node: str = "local"  # where this rank runs (a Ray node id), for the audit ledger

    def prepare(self, module: nn.Module) -> nn.Module:
        """``module`` ready for data-parallel training (DDP when world > 1)."""
        return module

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (a collective: every rank must call it)."""
        return [obj]

    def record(self, metrics: dict[str, Any], new_samples: int) -> None:
        """Rank 0: export the report's metrics (Prometheus, where there is an exporter); ``new_samples``
        were trained since the last report."""
        return None  # optional hook

    @abstractmethod
    def restore(self) -> dict[str, Any] | None:
        """The training state of the latest checkpoint, or None for a fresh start."""

    @abstractmethod
    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None, step: int) -> None:
        """Report ``metrics`` (every rank, same steps); rank 0 also hands over a checkpoint ``state``."""


class RayTrainContext(LoopContext):
    """Inside a Ray Train worker: DDP through ``ray.train.torch``, checkpoints through ``ray.train.report``."""

    def __init__(self, run: str) -> None:
        import ray
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.node = ray.get_runtime_context().get_node_id()
        self.run, self._metrics = run, None

    def record(self, metrics: dict[str, Any], new_samples: int) -> None:
        """``diffae_train_loss``, ``diffae_train_images_per_second`` and ``diffae_train_samples_total``,
        tagged with the run's name, on Ray's metrics port."""
        from ray.util.metrics import Counter, Gauge

        if self._metrics is None:
            self._metrics = (
                Gauge("diffae_train_loss", "mean training loss over the last report window", ("run",)),
                Gauge("diffae_train_images_per_second", "training throughput, all workers", ("run",)),
                Counter("diffae_train_samples_total", "training samples consumed", ("run",)),
            )
            for m in self._metrics:
                m.set_default_tags({"run": self.run})
        loss, rate, samples = self._metrics
        loss.set(metrics["loss"])
        rate.set(metrics["samples_per_second"])
        samples.inc(new_samples)

    def prepare(self, module: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(module)  # DDP (gloo on CPU, nccl on GPU) when world > 1

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def restore(self) -> dict[str, Any] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            return torch.load(Path(d) / STATE_FILE, map_location=self.device, weights_only=True)

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None, step: int) -> None:
        import ray.train

        if state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / STATE_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{step:08d}")


@dataclass
class LocalContext(LoopContext):
    """In this process (world 1): metrics are kept in ``history``; the last state is kept, not written."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    history: list[dict[str, Any]] = field(default_factory=list)
    last_state: dict[str, Any] | None = None

    def restore(self) -> dict[str, Any] | None:
        return None

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None, step: int) -> None:
        self.history.append(metrics)
        if state is not None:
            self.last_state = state


# ---- what a job plugs in ------------------------------------------------------------------------
@dataclass
class StepOutput:
    """One rank's step: its unweighted mean loss (detached scalar) and, for the audit ledger, the ids (and
    epochs) of the rows it trained on."""

    loss: torch.Tensor
    ids: Sequence[str] = ()
    epochs: Sequence[int] = ()


class TrainTask(ABC):
    """A job's side of the loop: it sets ``model`` (the network being trained; the audit ledger digests its
    parameters) and implements the steps below."""

    model: nn.Module

    @abstractmethod
    def step(self, n: int, weight: float, step: int) -> StepOutput:
        """Train on this rank's next ``n`` rows (n may be 0 on a short last step: still join the
        collectives) with the loss multiplied by ``weight`` before backward; ``step`` is 0-based."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """What rank 0 checkpoints (weights, EMA, optimiser, ...): tensors and plain values only, under keys
        other than the loop's own (step, samples_seen, ranks, config)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a checkpoint (the task's keys and the loop's)."""

    def local_state(self) -> Any:
        """This rank's own state (its data position), gathered from every rank into each checkpoint."""
        return None

    def load_local_states(self, states: Sequence[Any], rank: int, world: int) -> None:
        """Restore from every rank's saved local state; ``world`` may differ from ``len(states)``."""
        return None  # optional hook

    def on_report(self, metrics: dict[str, Any], grid: bool) -> None:
        """Rank 0, at each report: extra outputs such as image grids (``grid`` at grid boundaries)."""
        return None  # optional hook

    def export(self) -> None:
        """Rank 0, after the last step: write the run's result (e.g. the bundle)."""
        return None  # optional hook


@dataclass
class Schedule:
    """How long a run is and when it reports. Samples are global (all ranks)."""

    total_samples: int
    batch_size: int
    checkpoint_every: int
    log_every: int  # steps
    grid_every: int | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the resolved job config, stored in checkpoints
    ledger_dir: str | None = None  # audit (pipelines.ledger): one JSON line per step and rank goes here
    fault_injection_step: int = 0  # test only: the last rank exits at this step of a fresh start

    def __post_init__(self) -> None:
        for name in ("total_samples", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def total_steps(self) -> int:
        return -(-self.total_samples // self.batch_size)


class _Window:
    """Sample-weighted loss and throughput since the last report."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of loss x rows, rows) this rank
        self.samples, self.start = 0, time.perf_counter()

    def add(self, out: StepOutput, n: int, global_n: int) -> None:
        self.sums[0] += out.loss.double() * n
        self.sums[1] += n
        self.samples += global_n

    def close(self, ctx: LoopContext) -> tuple[float, float, int]:
        """(mean loss over every rank's rows, samples per second, samples); resets the window. A collective."""
        total = ctx.all_sum(self.sums.clone())
        loss = float(total[0] / total[1].clamp_min(1))
        samples, rate = self.samples, self.samples / max(time.perf_counter() - self.start, 1e-9)
        self.sums.zero_()
        self.samples, self.start = 0, time.perf_counter()
        return loss, rate, samples


# ---- the loop ------------------------------------------------------------------------------------
@dataclass
class LoopState:
    step: int = 0
    samples: int = 0
    resumed_from: int | None = None  # the checkpoint's step when this attempt restored one


def restore(task: TrainTask, ctx: LoopContext) -> LoopState:
    """Part 1: continue from the latest checkpoint, if there is one."""
    saved = ctx.restore()
    if saved is None:
        return LoopState()
    task.load_state_dict(saved)
    task.load_local_states(saved["ranks"], ctx.rank, ctx.world)
    return LoopState(step=int(saved["step"]), samples=int(saved["samples_seen"]), resumed_from=int(saved["step"]))


def _due(schedule: Schedule, before: int, after: int, step: int) -> tuple[bool, bool, bool]:
    """(report, checkpoint, grid) after a step that took the sample count from ``before`` to ``after``."""
    final = after >= schedule.total_samples
    save = final or after // schedule.checkpoint_every > before // schedule.checkpoint_every
    grid = schedule.grid_every is not None and (final or after // schedule.grid_every > before // schedule.grid_every)
    return save or grid or step % schedule.log_every == 0, save, grid


def report(task: TrainTask, ctx: LoopContext, schedule: Schedule, state: LoopState, window: _Window,
           save: bool, grid: bool, progress: Any) -> dict[str, Any]:
    """Parts 3 and 4: every rank reports the same metrics; rank 0 adds the checkpoint when one is due."""
    loss, rate, new_samples = window.close(ctx)
    metrics = {"step": state.step, "samples_seen": state.samples, "total_samples": schedule.total_samples,
               "loss": loss, "samples_per_second": rate}
    local_states = ctx.gather(task.local_state()) if save else None
    checkpoint = None
    if ctx.rank == 0:
        task.on_report(metrics, grid)
        progress.update(metrics, final=state.samples >= schedule.total_samples)
        ctx.record(metrics, new_samples)
        if save:
            checkpoint = {**task.state_dict(), "step": state.step, "samples_seen": state.samples,
                          "ranks": local_states, "config": json.dumps(schedule.config)}
    ctx.report(metrics, checkpoint, state.step)
    return metrics


def run_loop(task: TrainTask, ctx: LoopContext, schedule: Schedule, progress: Any) -> dict[str, Any]:
    """Train ``task`` to ``schedule.total_samples``; returns the last metrics reported. ``progress`` takes
    rank 0's updates (``update(metrics, final)`` and ``event(text)``; see pipelines.progress)."""
    state = restore(task, ctx)
    if state.resumed_from is not None and ctx.rank == 0:
        progress.event(f"resumed from step {state.step} ({state.samples}/{schedule.total_samples} samples) "
                       f"on {ctx.world} worker(s)")
    attempt = ctx.gather(uuid.uuid4().hex)[0]  # rank 0's id names this attempt on every rank
    ledger = Ledger(schedule.ledger_dir, ctx.rank, attempt, state.step, ctx.world, ctx.node)
    window, metrics = _Window(ctx.device), {}
    while state.samples < schedule.total_samples:
        global_n = min(schedule.batch_size, schedule.total_samples - state.samples)
        n = local_batch(global_n, ctx.world, ctx.rank, state.step)
        out = task.step(n, n * ctx.world / global_n, state.step)  # part 2
        before, state.step, state.samples = state.samples, state.step + 1, state.samples + global_n
        window.add(out, n, global_n)
        ledger.step(state.step, n, state.samples, float(out.loss), out.ids, out.epochs)
        if (schedule.fault_injection_step == state.step and state.resumed_from is None
                and ctx.rank == ctx.world - 1):
            progress.event(f"fault injection: worker {ctx.rank} exits at step {state.step}")
            os._exit(1)
        due, save, grid = _due(schedule, before, state.samples, state.step)
        if due:
            metrics = report(task, ctx, schedule, state, window, save, grid, progress)
    ledger.close(state.step, state.samples, task.model)
    if ctx.rank == 0:
        task.export()  # part 5
    return metrics


# ---- on the driver ------------------------------------------------------------------------------
@dataclass(kw_only=True)
class TrainerJob(RunDir):
    """Settings every Ray Train job shares: its workers, how it reports, how it survives failures."""

    num_workers: int | str = option(1, help="Ray Train workers: N, or MIN-MAX for elastic training")
    use_gpu: bool = option(False, help="one GPU per worker")
    cpus_per_worker: float = option(1.0, help="logical CPUs reserved per worker")
    worker_resources: dict[str, float] | None = option(
        None, cli=False, help="other Ray resources each worker reserves (config file), e.g. {trainer_slot: 1} "
                              "with one slot per node to spread the workers one per node")
    checkpoint_every: int = option(100_000, help="samples between checkpoints (the last step always checkpoints)")
    log_every: int = option(10, help="steps between progress updates and reported metrics")
    progress_bar: bool = option(True, help="a progress bar on a terminal (else a line per update)")
    max_failures: int = option(3, help="worker-group restarts from the last checkpoint before the run fails")
    keep_checkpoints: int = option(2, help="checkpoints kept in the run directory")
    resize_interval_s: float = option(60.0, help="elastic runs: seconds between attempts to grow toward MAX")

    def fit(self, worker: Any, loop_config: dict[str, Any], datasets: dict[str, Any], console: ConsoleProgress) -> Any:
        """Run ``worker(loop_config)`` on this job's Ray Train worker group, drawing rank 0's progress on
        ``console``; returns Ray Train's Result (its last metrics and checkpoint)."""
        from ray.train.torch import TorchTrainer

        with driver_progress(console) as progress:
            trainer = TorchTrainer(
                worker, train_loop_config={**loop_config, "progress": progress},
                scaling_config=cluster.scaling_config(self.num_workers, self.use_gpu, self.cpus_per_worker,
                                                      self.resize_interval_s, self.worker_resources),
                run_config=cluster.run_config(self.name, self.storage, self.s3_endpoint, self.max_failures,
                                              self.keep_checkpoints),
                datasets=datasets,
            )
            return trainer.fit()

    def console(self, label: str, total_samples: int, batch_size: int, unit: str) -> ConsoleProgress:
        return ConsoleProgress(label, total_samples, batch_size, unit, bar=None if self.progress_bar else False)


def load_checkpoint(checkpoint: Any) -> dict[str, Any]:
    """The training state in a Ray Train checkpoint written by :func:`run_loop` (tensors only)."""
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
