"""train_autoencoder on a real local Ray: 2-worker DDP on CPU, an injected worker failure, metrics.

One fit() checks several things (start-up costs ~20 s on 2 cores): the workers see disjoint shards that
cover the data every epoch, the run survives a worker that dies mid-run and ends with exactly the planned
number of samples, both ranks end with identical parameters, the loss falls on ``shapes``, PNG grids and
the bundle appear in the run directory, and the Prometheus metrics of docs/architecture.md are exported.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import micro_config

from diffae_core import DiffAE
from diffae_core.config import TrainConfig
from pipelines.ledger import audit, read
from pipelines.train_autoencoder import TrainJobConfig, train_autoencoder

pytestmark = pytest.mark.timeout(600)

N_IMAGES = 64  # shapes:64 -> 32 rows per worker per epoch
BATCH = 16  # global; 8 per worker -> 4 steps per epoch
TOTAL = N_IMAGES * 6  # 24 steps
CHECKPOINT_EVERY = 64  # samples: a checkpoint every 4 steps
FAIL_AT = 10  # the last rank exits after step 10 of the first attempt -> resume from step 8


def micro_job(tmp_path: Path, **overrides) -> TrainJobConfig:
    model = micro_config()
    model.train = TrainConfig(batch_size=BATCH, lr=1e-3, total_samples=TOTAL, ema_decay=0.99, ema_warmup_steps=10,
                              seed=0)
    settings = dict(data=f"shapes:{N_IMAGES}", storage=str(tmp_path / "runs"), name="ddp", model=model,
                    num_workers=2, cpus_per_worker=0.5, checkpoint_every=CHECKPOINT_EVERY, grid_every=TOTAL // 2,
                    log_every=4, grid_images=4, grid_steps=4, max_failures=2)
    settings.update(overrides)
    return TrainJobConfig(**settings)


class MetricsPoller(threading.Thread):
    """Reads Ray's Prometheus endpoint every second and remembers which of ``names`` have appeared."""

    def __init__(self, port: int, names: tuple[str, ...]):
        super().__init__(daemon=True)
        self.url, self.names, self.seen = f"http://127.0.0.1:{port}/metrics", names, set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                text = urllib.request.urlopen(self.url, timeout=5).read().decode()
            except OSError:
                continue
            self.seen |= {n for n in self.names if f"\n{n}{{" in text or f"\n{n} " in text}


