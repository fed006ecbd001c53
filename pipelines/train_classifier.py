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

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc, binary_f1_score

from diffae_core.config import TrainConfig

from . import runtime, storage
from .infer_latents import ID_COLUMN, Z_COLUMN, autoencoder_sha256, read_latents, read_stats, z_array

# The official classifier recipe (templates_cls.py, experiment_classifier.py): no clipping, no weight decay.
CLASSIFIER_RECIPE = TrainConfig(batch_size=32, lr=1e-3, optimizer="adam", weight_decay=0.0, grad_clip=0.0,
                                total_samples=300_000)
SPLIT_SALT = "classifier-heldout:"


@dataclass
class ClassifierJob:
    """Everything a classifier run needs; saved as the run's resolved config."""

    bundle: str
    latents: str
    storage: str
    name: str
    out: str | None = None  # bundle to write; None = add the head to `bundle` in place
    attributes: list[str] | None = None  # None = every attribute column of the latents
    holdout: float = 0.1
    threshold: float = 0.5  # probability threshold for F1
    train: TrainConfig = field(default_factory=lambda: dataclasses.replace(CLASSIFIER_RECIPE))
    endpoint: str | None = None

    @property
    def run_dir(self) -> str:
        return storage.uri_join(self.storage, self.name)


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


def fit_head(z_n: torch.Tensor, labels: torch.Tensor, train: TrainConfig, log_every: int = 1000) -> tuple[
        torch.nn.Linear, list[tuple[int, float]]]:
    """Train Linear(Z, A) on normalised z_n [N, Z] and labels [N, A]. Returns (head, loss history)."""
    torch.manual_seed(train.seed)
    head = torch.nn.Linear(z_n.shape[1], labels.shape[1])
    optimizer = runtime.build_optimizer(list(head.parameters()), train)
    sampler = runtime.EpochSampler(z_n.shape[0], torch.Generator().manual_seed(train.seed))
    steps = math.ceil(train.total_samples / train.batch_size)
    history, running, window, started = [], 0.0, 0, time.time()
    for step in range(1, steps + 1):
        idx = sampler.next(train.batch_size)
        loss = masked_bce(head(z_n[idx]), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(head.parameters(), train.grad_clip)
        optimizer.step()
        running += loss.item()
        window += 1
        if step % log_every == 0 or step == steps:
            history.append((step, running / window))
            print(f"[train-classifier] step {step}/{steps} loss {running / window:.4f} "
                  f"{window * train.batch_size / max(time.time() - started, 1e-9):.0f} samples/s", flush=True)
            running, window, started = 0.0, 0, time.time()
    return head.eval(), history


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
    sha = autoencoder_sha256(job.bundle, job.endpoint)
    latent_sha = read_stats(job.latents, job.endpoint).autoencoder_sha256
    if latent_sha and latent_sha != sha:
        raise ValueError(f"{job.latents} was computed with another autoencoder than {job.bundle}'s; "
                         f"run `diffae infer-latents --bundle {job.bundle}` again")
    runtime.save_run_config(job.run_dir, "train-classifier", job, job.endpoint)
    data = load_labelled(job.latents, job.attributes, job.endpoint)
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

    written = runtime.update_bundle(job.bundle, job.out, attach, expected_autoencoder=sha, endpoint=job.endpoint)
    metrics["bundle"] = written
    runtime.write_json(storage.uri_join(job.run_dir, "metrics.json"), metrics, job.endpoint)
    return ClassifierResult(bundle=written, run_dir=job.run_dir, metrics=metrics)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bundle", required=True, help="the autoencoder bundle (path or s3://) the latents came from")
    p.add_argument("--latents", required=True, help="output directory of `diffae infer-latents` (with attributes)")
    p.add_argument("--out", help="bundle to write (default: add the classifier to --bundle in place)")
    p.add_argument("--storage", default="runs", help="runs root (path or s3://) for the config and metrics")
    p.add_argument("--name", help="run name under --storage (default: train-classifier-<time>)")
    p.add_argument("--attributes", nargs="+", help="attribute columns to learn (default: all of the latents')")
    p.add_argument("--holdout", type=float, default=0.1, help="fraction of images held out for the metrics")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold for F1")
    runtime.add_train_flags(p, ema=False)
    runtime.add_storage_flags(p)
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    endpoint = runtime.resolve_endpoint(args.s3_endpoint)
    runtime.ensure_ray()
    train = runtime.resolve_train_config(CLASSIFIER_RECIPE, runtime.read_overrides(args.config, endpoint),
                                         **runtime.train_flags(args))
    job = ClassifierJob(bundle=args.bundle, latents=args.latents, out=args.out, storage=args.storage,
                        name=args.name or runtime.default_run_name("train-classifier"), attributes=args.attributes,
                        holdout=args.holdout, threshold=args.threshold, train=train, endpoint=endpoint)
    result = train_classifier(job)
    print(json.dumps({"bundle": result.bundle, "run": result.run_dir, "mean_auroc": result.metrics["mean_auroc"],
                      "mean_f1": result.metrics["mean_f1"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
