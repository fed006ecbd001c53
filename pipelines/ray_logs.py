"""Quiet two kinds of Ray Train log lines that bury the demo's own output (a worker setup hook).

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
_REPORT_LOGGER = "ray.train.v2._internal.execution.context"


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
    logging.getLogger(_REPORT_LOGGER).addFilter(_DropMessages("Reporting training result"))
