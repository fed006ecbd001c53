"""Shared helpers for the benchmark scripts: thread pinning, timing, machine description."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def setup_threads(threads: int | None) -> int:
    """Pin intra-op threads (timings with OpenMP oversubscription swing by 10x on 2 cores)."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def reuse_heap_by_default(device: torch.device) -> bool:
    """Process-wide glibc heap reuse when diffae_core.performance's defaults for ``device`` turn it on
    (imported here, not at the top: compare_core.py imports this module next to an older diffae_core)."""
    from diffae_core.performance import PerformanceOptions, reuse_heap

    return PerformanceOptions.for_device(device).heap_reuse and reuse_heap()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of each of ``repeats`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def cpu_matmul_rate(n: int = 1024, repeats: int = 5, warmup: int = 1) -> float:
    """Sustained fp32 FLOP/s of an n x n matmul at this thread count (median of ``repeats``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = median(time_calls(lambda: a @ b, torch.device("cpu"), repeats=repeats, warmup=warmup))
    return 2 * n**3 / t


def machine() -> str:
    """One line naming the machine the numbers come from."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu} x{os.cpu_count()} ({torch.get_num_threads()} threads), torch {torch.__version__}"


def write_block(path: Path, block: str, begin: str, end: str) -> None:
    """Replace the part of ``path`` between the ``begin`` and ``end`` markers with ``block`` (which carries
    the markers itself); append it when the file has none. The hand-written text around it stays."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
