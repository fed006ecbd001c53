"""Elastic training through the loss of a whole node, on a real multi-node Ray on this machine.

The session's Ray (a ``ray.cluster_utils.Cluster`` head) gets three training nodes, each with one
``trainer_slot``, so an elastic run (``--num-workers 2-3``) puts one worker on each. The run reads parquet from
S3 (the moto server) through Ray Data, with two corrupt images among the rows. Mid-run the node of rank 1 dies
(its raylet and workers killed, not drained): training continues on the two survivors from the last
checkpoint, and when a node joins again the group grows back to three at the next resize. The scenario is
benchmarks/scale_sim.py's; here it runs small and its account must be exact.
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.scale_sim import train_through_node_loss, write_parquet
from diffae_core import DiffAE

pytestmark = pytest.mark.timeout(1200)
BATCH, STEPS = 10, 48  # 3 workers: 4 + 3 + 3 rows (the extra row rotating); 2 workers: 5 + 5


def test_elastic_training_survives_a_node_kill_and_grows_back(ray_cluster, s3_bucket, tmp_path):
    data = f"s3://{s3_bucket}/data"
    write_parquet(data, 60, [b"not an image", b"\x89PNG\r\n\x1a\n truncated"])
    result = train_through_node_loss(ray_cluster["cluster"], data, f"s3://{s3_bucket}/runs", tmp_path / "ledger",
                                     STEPS, BATCH)
    account = result.audit
    print("\n".join(result.timeline.lines()))
    print(f"ledger: planned {account.planned}, counted {account.counted}, redone {account.redone}, "
          f"lost {account.lost}, doubled {account.doubled}; attempts "
          f"{[(a.resumed_from, a.world, a.steps) for a in account.attempts]}")

    worlds = [a.world for a in account.attempts]
    # lost a node of the 3-worker group, went on with 2, grew back to 3 (a run may also start on 2 and grow
    # while the third node comes up)
    assert (3, 2) in set(zip(worlds, worlds[1:], strict=False)) and worlds[-1] == 3, worlds
    assert any(a.world == 2 and a.steps > a.resumed_from for a in account.attempts)  # the survivors trained
    assert (account.counted, account.lost, account.doubled) == (BATCH * STEPS, 0, 0)
    assert all(a.resumed_from % 4 == 0 for a in account.attempts)  # every restart began at a checkpoint
    attempts = account.attempts  # what an attempt trained past the next one's checkpoint was trained again
    assert account.redone == BATCH * sum(max(0, a.steps - b.resumed_from) for a, b in zip(attempts, attempts[1:], strict=False))
    by_step: dict[int, list[int]] = {}
    for r in account.kept:
        by_step.setdefault(r["step"], []).append(r["n"])
    assert sorted(by_step) == list(range(1, STEPS + 1)) and all(sum(ns) == BATCH for ns in by_step.values())
    assert any(sorted(ns) == [3, 3, 4] for ns in by_step.values())  # the remainder split, on 3 workers
    losses = account.losses()
    early = np.mean([losses[s] for s in range(1, 5)])
    late = np.mean([losses[s] for s in range(STEPS - 3, STEPS + 1)])
    assert late < 0.8 * early, (early, late)  # the loss curve continues across both restarts
    assert result.summary["samples_seen"] == BATCH * STEPS
    assert result.summary["skipped_images"] == 2  # the corrupt rows, counted once over attempts and epochs
    assert DiffAE.load(result.summary["bundle"]).image_size == 16

