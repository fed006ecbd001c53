"""`ray job submit` of a tiny training job against a real `ray start --head`: the job succeeds, its logs
show progress and the count of corrupt images, and its bundle appears and loads."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, micro_config
from PIL import Image

from diffae_core import DiffAE

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def ray_cli(*args: str, env: dict, timeout: float = 180, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.fixture
def ray_head():
    """A real head (`ray start --head`) on loopback with every port chosen free; yields (dashboard URL, env)."""
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # Unix socket paths must stay under 108 bytes
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dashboard, "--node-manager-port": free_port(),
             "--object-manager-port": free_port(), "--dashboard-agent-listen-port": free_port(),
             "--dashboard-agent-grpc-port": free_port(), "--metrics-export-port": free_port(),
             "--runtime-env-agent-port": free_port(), "--ray-client-server-port": free_port()}
    args = ["start", "--head", "--node-ip-address=127.0.0.1", "--num-cpus=4", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats",
            *(f"{k}={v}" for k, v in ports.items())]
    started = ray_cli(*args, env=env)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_cluster(temp_dir: str, grace: float = 15.0) -> None:
    """Stop the head started with ``temp_dir``, and only it.

    `ray stop` would kill every Ray process on the machine (other test clusters, this suite's
    fixture); the head's own processes are found by their command lines, which all name ``temp_dir``.
    Its workers exit when their raylet does.
    """
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmdline:
            pids.append(int(proc.name))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.5)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_ray_job_submit_trains_and_writes_a_bundle(ray_head, tmp_path):
    address, env = ray_head
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (18, 18, 3), dtype=np.uint8)).save(images / f"{i:02d}.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    config = tmp_path / "tiny.json"
    model = micro_config().to_dict()
    config.write_text(json.dumps({"model": {k: model[k] for k in ("name", "unet", "encoder", "latent")},
                                  "batch_size": 8, "lr": 1e-3, "ema_warmup_steps": 2, "total_samples": 32,
                                  "checkpoint_every": 16, "grid_every": 32, "log_every": 1, "grid_images": 2,
                                  "grid_steps": 2}))
    runs = tmp_path / "runs"
    train = shlex.join(["python", "-m", "pipelines.train_autoencoder", "--data", str(images), "--storage", str(runs),
                        "--name", "submitted", "--config", str(config), "--cpus-per-worker", "0.5"])
    # The runtime env operators use (cluster/runtime_env.yaml): Ray's packager uploads the checkout without
    # what it excludes, and the job runs from that upload.
    submit = ray_cli(
        "job", "submit", f"--address={address}", "--runtime-env", "cluster/runtime_env.yaml", "--",
        "bash", "-c", f"test ! -e tests && test ! -e .venv && test -f pipelines/jobkit.py && {train}",
        env=env, timeout=480, cwd=REPO,
    )
    logs = submit.stdout + submit.stderr
    print(logs[-4000:])
    assert submit.returncode == 0, logs[-4000:]
    assert "succeeded" in logs
    assert "[train] step 4/4 samples 32/32" in logs  # progress lines reach the job logs
    assert "skipped 1 unreadable image(s)" in logs
    bundle = runs / "submitted" / "bundle"
    assert (bundle / "manifest.json").is_file()
    assert DiffAE.load(bundle).image_size == 16
    saved = json.loads((runs / "submitted" / "config.json").read_text())
    assert saved["config"]["model"]["train"]["total_samples"] == 32
