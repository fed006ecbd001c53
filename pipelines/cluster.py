"""Where jobs meet Ray: getting a Ray, choosing resources, and Ray Train's scaling and run configuration.

:func:`connect` is the one way a job gets its Ray. Under ``ray job submit`` (or with ``RAY_ADDRESS`` set,
e.g. ``RAY_ADDRESS=auto`` for a cluster started with ``ray start``) it joins that cluster; otherwise it starts
a local Ray in this process. Either way the console stays the product's: workers' output stays in Ray's log
files (``RAY_LOG_TO_DRIVER=1`` forwards it, for debugging), Ray's progress bars for Data are off, and a failure
still reaches the driver as an exception with its cause.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from diffae_core import storage

# What a local Ray on this machine needs (loopback only, no usage stats, no token auth for a private
# single-node instance); a setting already in the environment wins.
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                 "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "1.0"}


def local_cpus() -> int:
    """Logical CPUs of a local Ray: twice the cores (at least 4), so that Ray Train workers, each reserving
    a CPU, leave Ray Data tasks room to feed them on a small machine (each worker still computes with one
    thread: Ray sets OMP_NUM_THREADS=1)."""
    return max(4, 2 * (os.cpu_count() or 1))


def startup_concurrency(num_cpus: int) -> dict[str, str]:
    """Ray's setting (an environment variable the local raylet reads) for how many worker processes it starts
    at once: twice the logical CPUs. Ray's default is the machine's cores (2 here), and its raylet prints
    "N PYTHON worker processes have been started ... Nx the maximum expected startup concurrency" to the
    driver's terminal from four times that: a job that is working as meant (train workers, Ray Data
    actors, Serve replicas: about 14 processes in `make demo`) would show it as if something failed."""
    return {"RAY_worker_maximum_startup_concurrency": str(2 * num_cpus)}


def quiet_console() -> None:
    """Keep Ray's internal chatter off this process's terminal; it stays in Ray's log files.

    Ray's own loggers write to the terminal through console handlers; those now pass only errors (a failed
    task, a job that cannot run), while Ray Data's session log file keeps everything. Ray Data's progress
    bars, which would bury the job's own lines, are off.
    """
    import ray.data

    for name in ("ray", "ray.data"):
        for handler in logging.getLogger(name).handlers:
            if getattr(handler, "stream", None) in (sys.stdout, sys.stderr):
                handler.setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False


def native_stderr_to_ray_logs() -> Path | None:
    """Send what Ray's C++ core worker in this process writes to file descriptor 2 into Ray's log directory.

    Besides its log file, Ray's core worker copies its error-level lines to fd 2, also for conditions that
    are not failures (e.g. "Actor ... has constructor arguments in the object store and max_restarts > 0"
    for every Ray Data actor pool). Python's ``sys.stderr`` (tracebacks, warnings, progress bars, Ray's own
    error logs) stays on the terminal: only the descriptor underneath moves. Returns the file, or None when
    Ray's log directory on this machine is not found (then nothing changes).
    """
    logs = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray" / "session_latest" / "logs"
    if not logs.is_dir():
        return None
    path = logs / f"driver-native-{os.getpid()}.err"
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stderr.flush()
    os.dup2(target, 2)
    os.close(target)
    for name in ("ray", "ray.data"):  # Ray's console handlers write to the old stderr object: point them back
        for handler in logging.getLogger(name).handlers:
            if getattr(handler, "stream", None) is sys.stderr:
                handler.setStream(terminal)
    sys.stderr = terminal
    return path


def connect(num_cpus: int | None = None, num_gpus: int | None = None, **init_kwargs: Any) -> None:
    """Make sure this process is connected to Ray (see the module docstring); a no-op when it already is.

    num_cpus / num_gpus size a local Ray (default :func:`local_cpus`; GPUs as detected) and are ignored when
    joining a cluster, which has its own resources.
    """
    import ray

    if ray.is_initialized():
        return
    log_to_driver = os.environ.get("RAY_LOG_TO_DRIVER", "0").lower() in ("1", "true")
    quiet_console()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=log_to_driver, **init_kwargs)
    else:
        for key, value in {**LOCAL_RAY_ENV, **startup_concurrency(num_cpus or local_cpus())}.items():
            os.environ.setdefault(key, value)
        ray.init(address="local", num_cpus=num_cpus or local_cpus(), num_gpus=num_gpus, include_dashboard=False,
                 log_to_driver=log_to_driver, **init_kwargs)
    if not log_to_driver:  # RAY_LOG_TO_DRIVER=1 asks for everything on the terminal
        native_stderr_to_ray_logs()


def on_this_node() -> Any:
    """A scheduling strategy that keeps an actor on the driver's node: the job's bookkeeping actors (skip
    counts, progress) must outlive any worker node, which an elastic run may lose at any time."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


