"""Elastic training through the loss of a whole node, on a real multi-node Ray on this machine.

The session's Ray (a ``ray.cluster_utils.Cluster`` head) gets three worker nodes, each with one
``trainer_slot``, so an elastic run (``--num-workers 2-3``) puts one worker on each. The run reads parquet
from S3 (the moto server) through Ray Data, with two corrupt images among the rows. Mid-run one node dies
(its raylet and workers killed, not drained): training continues on the two survivors from the last
checkpoint, and when a node joins again the worker group grows back to three at the next resize. The
audit ledger must show every planned sample trained exactly once; the loss curve continues across both
restarts, and the corrupt images are counted once.
"""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import micro_config
from PIL import Image

from diffae_core import DiffAE, storage
from diffae_core.config import TrainConfig
from pipelines.ledger import audit, read
from pipelines.train_autoencoder import TrainJobConfig, train_autoencoder

pytestmark = pytest.mark.timeout(1200)

N_IMAGES, N_CORRUPT = 60, 2
BATCH = 10  # 3 workers: 4 + 3 + 3 rows, the extra row rotating; 2 workers: 5 + 5
STEPS = 48
CHECKPOINT_EVERY = 4 * BATCH
NODE = {"num_cpus": 1, "resources": {"trainer_slot": 1}}


@pytest.fixture
def worker_nodes(ray_cluster):
    """Three worker nodes for this test; whatever is left of them is removed afterwards."""
    cluster = ray_cluster["cluster"]
    nodes = [cluster.add_node(**NODE) for _ in range(3)]
    cluster.wait_for_nodes()
    yield cluster, nodes
    for node in list(cluster.worker_nodes):
        cluster.remove_node(node, allow_graceful=False)


def write_parquet_with_corrupt_rows(bucket: str) -> str:
    rng = np.random.default_rng(0)
    images, ids = [], []
    for i in range(N_IMAGES):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
        images.append(buf.getvalue())
        ids.append(f"img-{i:03d}")
    images += [b"not an image", b"\x89PNG\r\n\x1a\n truncated"]
    ids += ["corrupt-0", "corrupt-1"]
    uri = f"s3://{bucket}/data"
    fs, path = storage.filesystem(uri)
    for shard in range(2):  # two files, so Ray Data has blocks to spread
        rows = slice(shard, None, 2)
        with fs.open_output_stream(f"{path}/part-{shard}.parquet") as f:
            pq.write_table(pa.table({"id": ids[rows], "image": images[rows]}), f)
    return uri


def _attempts(ledger) -> list[dict]:
    return sorted((r for r in read(ledger) if r["kind"] == "attempt" and r["rank"] == 0), key=lambda r: r["time"])


def _wait(condition, timeout: float, what: str, errors: list) -> None:
    deadline = time.time() + timeout
    while not condition():
        if errors:
            raise errors[0]
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.5)


def test_elastic_training_survives_a_node_kill_and_grows_back(worker_nodes, s3_bucket, tmp_path):
    cluster, nodes = worker_nodes
    ledger = tmp_path / "ledger"
    model = micro_config()
    model.train = TrainConfig(batch_size=BATCH, lr=1e-3, total_samples=BATCH * STEPS, ema_decay=0.99,
                              ema_warmup_steps=10, seed=0)
    job = TrainJobConfig(data=write_parquet_with_corrupt_rows(s3_bucket), storage=f"s3://{s3_bucket}/runs",
                         name="elastic", model=model, num_workers="2-3", cpus_per_worker=0.5,
                         worker_resources={"trainer_slot": 1}, resize_interval_s=5, max_failures=3,
                         checkpoint_every=CHECKPOINT_EVERY, grid_every=10**9, log_every=4, grid_images=2,
                         ledger_dir=str(ledger), progress_bar=False)
    results, errors = [], []
    thread = threading.Thread(target=lambda: _run(job, results, errors), daemon=True)
    thread.start()
    timeline = {"start": time.time()}

    # a 3-worker attempt trains past a checkpoint; then the node of rank 1 dies
    _wait(lambda: any(r["kind"] == "step" and r["step"] >= 6 for r in read(ledger) if ledger.exists()), 300,
          "the first attempt to train 6 steps", errors)
    first = _attempts(ledger)[0]
    assert first["world"] == 3
    victim_id = next(r["node"] for r in read(ledger) if r["kind"] == "attempt" and r["rank"] == 1)
    victim = next(n for n in nodes if n.node_id == victim_id)
    cluster.remove_node(victim, allow_graceful=False)
    timeline["kill"] = time.time()

    # the survivors continue without waiting for the lost node; then a node joins again
    _wait(lambda: any(a["world"] == 2 for a in _attempts(ledger)), 300, "a 2-worker attempt", errors)
    timeline["resumed on 2"] = time.time()
    cluster.add_node(**NODE)
    timeline["node joined"] = time.time()
    _wait(lambda: _attempts(ledger)[-1]["world"] == 3 and len(_attempts(ledger)) >= 3, 300,
          "the group to grow back to 3 workers", errors)
    timeline["grown to 3"] = time.time()
    thread.join(timeout=600)
    assert not errors, errors
    timeline["end"] = time.time()
    print(json.dumps({k: round(v - timeline["start"], 1) for k, v in timeline.items()}))

    account = audit(ledger, BATCH * STEPS, BATCH)
    print(f"ledger: planned {account.planned}, counted {account.counted}, redone {account.redone}, "
          f"lost {account.lost}, doubled {account.doubled}; attempts "
          f"{[(a.resumed_from, a.world, a.steps) for a in account.attempts]}")
    assert [a.world for a in account.attempts][:2] == [3, 2] and account.attempts[-1].world == 3
    assert (account.counted, account.lost, account.doubled) == (BATCH * STEPS, 0, 0)
    assert all(a.resumed_from % 4 == 0 for a in account.attempts)  # each restart began at a checkpoint
    by_step: dict[int, list] = {}
    for r in account.kept:
        by_step.setdefault(r["step"], []).append(r["n"])
    assert all(sum(ns) == BATCH for ns in by_step.values()) and len(by_step) == STEPS
    assert any(sorted(ns) == [3, 3, 4] for ns in by_step.values())  # the remainder split, on 3 workers
    losses = account.losses()
    early, late = np.mean([losses[s] for s in range(1, 5)]), np.mean([losses[s] for s in range(STEPS - 3, STEPS + 1)])
    assert late < 0.8 * early, (early, late)

    (result,) = results
    assert result.summary["samples_seen"] == BATCH * STEPS and result.summary["skipped_images"] == N_CORRUPT
    assert DiffAE.load(result.bundle).image_size == 16


def _run(job: TrainJobConfig, results: list, errors: list) -> None:
    try:
        results.append(train_autoencoder(job))
    except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
        errors.append(exc)