def test_ddp_two_workers_fault_tolerance_and_outputs(ray_cluster, tmp_path):
    ledger = tmp_path / "ledger"
    job = micro_job(tmp_path, ledger_dir=str(ledger), fault_injection_step=FAIL_AT)
    wanted = ("ray_diffae_train_loss", "ray_diffae_train_images_per_second", "ray_diffae_train_samples_total")
    poller = MetricsPoller(ray_cluster["metrics_port"], wanted)
    poller.start()
    try:
        result = train_autoencoder(job)
        deadline = 25
        while set(wanted) - poller.seen and deadline > 0:  # the last values reach the exporter within ~10 s
            poller.stop.wait(1.0)
            deadline -= 1
    finally:
        poller.stop.set()

    account = audit(ledger, TOTAL, BATCH)
    print(json.dumps({"attempts": [vars(a) for a in account.attempts], "summary": result.summary}, default=str))

    # -- the failure happened and the run resumed from the last checkpoint before it
    # Usually step 8 (the last checkpoint before step 10). Ray Train registers a checkpoint only once every
    # rank's report() for that step has returned, so on a slow machine the dying rank can beat step 8's
    # registration and the run resumes from step 4: any checkpoint boundary before the failure is right.
    every = CHECKPOINT_EVERY // BATCH
    first_attempt, second = account.attempts
    assert first_attempt.resumed_from == 0 and first_attempt.steps == FAIL_AT and first_attempt.world == 2
    resume_step = second.resumed_from
    assert 0 < resume_step <= FAIL_AT and resume_step % every == 0, account.attempts
    records = [r for r in read(ledger) if r["kind"] == "step"]
    first = [r for r in records if r["attempt"] == first_attempt.id]

    # -- every sample counted exactly once: steps 1..8 of the first attempt + 9..24 of the second
    assert (account.planned, account.counted, account.lost, account.doubled) == (TOTAL, TOTAL, 0, 0)
    assert account.redone == sum(r["n"] for r in first if r["step"] > resume_step) == (FAIL_AT - resume_step) * BATCH
    assert sorted({r["step"] for r in account.kept}) == list(range(1, TOTAL // BATCH + 1))
    assert sum(len(r["ids"]) for r in account.kept) == TOTAL
    print(f"fault tolerance: {account.counted} samples counted (planned {TOTAL}), {account.redone} redone")
    assert result.summary["samples_seen"] == TOTAL and result.metrics["samples_seen"] == TOTAL
    assert result.summary["steps"] == TOTAL // BATCH
    assert {r: f["samples"] for r, f in account.finals.items()} == {0: TOTAL, 1: TOTAL}

    # -- disjoint shards covering the data, in every full epoch the first attempt saw (epochs 0 and 1)
    all_ids = {f"shapes-{i:07d}" for i in range(N_IMAGES)}
    for epoch in (0, 1):
        per_rank = {rank: [i for r in first if r["rank"] == rank for i, e in zip(r["ids"], r["epochs"], strict=True) if e == epoch]
                    for rank in (0, 1)}
        assert len(per_rank[0]) == len(per_rank[1]) == N_IMAGES // 2, epoch
        assert not set(per_rank[0]) & set(per_rank[1]), epoch
        assert set(per_rank[0]) | set(per_rank[1]) == all_ids, epoch

    # -- DDP kept the replicas identical
    assert account.finals[0]["param_digest"] == account.finals[1]["param_digest"]

    # -- the loss falls (per-step losses of both ranks, effective steps)
    loss = account.losses()
    early, late = sum(loss[s] for s in range(1, 5)) / 4, sum(loss[s] for s in range(21, 25)) / 4
    print(f"loss: first 4 steps {early:.3f}, last 4 steps {late:.3f}")
    assert late < 0.7 * early

    # -- outputs in the run directory
    run = Path(job.storage) / "ddp"
    assert json.loads((run / "config.json").read_text())["config"]["num_workers"] == 2
    assert json.loads((run / "summary.json").read_text())["samples_seen"] == TOTAL
    assert len(list((run / "grids").glob("step-*.png"))) >= 2
    model = DiffAE.load(result.bundle)
    assert model.image_size == 16
    x = model.decode(torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.zeros(2, model.config.z_dim), 2)
    assert torch.isfinite(x).all()

    # -- the training metrics reached Ray's Prometheus endpoint
    assert poller.seen == set(wanted), poller.seen


def test_cli_resolves_flags_config_file_and_resume(tmp_path):
    """Preset < config file < flags; --resume RUN reloads the saved settings and lets flags extend them."""
    from pipelines import jobkit

    def resolve(*argv: str) -> TrainJobConfig:
        return jobkit.resolve(TrainJobConfig, jobkit.build_parser(TrainJobConfig).parse_args(list(argv)))

    config = tmp_path / "cfg.yaml"
    config.write_text("preset: tiny32\nbatch_size: 8\nlr: 0.001\nnum_workers: 2\ncpus_per_worker: 0.5\n"
                      "model: {unet: {image_size: 16}}\n")
    job = resolve("--data", "shapes:64", "--storage", str(tmp_path), "--name", "r", "--config", str(config),
                  "--lr", "0.002", "--max-samples", "32")
    assert job.model.name == "tiny32" and job.model.image_size == 16 and job.num_workers == 2
    assert job.cpus_per_worker == 0.5 and job.model.train.batch_size == 8 and job.model.train.lr == 0.002
    assert job.model.train.total_samples == 32 and not job.resume
    assert job.model.diffusion.prediction == "eps" and job.progress_bar
    v = resolve("--data", "shapes", "--preset", "tiny32", "--prediction", "v", "--no-progress-bar")
    assert v.model.diffusion.prediction == "v" and not v.progress_bar
    assert resolve("--data", "shapes", "--preset", "demo16").model.diffusion.prediction == "v"
    assert resolve("--data", "shapes", "--num-workers", "2-4").num_workers == "2-4"
    job.save_config(job.run_dir)

    resumed = resolve("--resume", "r", "--storage", str(tmp_path), "--max-samples", "64")
    assert resumed.resume and resumed.name == "r" and resumed.data == "shapes:64" and resumed.num_workers == 2
    assert resumed.model.train.total_samples == 64 and resumed.model.train.lr == 0.002
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown setting"):
        resolve("--data", "shapes", "--config", str(bad))
    with pytest.raises(ValueError, match="data .* is required"):
        resolve("--preset", "tiny32")
    with pytest.raises(ValueError, match="MIN <= MAX"):
        resolve("--data", "shapes", "--num-workers", "4-2")


def test_bf16_training_on_cpu_checkpoints_and_resumes(ray_cluster, tmp_path):
    """bf16 autocast on the CPU: the loss falls, the run stops at its budget with a checkpoint and a bundle,
    and `--resume` (a bigger --max-samples) continues from that checkpoint to exactly the new budget."""
    import dataclasses

    from pipelines.export import load_training_state

    ledger = tmp_path / "ledger"
    job = micro_job(tmp_path, name="bf16", precision="bf16", num_workers=1, cpus_per_worker=1.0, ledger_dir=str(ledger),
                    checkpoint_every=4 * BATCH, grid_every=10**9)
    job.model.train = dataclasses.replace(job.model.train, total_samples=12 * BATCH)
    first = train_autoencoder(job)
    assert first.summary["samples_seen"] == 12 * BATCH
    state = load_training_state(str(Path(job.storage) / "bf16" / "checkpoint-step00000012"))
    assert state["step"] == 12 and all(v.dtype == torch.float32 for v in state["model"].values())  # fp32 master weights

    resumed = dataclasses.replace(job, resume=True)
    resumed.model = job.model.replace(train=dataclasses.replace(job.model.train, total_samples=24 * BATCH))
    second = train_autoencoder(resumed)
    account = audit(ledger, 24 * BATCH, BATCH)
    assert [(a.resumed_from, a.steps) for a in account.attempts] == [(0, 12), (12, 24)]
    assert (account.counted, account.redone, account.lost, account.doubled) == (24 * BATCH, 0, 0, 0)
    assert second.summary["samples_seen"] == 24 * BATCH
    loss = account.losses()
    assert sum(loss[s] for s in range(21, 25)) < 0.8 * sum(loss[s] for s in range(1, 5)), loss
    model = DiffAE.load(second.bundle)
    x = model.decode(torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.zeros(2, 512), 2)
    assert torch.isfinite(x).all()
