"""Training progress on the driver's console: a bar on a terminal, one line per report in logs.

Rank 0 of a Ray Train run posts its metrics and events (a resume, a fault) to a small actor,
:class:`ProgressBoard`; the driver polls it while ``fit()`` runs and draws them itself. Ray's forwarding of
worker output is not involved, so the console shows the product's lines and nothing else of the workers
(their own logs stay in Ray's log files). A job that trains in the driver's process (the classifier) feeds
a :class:`ConsoleProgress` directly.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Any

import ray
from tqdm import tqdm

from .cluster import on_this_node


class ConsoleProgress:
    """Draws progress for one run. ``bar`` None: a bar when stdout is a terminal, else lines (job logs)."""

    def __init__(self, label: str, total_samples: int, batch_size: int, unit: str, bar: bool | None = None) -> None:
        self.label, self.total, self.batch, self.unit = label, total_samples, batch_size, unit
        use_bar = sys.stdout.isatty() if bar is None else bar
        self.bar = tqdm(total=total_samples, desc=label, unit=unit, dynamic_ncols=True) if use_bar else None

    def update(self, metrics: dict[str, Any], final: bool = False) -> None:
        samples, loss, rate = metrics["samples_seen"], metrics["loss"], metrics["samples_per_second"]
        if self.bar is not None:
            self.bar.n = samples  # a resumed run goes back to its checkpoint
            self.bar.set_postfix_str(f"loss {loss:.4f} {rate:.1f} {self.unit}/s", refresh=True)
            return
        print(f"[{self.label}] step {metrics['step']}/{-(-self.total // self.batch)} samples {samples}/{self.total} "
              f"({100 * samples / self.total:.1f}%) loss {loss:.4f} {rate:.1f} {self.unit}/s", flush=True)

    def event(self, text: str) -> None:
        line = f"[{self.label}] {text}"
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Posts from rank 0 (``("update", metrics)`` / ``("event", text)``), taken by the driver in order."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, Any]] = []

    def post(self, kind: str, payload: Any) -> None:
        self.posts.append((kind, payload))

    def take(self) -> list[tuple[str, Any]]:
        posts, self.posts = self.posts, []
        return posts


class ProgressReporter:
    """The worker side: what :func:`pipelines.training.run_loop` calls on rank 0. Picklable (an actor handle)."""

    def __init__(self, board: Any) -> None:
        self.board = board

    def update(self, metrics: dict[str, Any], final: bool = False) -> None:
        ref = self.board.post.remote("update", metrics)
        if final:  # the last update must be on the board before fit() returns to the driver
            ray.get(ref)

    def event(self, text: str) -> None:
        ray.get(self.board.post.remote("event", text))


def _deliver(board: Any, console: ConsoleProgress) -> None:
    for kind, payload in ray.get(board.take.remote()):
        if kind == "update":
            console.update(payload)
        else:
            console.event(payload)


@contextlib.contextmanager
def driver_progress(console: ConsoleProgress, interval_s: float = 0.5) -> Iterator[ProgressReporter]:
    """While the block runs, a board actor whose posts a thread draws on ``console``; yields the reporter to
    hand to the workers. Everything posted before the block ends is drawn."""
    board = ProgressBoard.options(scheduling_strategy=on_this_node()).remote()
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(interval_s):
            _deliver(board, console)

    thread = threading.Thread(target=poll, name="diffae-progress", daemon=True)
    thread.start()
    try:
        yield ProgressReporter(board)
    finally:
        stop.set()
        thread.join()
        _deliver(board, console)
        console.close()
        ray.kill(board)
