"""Export a bundle (EMA weights by default) from a ``train_autoencoder`` run or one of its checkpoints.

    python -m pipelines.export RUN [--out BUNDLE] [--checkpoint CKPT] [--weights ema|online]

RUN is the run directory (``STORAGE/NAME``, local or ``s3://``) holding Ray Train checkpoints
``checkpoint-step*/state.pt``; the latest one is exported unless ``--checkpoint`` names one (a directory
name inside RUN or a full URI). The bundle goes to ``--out`` (default ``RUN/bundle``) and loads with
``DiffAE.load``. Training ends with the same export, so this is for runs that were stopped early, for a
checkpoint other than the last, or for the online (non-EMA) weights.
"""

from __future__ import annotations

import argparse
import io
import json
import posixpath
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow.fs as pafs
import torch

from diffae_core import DiffAE
from diffae_core.bundle import save_bundle
from diffae_core.config import ModelConfig

from . import runtime, storage
from .autoencoder_worker import CHECKPOINT_FORMAT, STATE_FILE

CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class ExportResult:
    bundle: str  # URI written
    checkpoint: str  # URI of the checkpoint directory read
    step: int
    samples_seen: int
    weights: str  # "ema" or "online"


def list_checkpoints(run: str, endpoint: str | None = None) -> list[str]:
    """Checkpoint directory names in ``run`` that hold a training state, oldest first (by step)."""
    fs, path = storage.filesystem(run, endpoint)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"run directory {run} does not exist")
    names = []
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=False)):
        name = posixpath.basename(info.path)
        if name.startswith(CHECKPOINT_PREFIX) and storage.exists(fs, storage.join(info.path, STATE_FILE)):
            names.append(name)
    return sorted(names)  # checkpoint-step00000012: zero-padded, so name order is step order


def load_training_state(checkpoint: str, endpoint: str | None = None) -> dict:
    """The ``state.pt`` of a checkpoint directory URI (tensors and plain values only: weights_only=True)."""
    data = runtime.read_bytes(storage.uri_join(checkpoint, STATE_FILE), endpoint)
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
    endpoint = runtime.resolve_endpoint(endpoint)
    if checkpoint is None:
        found = list_checkpoints(run, endpoint)
        if not found:
            raise FileNotFoundError(f"{run} holds no checkpoint-*/{STATE_FILE}: nothing to export")
        checkpoint = found[-1]
    if "/" not in checkpoint:
        checkpoint = storage.uri_join(run, checkpoint)
    state = load_training_state(checkpoint, endpoint)
    resolved = json.loads(state["config"])
    model = DiffAE(ModelConfig.from_dict(resolved["model"]))
    if weights == "ema":
        model.load_state_dict(state["ema"]["shadow"])
    else:
        model.load_state_dict(state["model"])
    out = out or storage.uri_join(run, "bundle")
    save_bundle(model.eval(), out, endpoint)
    return ExportResult(bundle=out, checkpoint=checkpoint, step=int(state["step"]),
                        samples_seen=int(state["samples_seen"]), weights=weights)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", help="run directory STORAGE/NAME (path or s3://) of `diffae train autoencoder`")
    p.add_argument("--out", help="bundle to write (default: RUN/bundle)")
    p.add_argument("--checkpoint", help="checkpoint directory name in RUN or its URI (default: the latest)")
    p.add_argument("--weights", choices=["ema", "online"], default="ema", help="which weights to export")
    p.add_argument("--list", action="store_true", help="list the run's checkpoints and exit")
    runtime.add_storage_flags(p)
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.list:
        print("\n".join(list_checkpoints(args.run, runtime.resolve_endpoint(args.s3_endpoint))))
        return 0
    result = export_bundle(args.run, args.out, checkpoint=args.checkpoint, weights=args.weights,
                           endpoint=args.s3_endpoint)
    print(f"exported the {result.weights} weights of {result.checkpoint} (step {result.step}, "
          f"{result.samples_seen} samples) to {result.bundle}")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m pipelines.export"))
