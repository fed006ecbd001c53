"""Train a linear attribute classifier on normalised z_sem and add it to a bundle.

    python -m pipelines.train_classifier --bundle BUNDLE --latents LATENTS_DIR [--out BUNDLE2]

The official ``ClsModel`` (experiment_classifier.py): one ``nn.Linear(Z, A)`` on (z_sem - mean) / std, BCE
with logits averaged over batch x attributes, Adam lr 1e-3, batch 32, 300k samples. The statistics are the
classifier's own: the mean and unbiased std of z_sem over its training split. The head's final weights
are exported (the official manipulation reads the non-EMA ``classifier.weight``).

The latents (``diffae infer-latents --data ... --attributes ...``) are read with Ray Data; the head is
tiny, so it trains on the driver. A held-out split, chosen by a salted sha1 of the image id (stable
across runs, independent of the autoencoder's own held-out split), measures per-attribute AUROC and F1
(torchmetrics). Attribute values < 0 (an image without a row in the attribute file) are left out of the
loss and the metrics. Outputs: ``STORAGE/NAME/{config,metrics}.json`` and the bundle (in place by
default, or ``--out``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc, binary_f1_score

from diffae_core import storage
from diffae_core.config import TrainConfig

from . import jobkit
from .jobkit import option
from .latents import (
    ID_COLUMN,
    Z_COLUMN,
    attach_to_bundle,
    check_same_autoencoder,
    read_latents,
    read_stats,
    z_array,
)
from .progress import ConsoleProgress
from .streams import EpochSampler
from .training import LocalContext, Optimization, Schedule, StepOutput, TrainTask, run_loop

# The official classifier recipe (templates_cls.py, experiment_classifier.py): no clipping, no weight decay.
CLASSIFIER_RECIPE = TrainConfig(batch_size=32, lr=1e-3, optimizer="adam", weight_decay=0.0, grad_clip=0.0,
                                total_samples=300_000)
SPLIT_SALT = "classifier-heldout:"
LOG_EVERY = 1000  # steps between progress lines


@dataclass(kw_only=True)
class ClassifierJob(jobkit.RunDir):
    """Train a linear attribute head on z_sem and add it to a bundle."""

    job_name: ClassVar[str] = "train-classifier"
    recipe_path: ClassVar[str] = "train"
    recipe_flags: ClassVar[tuple[str, ...]] = ("batch_size", "lr", "weight_decay", "optimizer", "grad_clip",
                                               "total_samples", "seed")

    bundle: str = option(help="the autoencoder bundle (path or s3://) the latents came from", path=True)
    latents: str = option(help="output directory of `diffae infer-latents` (with attributes)", path=True)
    out: str | None = option(None, path=True, help="bundle to write (default: add the classifier to --bundle in place)")
    attributes: list[str] | None = option(None, help="attribute columns to learn (default: all of the latents')")
    holdout: float = option(0.1, help="fraction of images held out for the metrics")
    threshold: float = option(0.5, help="probability threshold for F1")
    train: TrainConfig = option(default_factory=lambda: dataclasses.replace(CLASSIFIER_RECIPE), cli=False,
                                help="the recipe (default: the official classifier recipe)")


@dataclass
class LabelledLatents:
    """ids [N]; z [N, Z] float32 raw z_sem; labels [N, A] int64 (0/1, < 0 = unknown); attribute names [A]."""

    ids: list[str]
    z: torch.Tensor
    labels: torch.Tensor
    attributes: list[str]


@dataclass
class ClassifierResult:
    bundle: str
    run_dir: str
    metrics: dict


def load_labelled(latents: str, attributes: list[str] | None = None, endpoint: str | None = None) -> LabelledLatents:
    """Read ids, z_sem and binary attributes of a latents directory (Ray Data), checking the labels."""
    stats = read_stats(latents, endpoint)
    names = list(attributes) if attributes else list(stats.attributes)
    if not names:
        raise ValueError(f"{latents} has no attribute columns: run `diffae infer-latents` on data with attributes "
                         "(built-in shapes, parquet columns, or --attributes FILE)")
    missing = sorted(set(names) - set(stats.attributes))
    if missing:
        raise ValueError(f"attribute(s) {missing} are not in {latents}; it has {stats.attributes}")
    ids, zs, labels = [], [], []
    ds = read_latents(latents, columns=[ID_COLUMN, Z_COLUMN, *names], endpoint=endpoint)
    for batch in ds.iter_batches(batch_size=8192, batch_format="pyarrow"):
        ids.extend(str(i) for i in batch.column(ID_COLUMN).to_pylist())
        zs.append(z_array(batch))
        labels.append(np.stack([batch.column(n).to_numpy(zero_copy_only=False) for n in names], axis=1))
    label_matrix = torch.from_numpy(np.concatenate(labels).astype(np.int64))
    bad = [n for j, n in enumerate(names) if (label_matrix[:, j] > 1).any()]
    if bad:
        raise ValueError(f"attribute(s) {bad} are not binary (values above 1): a BCE head needs 0/1 attributes; "
                         "choose others with --attributes")
    return LabelledLatents(ids, torch.from_numpy(np.concatenate(zs)), label_matrix, names)


def heldout_mask(ids: Sequence[str], fraction: float) -> torch.Tensor:
    """[N] bool: True for ids whose salted sha1 maps below ``fraction`` (stable, order-independent)."""
    def below(image_id: str) -> bool:
        digest = hashlib.sha1((SPLIT_SALT + image_id).encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction

    return torch.tensor([below(i) for i in ids], dtype=torch.bool)


def masked_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE with logits averaged over the known entries (labels >= 0). logits, labels: [B, A]."""
    known = labels >= 0
    loss = F.binary_cross_entropy_with_logits(logits, labels.clamp_min(0).float(), reduction="none")
    return (loss * known).sum() / known.sum().clamp_min(1)


