"""Where a training rank's rows come from, and where it was when a checkpoint was taken.

:class:`ShardStream` reads a Ray Train dataset shard (Ray Data, streamed) as one endless sequence of epochs.
Ray Data starts an epoch of a split dataset only when every rank asks for it (a barrier), while ranks of a
data-parallel step must all reach the same collectives. So a rank never opens the next epoch on its own:
each step the ranks agree (one tiny all-reduce) whether any of them ran out, and if so every rank reads the
rest of its current epoch into a buffer and all of them open the next epoch together. Ranks that train
different numbers of rows per step (a global batch the world size does not divide) therefore never wait
for each other at the barrier.

:class:`EpochSampler` draws batches of row indices of an in-memory shard (the latent DPM's latents).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from .training import LoopContext, derived_seed


class _Collate(NumpyBatchCollateFn):
    """numpy batch -> (images [n,3,S,S] float32 CPU tensor, ids). Ids are strings, which torch cannot hold."""

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, list[str]]:
        return torch.from_numpy(np.ascontiguousarray(batch["image"], dtype=np.float32)), [str(i) for i in batch["id"]]


@dataclass
class Position:
    """A rank's place in its shard: ``epoch``, rows of it already trained, and the rows its previous epoch
    had (0 before the first epoch ended); what a checkpoint keeps per rank."""

    epoch: int = 0
    offset: int = 0
    previous_epoch_rows: int = 0


def reshard(saved: Sequence[Position | dict], world: int) -> Position:
    """Where each of ``world`` ranks resumes, given every saved rank's position.

    The same world size resumes each rank exactly where it was. Another one (elastic resize, lost node)
    shares the rows already trained in the oldest epoch out evenly: ranks still in it count their offset,
    ranks already in the next epoch trained all of theirs.
    """
    positions = [p if isinstance(p, Position) else Position(**p) for p in saved]
    epoch = min(p.epoch for p in positions)
    trained = sum(p.offset if p.epoch == epoch else p.previous_epoch_rows for p in positions)
    return Position(epoch, trained // world)


class ShardStream:
    """A rank's Ray Data shard as an endless stream of rows, cut into batches of any size (see module doc).

    Epoch e is shuffled with a local buffer seeded from (seed, e, rank). ``start`` is where to resume: its
    first ``offset`` rows of epoch ``epoch`` are skipped.
    """

    def __init__(self, shard: Any, ctx: LoopContext, seed: int, batch_rows: int, shuffle_buffer: int,
                 start: Position | None = None) -> None:
        self.shard, self.ctx, self.seed = shard, ctx, seed
        self.batch_rows = max(1, batch_rows)
        self.shuffle_buffer = max(shuffle_buffer, self.batch_rows)
        start = start or Position()
        self.position = Position(start.epoch, start.offset)
        self._epoch, self._skip, self._epoch_rows = start.epoch, start.offset, 0
        self._iter: Any = None
        self._exhausted = False
        self._buffer: deque[tuple[torch.Tensor, list[str], int]] = deque()  # rows read, not yet trained
        self._buffered = 0

    # -- reading ---------------------------------------------------------------------------------
    def _open(self) -> None:
        self._iter = iter(self.shard.iter_torch_batches(
            batch_size=self.batch_rows, collate_fn=_Collate(), drop_last=False, prefetch_batches=2,
            local_shuffle_buffer_size=self.shuffle_buffer,
            local_shuffle_seed=derived_seed(self.seed, self._epoch, self.ctx.rank) % (2**31),
        ))
        self._exhausted, self._epoch_rows = False, 0

    def _read_chunk(self) -> bool:
        """Buffer the next chunk of the current epoch; False when the epoch has no more rows."""
        if self._iter is None:
            self._open()
        while not self._exhausted:
            chunk = next(self._iter, None)
            if chunk is None:
                self._exhausted = True
                break
            x, ids = chunk
            self._epoch_rows += len(ids)
            if self._skip:  # resumed mid-epoch: drop the rows trained before the checkpoint
                drop = min(self._skip, len(ids))
                self._skip -= drop
                x, ids = x[drop:], ids[drop:]
            if ids:
                self._buffer.append((x, ids, self._epoch))
                self._buffered += len(ids)
                return True
        return False

    def _next_epoch(self) -> None:
        """Every rank at once: finish reading the current epoch, then open the next one together."""
        while self._read_chunk():
            pass
        if self._epoch_rows == 0:
            raise RuntimeError(
                f"worker {self.ctx.rank} received no images in epoch {self._epoch}: the data set is empty, "
                "smaller than the number of workers, or every image was skipped as unreadable")
        self.position.previous_epoch_rows = self._epoch_rows
        self._epoch, self._skip = self._epoch + 1, 0
        self._open()

    def _anyone_short(self, short: bool) -> bool:
        flag = torch.tensor([float(short)], device=self.ctx.device)
        return bool(self.ctx.all_sum(flag).item() > 0)

    # -- taking --------------------------------------------------------------------------------------
    def take(self, n: int) -> tuple[torch.Tensor | None, list[str], list[int]]:
        """The next n rows: (images [n,3,S,S] float32 in [-1,1], ids, epoch of each row); images is None
        for n == 0. A collective: every rank calls it once per step."""
        while self._buffered < n and self._read_chunk():
            pass
        while self._anyone_short(self._buffered < n):
            self._next_epoch()
            while self._buffered < n and self._read_chunk():
                pass
        return self._pop(n)

    def _pop(self, n: int) -> tuple[torch.Tensor | None, list[str], list[int]]:
        parts, ids, epochs = [], [], []
        while len(ids) < n:
            x, chunk_ids, epoch = self._buffer.popleft()
            use = min(n - len(ids), len(chunk_ids))
            if use < len(chunk_ids):
                self._buffer.appendleft((x[use:], chunk_ids[use:], epoch))
            parts.append(x[:use])
            ids.extend(chunk_ids[:use])
            epochs.extend([epoch] * use)
            if epoch == self.position.epoch:
                self.position.offset += use
            else:
                self.position.epoch, self.position.offset = epoch, use
        self._buffered -= n
        return (torch.cat(parts) if parts else None), ids, epochs


class EpochSampler:
    """Batches of row indices: one random permutation per epoch, batches may straddle epochs.

    Its state (permutation, position, generator) is checkpointed so a resumed run continues the stream.
    """

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.gen = n, generator
        self.perm = torch.empty(0, dtype=torch.int64, device=generator.device)
        self.pos = 0
        self.epoch = 0

    def next(self, batch: int) -> torch.Tensor:
        parts, need = [], batch
        while need > 0:
            if self.pos == self.perm.numel():
                self.perm = torch.randperm(self.n, generator=self.gen, device=self.gen.device)
                self.pos, self.epoch = 0, self.epoch + 1
            take = min(need, self.perm.numel() - self.pos)
            parts.append(self.perm[self.pos:self.pos + take])
            self.pos, need = self.pos + take, need - take
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64, device=self.gen.device)

    def state_dict(self) -> dict:
        return {"perm": self.perm.cpu(), "pos": self.pos, "epoch": self.epoch, "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.perm = state["perm"].to(self.gen.device)
        self.pos, self.epoch = int(state["pos"]), int(state["epoch"])
        self.gen.set_state(state["gen"])
