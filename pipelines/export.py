"""Export a bundle (EMA weights by default) from a ``train_autoencoder`` run or one of its checkpoints.

    python -m pipelines.export RUN [--out BUNDLE] [--checkpoint CKPT] [--weights ema|online]

RUN is the run directory (``STORAGE/NAME``, local or ``s3://``) holding Ray Train checkpoints
``checkpoint-step*/state.pt``; the latest one is exported unless ``--checkpoint`` names one (a directory
name inside RUN or a full URI). The bundle goes to ``--out`` (default ``RUN/bundle``) and loads with
``DiffAE.load``. Training ends with the same export, so this is for runs that were stopped early, for a
checkpoint other than the last, or for the online (non-EMA) weights.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from diffae_core import DiffAE, storage
from diffae_core.config import ModelConfig

from . import jobkit
from .jobkit import option
from .train_autoencoder import CHECKPOINT_FORMAT
from .training import CHECKPOINT_PREFIX, STATE_FILE


@dataclass(kw_only=True)
class ExportJob(jobkit.JobConfig):
    """Export a bundle (EMA weights) from a training run's checkpoint."""

    job_name: ClassVar[str] = "export"

    run: str = option(positional=True, path=True, help="run directory STORAGE/NAME (path or s3://) of `diffae train autoencoder`")
    out: str | None = option(None, path=True, help="bundle to write (default: RUN/bundle)")
    checkpoint: str | None = option(None, help="checkpoint directory name in RUN or its URI (default: the latest)")
    weights: str = option("ema", choices=("ema", "online"), help="which weights to export")
    list_only: bool = option(False, flag="--list", help="list the run's checkpoints and exit")


@dataclass
class ExportResult:
    bundle: str  # URI written
    checkpoint: str  # URI of the checkpoint directory read
    step: int
    samples_seen: int
    weights: str  # "ema" or "online"


def list_checkpoints(run: str, endpoint: str | None = None) -> list[str]:
    """Checkpoint directory names in ``run`` that hold a training state, oldest first (by step)."""
    names = [name for name in storage.list_dirs(run, endpoint) if name.startswith(CHECKPOINT_PREFIX)
             and storage.exists(storage.join(run, name, STATE_FILE), endpoint)]
    return sorted(names)  # checkpoint-step00000012: zero-padded, so name order is step order


def load_training_state(checkpoint: str, endpoint: str | None = None) -> dict:
    """The ``state.pt`` of a checkpoint directory URI (tensors and plain values only: weights_only=True)."""
    data = storage.read_bytes(storage.join(checkpoint, STATE_FILE), endpoint)
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{checkpoint} is not a train_autoencoder checkpoint (format {state.get('format')!r})")
    return state


def export_bundle(run: str, out: str | None = None, *, checkpoint: str | None = None, weights: str = "ema",
                  endpoint: str | None = None) -> ExportResult:
    """Write a bundle from a training checkpoint of ``run`` and return where it went.

    run: run directory URI; checkpoint: a checkpoint directory name in ``run`` or a full URI (default: the
    latest); out: bundle URI (default ``run/bundle``); weights: "ema" (what the official code evaluates and
    serves) or "online"; endpoint: S3 endpoint override (default: the AWS variables).
    """
    if weights not in ("ema", "online"):
        raise ValueError(f"weights must be 'ema' or 'online', got {weights!r}")
    endpoint = storage.s3_endpoint(endpoint)
    if checkpoint is None:
        found = list_checkpoints(run, endpoint)
        if not found:
            raise FileNotFoundError(f"{run} holds no {CHECKPOINT_PREFIX}*/{STATE_FILE}: nothing to export")
        checkpoint = found[-1]
    if "/" not in checkpoint:
        checkpoint = storage.join(run, checkpoint)
    state = load_training_state(checkpoint, endpoint)
    model = DiffAE(ModelConfig.from_dict(json.loads(state["config"])["model"]))
    model.load_state_dict(state["ema"]["shadow"] if weights == "ema" else state["model"])
    out = out or storage.join(run, "bundle")
    model.eval().save(out, endpoint)
    return ExportResult(bundle=out, checkpoint=checkpoint, step=int(state["step"]),
                        samples_seen=int(state["samples_seen"]), weights=weights)


def _run(job: ExportJob) -> dict[str, Any]:
    job = job.prepared()
    if job.list_only:
        names = list_checkpoints(job.run, job.s3_endpoint)
        print("\n".join(names))
        return {"run": job.run, "checkpoints": names}
    result = export_bundle(job.run, job.out, checkpoint=job.checkpoint, weights=job.weights, endpoint=job.s3_endpoint)
    print(f"exported the {result.weights} weights of {result.checkpoint} (step {result.step}, "
          f"{result.samples_seen} samples) to {result.bundle}")
    return vars(result)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    return jobkit.run_cli(ExportJob, argv, prog, _run, needs_ray=False)


if __name__ == "__main__":
    raise SystemExit(main(prog="python -m pipelines.export"))
