"""A job's console shows the product's lines only: Ray's internal chatter that is not a failure goes to Ray's
log files, and a real failure still shows its cause. Each case runs a fresh process with its own local Ray
(pipelines.cluster.connect), as `make demo` and every job do."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[1]
# What Ray prints on its own: its C++ log lines ("[date E pid tid] file.cc:N: ..."), its Python log lines
# ("date INFO worker.py:N -- ...") and the raylet's forwarded warnings.
RAY_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+ [IWEF] \d+ \d+\]|^\d{4}-\d\d-\d\d [\d:,]+\s+(INFO|WARNING|ERROR) "
                      r"|\(raylet\)")


def run_job(body: str, **env_vars: str) -> tuple[subprocess.CompletedProcess, Path]:
    tmp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    script = "from pipelines.cluster import connect\nconnect(num_cpus=4)\n" + textwrap.dedent(body)
    env = {**os.environ, "RAY_TMPDIR": str(tmp), "PYTHONPATH": str(ROOT), **env_vars}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, env=env,
                          cwd=tmp)
    return done, tmp / "ray" / "session_latest" / "logs"


def test_a_ray_data_actor_pool_prints_only_the_jobs_own_output():
    done, logs = run_job("""
        import ray
        class Double:
            def __call__(self, batch):
                return {"id": batch["id"] * 2}
        rows = ray.data.range(64).map_batches(Double, compute=ray.data.ActorPoolStrategy(size=2), batch_size=8)
        print("result", sorted(r["id"] for r in rows.take_all())[-1])
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (done.stdout + done.stderr).splitlines()
    assert "result 126" in lines
    assert not [line for line in lines if RAY_LINE.search(line)], "\n".join(lines)
    native = list(logs.glob("driver-native-*.err"))
    assert native, sorted(p.name for p in logs.iterdir())  # Ray's own lines went here instead


def test_a_failing_task_still_shows_its_cause():
    done, _ = run_job("""
        import ray
        @ray.remote
        def broken():
            raise ValueError("no such file: data.parquet")
        ray.get(broken.remote())
    """)
    assert done.returncode != 0
    assert "ValueError" in done.stderr and "no such file: data.parquet" in done.stderr, done.stderr[-3000:]


MANY_ACTORS = """
    import ray
    @ray.remote(num_cpus=0)
    class Ping:
        def ping(self):
            return 1
    actors = [Ping.remote() for _ in range(16)]
    print("pings", sum(ray.get([a.ping.remote() for a in actors])))
    import time
    time.sleep(2)  # the driver prints the raylet's warnings from a background thread: give it time
"""


@pytest.mark.parametrize("concurrency", [None, "2"], ids=["ours", "rays-default"])
def test_many_worker_processes_raise_no_raylet_warning(concurrency):
    """16 actors (as many worker processes as `make demo` has at its peak, and more) start without the
    raylet's "worker processes have been started" warning on the terminal; with Ray's default startup
    concurrency for this machine (2 cores) the same job does print it, so the check is real."""
    extra = {} if concurrency is None else {"RAY_worker_maximum_startup_concurrency": concurrency}
    done, _ = run_job(MANY_ACTORS, **extra)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (done.stdout + done.stderr).splitlines()
    assert "pings 16" in lines
    warned = [line for line in lines if "worker processes have been started" in line]
    assert bool(warned) == (concurrency is not None), "\n".join(lines)