# ---- resources ---------------------------------------------------------------------------------------
def cluster_gpus() -> float:
    """How many GPUs the connected Ray cluster has (0 on a CPU-only cluster)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def inference_gpus(requested: float | None) -> float:
    """GPUs per inference actor: the request, or 1 when the cluster has any GPU and none was requested."""
    if requested is not None:
        if requested < 0:
            raise ValueError(f"--num-gpus must be >= 0, got {requested}")
        return requested
    return 1.0 if cluster_gpus() > 0 else 0.0


def inference_device(num_gpus: float) -> torch.device:
    """The device an actor granted ``num_gpus`` GPUs computes on (Ray sets CUDA_VISIBLE_DEVICES)."""
    return torch.device("cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu")


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def worker_range(value: int | str) -> tuple[int, int]:
    """``--num-workers``: ``N`` (fixed) or ``MIN-MAX`` (elastic) -> (min, max)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(value))
    if not match:
        raise ValueError(f"num_workers must be N or MIN-MAX (e.g. 4 or 2-8), got {value!r}")
    low = int(match.group(1))
    high = int(match.group(2) or low)
    if not 1 <= low <= high:
        raise ValueError(f"num_workers needs 1 <= MIN <= MAX, got {value!r}")
    return low, high


# ---- Ray Train ------------------------------------------------------------------------------------
def ray_storage(uri: str, endpoint: str | None = None) -> tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for ``ray.train.RunConfig``: a local absolute path with no
    filesystem (Ray's default), or ``bucket/prefix`` plus an S3 filesystem that carries the endpoint."""
    fs, path = storage.filesystem(uri, endpoint)
    return (path, None) if isinstance(fs, pafs.LocalFileSystem) else (path, fs)


def scaling_config(num_workers: int | str, use_gpu: bool, cpus_per_worker: float,
                   resize_interval_s: float = 60.0, extra_resources: dict[str, float] | None = None) -> Any:
    """Ray Train's ScalingConfig: a fixed worker count, or elastic (min, max) resized every
    ``resize_interval_s`` seconds while the group is healthy."""
    import ray.train

    low, high = worker_range(num_workers)
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {}), **(extra_resources or {})}
    kwargs: dict[str, Any] = {"num_workers": low if low == high else (low, high)}
    if low != high:
        kwargs["elastic_resize_monitor_interval_s"] = resize_interval_s
    return ray.train.ScalingConfig(use_gpu=use_gpu, resources_per_worker=resources, **kwargs)


def run_config(name: str, storage_uri: str, endpoint: str | None, max_failures: int, keep_checkpoints: int) -> Any:
    """Ray Train's RunConfig: where checkpoints go, how many are kept, how many restarts are allowed."""
    import ray.train

    path, fs = ray_storage(storage_uri, endpoint)
    return ray.train.RunConfig(
        name=name, storage_path=path, storage_filesystem=fs,
        failure_config=ray.train.FailureConfig(max_failures=max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
    )