class HeadTask(TrainTask):
    """The classifier's side of the shared loop, run in this process: a linear head on normalised z."""

    def __init__(self, z_n: torch.Tensor, labels: torch.Tensor, train: TrainConfig) -> None:
        torch.manual_seed(train.seed)
        self.model = torch.nn.Linear(z_n.shape[1], labels.shape[1])
        self.opt = Optimization(self.model, train, ema=False)
        self.z_n, self.labels = z_n, labels
        self.sampler = EpochSampler(z_n.shape[0], torch.Generator().manual_seed(train.seed))

    def step(self, n: int, weight: float, step: int) -> StepOutput:
        idx = self.sampler.next(n)
        loss = masked_bce(self.model(self.z_n[idx]), self.labels[idx])
        self.opt.step(loss * weight, step)
        return StepOutput(loss.detach())

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None  # a head trains in seconds: it starts over instead of resuming


def fit_head(z_n: torch.Tensor, labels: torch.Tensor, train: TrainConfig, log_every: int = LOG_EVERY,
             progress: bool | None = None) -> tuple[torch.nn.Linear, list[tuple[int, float]]]:
    """Train Linear(Z, A) on normalised z_n [N, Z] and labels [N, A]. Returns (head, loss history)."""
    task, ctx = HeadTask(z_n, labels, train), LocalContext()
    schedule = Schedule(train.total_samples, train.batch_size, checkpoint_every=train.total_samples, log_every=log_every)
    console = ConsoleProgress("train-classifier", train.total_samples, train.batch_size, "latent", bar=progress)
    try:
        run_loop(task, ctx, schedule, console)
    finally:
        console.close()
    return task.model.eval(), [(m["step"], m["loss"]) for m in ctx.history]


def attribute_metrics(logits: torch.Tensor, labels: torch.Tensor, names: Sequence[str],
                      threshold: float = 0.5) -> dict[str, dict]:
    """Per attribute: AUROC, F1 (at ``threshold`` on the probability), counts. Unknown labels (< 0) are
    left out; AUROC is None when the split holds only one class of that attribute."""
    out = {}
    probs = torch.sigmoid(logits)
    for j, name in enumerate(names):
        known = labels[:, j] >= 0
        p, y = probs[known, j], labels[known, j]
        positives = int(y.sum())
        both = 0 < positives < y.numel()
        out[name] = {
            "auroc": float(binary_auroc(p, y)) if both else None,
            "f1": float(binary_f1_score(p, y, threshold=threshold)) if y.numel() else None,
            "count": int(y.numel()),
            "positives": positives,
        }
    return out


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def train_classifier(job: ClassifierJob) -> ClassifierResult:
    """Read the latents, train the head on the training split, evaluate on the held-out split, attach."""
    job = job.named("train-classifier").prepared()
    sha = check_same_autoencoder(job.bundle, job.latents, job.s3_endpoint)
    job.save_config(job.run_dir)
    data = load_labelled(job.latents, job.attributes, job.s3_endpoint)
    heldout = heldout_mask(data.ids, job.holdout)
    train_idx, held_idx = (~heldout).nonzero().squeeze(1), heldout.nonzero().squeeze(1)
    if train_idx.numel() < 2 or held_idx.numel() < 1:
        raise ValueError(f"{len(data.ids)} latents split into {train_idx.numel()} train / {held_idx.numel()} "
                         f"held-out with --holdout {job.holdout}: need at least 2 and 1")
    z_train = data.z[train_idx].double()
    z_mean, z_std = z_train.mean(0).float(), z_train.std(0).float()  # std: unbiased (N-1), as latent.pkl
    z_std = torch.where(z_std > 0, z_std, torch.ones_like(z_std))  # a constant dimension carries no signal

    def normalise(z: torch.Tensor) -> torch.Tensor:
        return (z - z_mean) / z_std

    head, history = fit_head(normalise(data.z[train_idx]), data.labels[train_idx], job.train)
    with torch.no_grad():
        held_logits = head(normalise(data.z[held_idx]))
        train_logits = head(normalise(data.z[train_idx]))
    per_attribute = attribute_metrics(held_logits, data.labels[held_idx], data.attributes, job.threshold)
    metrics = {
        "heldout": per_attribute,
        "mean_auroc": _mean([m["auroc"] for m in per_attribute.values()]),
        "mean_f1": _mean([m["f1"] for m in per_attribute.values()]),
        "heldout_loss": float(masked_bce(held_logits, data.labels[held_idx])),
        "train_loss": float(masked_bce(train_logits, data.labels[train_idx])),
        "train_count": int(train_idx.numel()),
        "heldout_count": int(held_idx.numel()),
        "attributes": data.attributes,
        "history": history,
    }

    def attach(model) -> None:
        model.attach_classifier(head.weight.detach(), head.bias.detach(), z_mean, z_std, data.attributes)

    written = attach_to_bundle(job.bundle, job.out, attach, expected_autoencoder=sha, endpoint=job.s3_endpoint)
    metrics["bundle"] = written
    storage.write_json(storage.join(job.run_dir, "metrics.json"), metrics, job.s3_endpoint)
    return ClassifierResult(bundle=written, run_dir=job.run_dir, metrics=metrics)


def _run(job: ClassifierJob) -> dict[str, Any]:
    result = train_classifier(job)
    return {"bundle": result.bundle, "run": result.run_dir, "mean_auroc": result.metrics["mean_auroc"],
            "mean_f1": result.metrics["mean_f1"]}


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    return jobkit.run_cli(ClassifierJob, argv, prog, _run)


if __name__ == "__main__":
    raise SystemExit(main(prog="python -m pipelines.train_classifier"))
