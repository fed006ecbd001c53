"""The training audit ledger: what every rank trained on, step by step, and the account it adds up to.

With ``ledger_dir`` set, each rank of every attempt of a run (a fresh start, a restart after a failure, an
elastic resize) appends JSON lines to ``ledger_dir/rank{R}.jsonl``: one ``attempt`` line when the attempt
starts (its id, the step it resumed from, its world size), one line per step (the rows' ids, how many) and a
``final`` line with a digest of the rank's parameters. :func:`audit` replays the attempts in order: the
steps an attempt trained after the checkpoint the next attempt resumed from were trained again, so they
count as redone, not as trained; what is left must be every planned sample exactly once.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


class Ledger:
    """One rank's ledger file (does nothing without a directory)."""

    def __init__(self, directory: str | None, rank: int, attempt: str, resumed_from: int, world: int,
                 node: str = "local") -> None:
        self.file, self.rank, self.attempt = None, rank, attempt
        if directory:
            Path(directory).mkdir(parents=True, exist_ok=True)
            self.file = open(Path(directory) / f"rank{rank}.jsonl", "a")  # noqa: SIM115 (closed in close())
            self._write({"kind": "attempt", "resumed_from": resumed_from, "world": world, "node": node,
                         "time": time.time()})

    def _write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"attempt": self.attempt, "rank": self.rank, **record}) + "\n")
            self.file.flush()

    def step(self, step: int, n: int, samples: int, loss: float, ids: Any, epochs: Any) -> None:
        self._write({"kind": "step", "step": step, "n": n, "samples": samples, "loss": loss, "ids": list(ids),
                     "epochs": list(epochs)})

    def close(self, step: int, samples: int, model: nn.Module) -> None:
        if self.file is None:
            return
        digest = torch.cat([p.detach().flatten().cpu() for p in model.parameters()]).numpy().tobytes()
        self._write({"kind": "final", "step": step, "samples": samples,
                     "param_digest": hashlib.sha256(digest).hexdigest()})
        self.file.close()


@dataclass
class Attempt:
    id: str
    resumed_from: int
    world: int
    started: float
    nodes: dict[int, str] = field(default_factory=dict)  # rank -> node id
    steps: int = 0  # last step it trained


@dataclass
class LedgerAudit:
    """The account of a run: samples planned, trained once (``counted``), trained again after a restart
    (``redone``), missing (``lost``) and trained twice in the kept history (``doubled``)."""

    planned: int
    counted: int
    redone: int
    lost: int
    doubled: int
    attempts: list[Attempt]
    kept: list[dict[str, Any]] = field(repr=False)  # the step records that count, in step order
    finals: dict[int, dict[str, Any]] = field(repr=False)  # rank -> final record of the last attempt

    def losses(self) -> dict[int, float]:
        """Step -> the sample-weighted mean loss over its ranks (the loss curve across restarts)."""
        sums: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for r in self.kept:
            sums[r["step"]][0] += r["loss"] * r["n"]
            sums[r["step"]][1] += r["n"]
        return {s: total / max(n, 1) for s, (total, n) in sorted(sums.items())}


def read(directory: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for f in sorted(Path(directory).glob("rank*.jsonl")) for line in f.read_text().splitlines()]


def audit(directory: str | Path, total_samples: int, batch_size: int) -> LedgerAudit:
    """Replay the ledger of a finished run (see the module docstring)."""
    records = read(directory)
    attempts: dict[str, Attempt] = {}
    for r in records:
        if r["kind"] == "attempt":
            attempt = attempts.setdefault(r["attempt"], Attempt(r["attempt"], r["resumed_from"], r["world"], r["time"]))
            attempt.started = min(attempt.started, r["time"])
            attempt.nodes[r["rank"]] = r.get("node", "local")
    order = sorted(attempts.values(), key=lambda a: a.started)
    # an attempt's steps count up to where the next attempt resumed; the rest were trained again
    until = {a.id: (b.resumed_from if b is not None else float("inf"))
             for a, b in zip(order, [*order[1:], None], strict=True)}
    steps = [r for r in records if r["kind"] == "step"]
    for r in steps:
        attempts[r["attempt"]].steps = max(attempts[r["attempt"]].steps, r["step"])
    kept = sorted((r for r in steps if r["step"] <= until[r["attempt"]]), key=lambda r: (r["step"], r["rank"]))
    redone = sum(r["n"] for r in steps if r["step"] > until[r["attempt"]])
    per_step: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in kept:
        per_step[r["step"]].append(r)
    lost = doubled = 0
    for step in range(1, -(-total_samples // batch_size) + 1):
        planned = min(batch_size, total_samples - (step - 1) * batch_size)
        got = sum(r["n"] for r in per_step.get(step, []))
        ranks = [r["rank"] for r in per_step.get(step, [])]
        lost += max(0, planned - got)
        doubled += max(0, got - planned) + (len(ranks) - len(set(ranks)))
    last = order[-1].id if order else None
    finals = {r["rank"]: r for r in records if r["kind"] == "final" and r["attempt"] == last}
    return LedgerAudit(planned=total_samples, counted=sum(r["n"] for r in kept), redone=redone, lost=lost,
                       doubled=doubled, attempts=order, kept=kept, finals=finals)
