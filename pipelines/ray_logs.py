"""Keep the driver's console readable: quiet two kinds of Ray Train log lines, and keep progress bars tidy.

On a single machine started without the dashboard, Ray Train's placement-group cleaner cannot reach the
State API and warns about it every second ("Failed to query Ray Train Controller actor state", harmless:
ray-notes.md), and every rank logs one INFO line per ``ray.train.report``. ``quiet_train_logs`` runs in
each Ray worker process (``runtime_env={"worker_process_setup_hook": ...}``) and drops exactly those
lines; every other warning and error still reaches the driver. Kept free of heavy imports: it runs in
every worker.
"""

from __future__ import annotations

import logging

SETUP_HOOK = "pipelines.ray_logs.quiet_train_logs"
_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"

def _report_logger_name() -> str:
    """Ray Train names this module's logger by its file path (``logging.getLogger(__file__)``)."""
    import os

    import ray

    return os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_train_logs() -> None:
    """Drop the cleaner's State-API warning and the per-report INFO lines in this process."""
    logging.getLogger(_CLEANER_LOGGER).addFilter(_DropMessages("Failed to query Ray Train Controller actor state"))
    logging.getLogger(_report_logger_name()).addFilter(_DropMessages("Reporting training result"))


_closed_bars: set[str] = set()


def tolerate_replayed_bar_updates() -> None:
    """Make this driver ignore progress-bar updates that arrive after their bar was closed.

    Ray forwards a worker's last output lines to the driver twice when the worker finishes (seen with
    Ray Train: the final "[train] done" line prints twice). For a ``tqdm_ray`` bar the replayed
    "closed" state opens a fresh bar that is never closed and is redrawn under every later line of
    the driver. Closed bars are remembered by uuid and their replays dropped. Idempotent.
    """
    from ray.experimental import tqdm_ray

    manager = tqdm_ray._BarManager
    if getattr(manager, "_diffae_tolerant", False):
        return
    original = manager._process_state_update_locked

    def process(self, state):  # noqa: ANN001, ANN202 (Ray's private signature)
        uuid = state.get("uuid")
        if uuid in _closed_bars:
            return
        if state.get("closed"):
            _closed_bars.add(uuid)
        original(self, state)

    manager._process_state_update_locked = process
    manager._diffae_tolerant = True
