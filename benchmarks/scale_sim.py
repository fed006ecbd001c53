"""Scale-out on a real multi-node Ray on this machine: training through the loss of a node (elastic), serving
through the loss of a node, and autoscaling up and down. Prints each scenario's timeline and writes a table
to benchmarks/RESULTS.md.

    python benchmarks/scale_sim.py [--scenarios train serve autoscale] [--no-write]

The cluster is Ray's own multi-node harness (``ray.cluster_utils.Cluster``): a head and worker nodes, each
its own raylet with its own logical resources, all on this machine. A node dies by SIGKILL of its raylet and
its workers (``remove_node(allow_graceful=False)``), not by a drain. The scenario functions are also what
tests/test_scale_out.py and tests/test_serve_scale.py run, with smaller sizes, and assert on.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_block  # noqa: E402

HEAD_RESOURCE = "head_node"  # only the head has it: pins the app's light deployments there
TRAIN_NODE = {"num_cpus": 1, "resources": {"trainer_slot": 1}}
MODEL_NODE = {"num_cpus": 2, "resources": {"model_node": 2}}


# ---- shared machinery ------------------------------------------------------------------------------------
@dataclass
class Timeline:
    """Events of a scenario, seconds from its start."""

    start: float = field(default_factory=time.time)
    events: list[tuple[float, str]] = field(default_factory=list)

    def mark(self, label: str, at: float | None = None) -> float:
        at = time.time() if at is None else at
        self.events.append((round(at - self.start, 1), label))
        return at

    def lines(self) -> list[str]:
        return [f"  {t:7.1f} s  {label}" for t, label in sorted(self.events)]


def wait_until(condition: Callable[[], Any], timeout: float, what: str, errors: list | None = None,
               worker: threading.Thread | None = None) -> float:
    """Poll ``condition`` every half second; the time it became true. AssertionError after ``timeout``, or
    as soon as ``worker`` (the thread that should make it true) has ended; ``errors`` of it are re-raised."""
    deadline = time.time() + timeout
    while not condition():
        if errors:
            raise errors[0]
        if worker is not None and not worker.is_alive():
            raise errors[0] if errors else AssertionError(f"the run ended before {what}")
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} ({resources_now()})")
        time.sleep(0.5)
    return time.time()


@contextlib.contextmanager
def worker_nodes(cluster: Any, count: int, spec: dict[str, Any], app: str | None = None) -> Iterator[list[Any]]:
    """``count`` worker nodes of ``spec`` for a scenario, and on leaving (failure included) the Serve ``app``
    deleted and every worker node killed, so that a failed scenario leaves nothing on the cluster behind."""
    nodes = [cluster.add_node(**spec) for _ in range(count)]
    cluster.wait_for_nodes()
    try:
        yield nodes
    finally:
        if app is not None:
            from ray import serve

            with contextlib.suppress(Exception):  # the app may never have been deployed
                serve.delete(app)
        for node in list(cluster.worker_nodes):
            cluster.remove_node(node, allow_graceful=False)


def resources_now() -> str:
    """Each live node's logical resources and what the cluster has free, for timeout messages."""
    import ray

    return "; ".join(f"{n['NodeID'][:8]} {n['Resources']}" for n in ray.nodes() if n["Alive"]) + \
        f"; available {ray.available_resources()}"


def node_alive(node_id: str) -> bool:
    import ray

    return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())


def start_cluster(head_cpus: int = 4) -> Any:
    """A head node (this process's Ray) with ``head_cpus`` logical CPUs and the head resource."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    for key, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                       "RAY_AUTH_MODE": "disabled", "RAY_metrics_report_interval_ms": "1000"}.items():
        os.environ.setdefault(key, value)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "include_dashboard": False,
                                                           "resources": {HEAD_RESOURCE: 100}})
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster


# ---- training through the loss of a node --------------------------------------------------------------
def write_parquet(uri: str, n_images: int, corrupt: list[bytes], size: int = 16) -> None:
    """``n_images`` built-in ``shapes`` as PNG rows (id, image) in two parquet files at ``uri``, plus rows of
    ``corrupt`` bytes (which training must skip and count once)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from diffae_core import storage
    from diffae_core.datasets import render_shape

    images, ids = [], []
    for i in range(n_images):
        buf = io.BytesIO()
        Image.fromarray(render_shape(i, size, 0)[0]).save(buf, format="PNG")
        images.append(buf.getvalue())
        ids.append(f"shapes-{i:04d}")
    images += corrupt
    ids += [f"corrupt-{i}" for i in range(len(corrupt))]
    fs, path = storage.filesystem(uri)
    for shard in range(2):
        with fs.open_output_stream(f"{path}/part-{shard}.parquet") as f:
            pq.write_table(pa.table({"id": ids[shard::2], "image": images[shard::2]}), f)


@dataclass
class TrainingLoss:
    timeline: Timeline
    audit: Any  # pipelines.ledger.LedgerAudit
    summary: dict[str, Any]


def _attempts(ledger: Path) -> list[dict[str, Any]]:
    from pipelines.ledger import read

    if not ledger.exists():
        return []
    return sorted((r for r in read(ledger) if r["kind"] == "attempt" and r["rank"] == 0), key=lambda r: r["time"])


def _trained_steps(ledger: Path, attempt: str | None = None) -> int:
    """The last step the ledger shows (of ``attempt``, or of any attempt)."""
    from pipelines.ledger import read

    if not ledger.exists():
        return 0
    return max((r["step"] for r in read(ledger) if r["kind"] == "step" and attempt in (None, r["attempt"])),
               default=0)


def _survivors(ledger: Path, after: float) -> dict[str, Any] | None:
    """The first 2-worker attempt started after ``after`` that trained two steps past its checkpoint, if any.
    (Ray Train may start more than one attempt after a loss, e.g. one that fails while the dead node is
    still being detected.)"""
    return next((a for a in _attempts(ledger) if a["world"] == 2 and a["time"] > after
                 and _trained_steps(ledger, a["attempt"]) >= a["resumed_from"] + 2), None)


def _train_in_thread(job: Any) -> tuple[threading.Thread, list, list]:
    from pipelines.train_autoencoder import train_autoencoder

    results: list = []
    errors: list = []

    def run() -> None:
        try:
            results.append(train_autoencoder(job))
        except BaseException as exc:  # noqa: BLE001 - re-raised by the caller
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, results, errors


def training_job(data: str, storage_uri: str, ledger: Path, steps: int, batch: int) -> Any:
    """An elastic demo16 run, one worker per training node, checkpoints every 4 steps."""
    import dataclasses

    from diffae_core.config import get_preset
    from pipelines.train_autoencoder import TrainJobConfig

    model = get_preset("demo16")
    model.train = dataclasses.replace(model.train, batch_size=batch, total_samples=batch * steps, warmup_steps=0,
                                      ema_warmup_steps=10)
    return TrainJobConfig(data=data, storage=storage_uri, name="elastic", model=model, num_workers="2-3",
                          cpus_per_worker=0.5, worker_resources={"trainer_slot": 1}, resize_interval_s=5,
                          max_failures=5, checkpoint_every=4 * batch, grid_every=10**12, log_every=4,
                          grid_images=2, ledger_dir=str(ledger), progress_bar=False)


def train_through_node_loss(cluster: Any, data: str, storage_uri: str, ledger: Path, steps: int, batch: int,
                            kill_after_step: int = 6, timeout: float = 600) -> TrainingLoss:
    """Three training nodes, ``--num-workers 2-3``; the node of rank 1 dies after ``kill_after_step`` steps
    and a node joins again once the survivors train. Returns the timeline and the ledger's account."""
    from pipelines.ledger import audit

    with worker_nodes(cluster, 3, TRAIN_NODE) as nodes:
        timeline = Timeline()
        thread, results, errors = _train_in_thread(training_job(data, storage_uri, ledger, steps, batch))
        # Ray Train may start with 2 workers while the third node comes up, and grow at the next resize:
        # the node dies once all 3 train.
        wait_until(lambda: _full_group(ledger, kill_after_step) is not None, timeout, "3 workers to train", errors,
                   thread)
        victim_id = next(a["node"] for a in _attempts_all(ledger, _full_group(ledger, kill_after_step))
                         if a["rank"] == 1)
        cluster.remove_node(next(n for n in nodes if n.node_id == victim_id), allow_graceful=False)
        killed = timeline.mark(f"kill the node of rank 1 after step {_trained_steps(ledger)}")
        timeline.mark("Ray marks the node dead", wait_until(lambda: not node_alive(victim_id), timeout, "node death"))
        trained = wait_until(lambda: _survivors(ledger, killed) is not None, timeout, "the survivors to train",
                             errors, thread)
        second = _survivors(ledger, killed)
        timeline.mark(f"restarted on 2 workers from step {second['resumed_from']} "
                      f"(sample {second['resumed_from'] * batch})", second["time"])
        timeline.mark("the 2 survivors train on", trained)
        cluster.add_node(**TRAIN_NODE)
        timeline.mark("a node joins")
        wait_until(lambda: _attempts(ledger)[-1]["world"] == 3 and _attempts(ledger)[-1]["time"] > second["time"],
                   timeout, "the group to grow back to 3 workers", errors, thread)
        third = _attempts(ledger)[-1]
        timeline.mark(f"grown back to 3 workers from step {third['resumed_from']}", third["time"])
        thread.join(timeout=timeout)
        if errors:
            raise errors[0]
        timeline.mark("run ends")
    return TrainingLoss(timeline, audit(ledger, batch * steps, batch), results[0].summary)


def _full_group(ledger: Path, steps: int) -> str | None:
    """The latest attempt, when it has 3 workers and trained to step ``steps``; else None."""
    attempts = _attempts(ledger)
    if attempts and attempts[-1]["world"] == 3 and _trained_steps(ledger, attempts[-1]["attempt"]) >= steps:
        return attempts[-1]["attempt"]
    return None


def _attempts_all(ledger: Path, attempt: str | None) -> list[dict[str, Any]]:
    """Every rank's record of ``attempt``."""
    from pipelines.ledger import read

    return [r for r in read(ledger) if r["kind"] == "attempt" and r["attempt"] == attempt]


# ---- serving -------------------------------------------------------------------------------------------
ON_HEAD = {"num_cpus": 0.25, "resources": {HEAD_RESOURCE: 0.01}, "min_replicas": 1, "max_replicas": 1}
ON_MODEL_NODES = {"num_cpus": 0.5, "resources": {"model_node": 0.5}, "health_check_period_s": 1.0}


def deploy(bundle: str, port: int, decoder: dict, encoder: dict) -> str:
    """The app with its model replicas on the model nodes and the rest on the head; its URL."""
    from serving.cli import start

    deployments = {"Ingress": ON_HEAD, "Classifier": ON_HEAD, "LatentSampler": ON_HEAD,
                   "Encoder": {**ON_MODEL_NODES, **encoder}, "Decoder": {**ON_MODEL_NODES, **decoder}}
    url = start({"bundle": bundle, "deployments": deployments, "limits": {"max_inflight": 256}},
                port=port, name="scale", route_prefix="/scale", proxy_location="HeadOnly")
    return f"{url}/scale"


def running(name: str) -> int:
    """RUNNING replicas of a deployment of the app, as Serve's status reports them."""
    from ray import serve

    return serve.status().applications["scale"].deployments[name].replica_states.get("RUNNING", 0)


def replicas_in_metrics(deployment: str, metric: str = "ray_serve_deployment_request_counter") -> int:
    """How many distinct replicas of a deployment of the app report ``metric`` (a Serve replica metric,
    exported by the node each replica runs on) over every live node's metrics port, as Prometheus scrapes.
    The replicas' own series, not the controller's health gauge: that one is re-sent only every 10 s
    (``RAY_SERVE_STATUS_GAUGE_REPORT_INTERVAL_S``) and was seen to miss scrapes for minutes on a loaded machine."""
    import ray

    line = re.compile(rf'^{metric}(?:_total)?{{(.*)}}')
    replicas = set()
    for node in ray.nodes():
        if node["Alive"] and node.get("MetricsExportPort"):
            text = urllib.request.urlopen(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", timeout=5).read()
            for m in filter(None, map(line.match, text.decode().splitlines())):
                labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
                if labels.get("application") == "scale" and labels.get("deployment") == deployment:
                    replicas.add(labels.get("replica"))
    return len(replicas)


def reconstruct_body(bundle: str, steps: int = 4) -> dict[str, Any]:
    import torch

    from diffae_core.bundle import read_config
    from diffae_core.images import png_bytes

    size = read_config(bundle).image_size
    image = png_bytes(torch.rand(3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    return {"image": base64.b64encode(image).decode(), "steps": steps, "seed": 0}


@dataclass
class ServingLoss:
    timeline: Timeline
    samples: list  # serving.loadgen.Sample of every request, in start order
    killed: float
    healed: float  # Serve runs the replicas again, on the surviving nodes
    victim: str


def serve_through_node_loss(cluster: Any, bundle: str, port: int, settle_s: float = 10.0) -> ServingLoss:
    """Encoder and Decoder at 2 replicas, one per node, on 3 model nodes, under 4 closed-loop clients; the node
    of a Decoder replica dies. Returns every request and when the replicas ran again."""
    from ray import serve

    from serving.loadgen import ClosedLoop

    with worker_nodes(cluster, 3, MODEL_NODE, app="scale") as nodes:
        spread = {"min_replicas": 2, "max_replicas": 2, "max_replicas_per_node": 1}
        url = deploy(bundle, port, decoder=spread, encoder=spread)
        handle = serve.get_deployment_handle("Decoder", app_name="scale")
        timeline = Timeline()
        load = ClosedLoop(url, "/v1/reconstruct", reconstruct_body(bundle), concurrency=4, max_requests=5000,
                          max_seconds=300, timeout_s=60).start()
        try:
            time.sleep(settle_s)
            placed = {handle.describe.remote().result(timeout_s=30)["node_id"] for _ in range(8)}
            victim = next(n for n in nodes if n.node_id in placed)
            cluster.remove_node(victim, allow_graceful=False)
            killed = timeline.mark("kill the node of a Decoder replica")
            timeline.mark("Ray marks the node dead", wait_until(lambda: not node_alive(victim.node_id), 120,
                                                                "node death"))
            healed = timeline.mark("2 Encoder and 2 Decoder replicas run again", wait_until(
                lambda: running("Decoder") == 2 and running("Encoder") == 2, 240, "replicas on the survivors"))
            time.sleep(settle_s)
        finally:
            samples = load.stop()
        timeline.mark("load stops")
    return ServingLoss(timeline, samples, killed, healed, victim.node_id)


@dataclass
class Autoscaling:
    timeline: Timeline
    replicas: list[tuple[float, int]]  # (seconds from the start, RUNNING Decoder replicas)
    up_s: float  # load start -> max replicas
    down_s: float  # load stop -> min replicas
    samples: list


ELASTIC_DECODER = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1, "max_ongoing_requests": 4,
                   "upscale_delay_s": 1.0, "downscale_delay_s": 4.0, "look_back_period_s": 2.0}


def autoscale(cluster: Any, bundle: str, port: int, clients: int = 8) -> Autoscaling:
    """The Decoder from 1 to 3 replicas under ``clients`` closed-loop clients, and back to 1 after the load."""

    from serving.loadgen import ClosedLoop

    with worker_nodes(cluster, 2, MODEL_NODE, app="scale"):
        url = deploy(bundle, port, decoder=ELASTIC_DECODER, encoder={"min_replicas": 1, "max_replicas": 1})
        wait_until(lambda: running("Decoder") == 1, 120, "one Decoder replica")
        timeline, replicas = Timeline(), []

        def at(n: int) -> Callable[[], bool]:
            def check() -> bool:
                replicas.append((round(time.time() - timeline.start, 1), running("Decoder")))
                return replicas[-1][1] == n
            return check

        load = ClosedLoop(url, "/v1/reconstruct", reconstruct_body(bundle), concurrency=clients, max_requests=5000,
                          max_seconds=240, timeout_s=60).start()
        started = timeline.mark(f"{clients} clients start")
        try:
            up = timeline.mark("3 Decoder replicas", wait_until(at(3), 180, "three Decoder replicas"))
            wait_until(lambda: replicas_in_metrics("Decoder") >= 3, 120, "three Decoder replicas in the metrics")
            timeline.mark("the metrics show requests served by 3 Decoder replicas")
        finally:
            samples = load.stop()
        stopped = timeline.mark("load stops")
        down = timeline.mark("1 Decoder replica", wait_until(at(1), 180, "the Decoder back at one replica"))
    return Autoscaling(timeline, replicas, up - started, down - stopped, samples)


def throughput_per_replicas(cluster: Any, bundle: str, port: int, counts: tuple[int, ...] = (1, 2, 3),
                            seconds: float = 30.0, clients: int = 8) -> dict[int, dict[str, Any]]:
    """Requests/s of /v1/reconstruct with the Decoder fixed at each replica count (same load)."""
    from ray import serve

    from serving.loadgen import ClosedLoop, summary

    out = {}
    with worker_nodes(cluster, 2, MODEL_NODE, app="scale"):
        for n in counts:
            url = deploy(bundle, port, decoder={"min_replicas": n, "max_replicas": n},
                         encoder={"min_replicas": 1, "max_replicas": 1})
            wait_until(lambda n=n: running("Decoder") == n, 180, f"{n} Decoder replicas")
            ClosedLoop(url, "/v1/reconstruct", reconstruct_body(bundle), concurrency=2, max_requests=4).run()  # warm-up
            out[n] = summary(ClosedLoop(url, "/v1/reconstruct", reconstruct_body(bundle), concurrency=clients,
                                        max_requests=10_000, max_seconds=seconds).run())
            serve.delete("scale")
    return out


# ---- the benchmark -------------------------------------------------------------------------------------
BEGIN, END = "<!-- scale_sim: begin -->", "<!-- scale_sim: end -->"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
DEMO_MODEL = Path(__file__).resolve().parents[1] / "assets" / "demo-model"


def scenario_lines(title: str, setup: str, timeline: Timeline, outcome: list[str]) -> list[str]:
    """A scenario's markdown: bold title and its set-up, the timeline as a code block, then the outcome."""
    return [f"**{title}** ({setup}):", "", "```", *timeline.lines(), "```", "", *outcome, ""]


def report_training(result: TrainingLoss) -> list[str]:
    a = result.audit
    return scenario_lines(
        "Training through the loss of a node", "demo16, 3 workers on 3 nodes, `--num-workers 2-3`, parquet on S3 "
        "(moto) with 2 corrupt rows", result.timeline,
        [f"Ledger: planned {a.planned}, counted {a.counted}, redone {a.redone}, lost {a.lost}, doubled {a.doubled}; "
         f"attempts (resumed from step, workers, last step) {[(x.resumed_from, x.world, x.steps) for x in a.attempts]};"
         f" skipped images {result.summary['skipped_images']}."])


def report_serving(result: ServingLoss) -> list[str]:
    from serving.loadgen import summary

    failed = [s for s in result.samples if s.status != 200]
    after = [s for s in result.samples if s.start > result.healed]
    last = max((s.end for s in failed), default=result.killed) - result.killed
    return scenario_lines(
        "Serving through the loss of a node", "demo model, Encoder and Decoder 2 replicas one per node on 3 nodes, "
        "4 closed-loop clients on /v1/reconstruct, 4 steps", result.timeline,
        [f"{len(failed)} of {len(result.samples)} requests failed ({summary(failed)['codes']}), the last one ended "
         f"{last:.1f} s after the kill; time to recovery (kill -> replicas running again) "
         f"{result.healed - result.killed:.1f} s; after it {summary(after)['codes']}."])


def report_autoscaling(result: Autoscaling, per_replicas: dict[int, dict[str, Any]]) -> list[str]:
    rows = [f"| {n} | {r['rps']:.2f} | {r.get('p50', 0):.0f} | {r.get('p95', 0):.0f} |" for n, r in per_replicas.items()]
    return scenario_lines(
        "Autoscaling", "Decoder min 1, max 3, target 1 ongoing request, upscale delay 1 s, downscale delay 4 s, "
        "8 closed-loop clients", result.timeline,
        [f"Scale up 1 -> 3 replicas: {result.up_s:.1f} s after the load started; scale down 3 -> 1: "
         f"{result.down_s:.1f} s after it stopped. Replicas over time: {result.replicas[::4]}.", "",
         "Throughput per Decoder replica count (fixed replicas, 8 clients, 30 s each):", "",
         "| Decoder replicas | req/s | p50 ms | p95 ms |", "|---|---|---|---|", *rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", nargs="+", choices=("train", "serve", "autoscale"),
                   default=["train", "serve", "autoscale"])
    p.add_argument("--steps", type=int, default=60, help="training steps (global batch 10)")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = p.parse_args(argv)
    import boto3
    from moto.server import ThreadedMotoServer

    from benchmarks.common import machine

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the S3 server's per-request access lines
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    s3_port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    server.start()
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{s3_port}"
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="scale")
    cluster = start_cluster()
    started = time.time()
    lines = [BEGIN, "## Scale-out on a multi-node Ray (`python benchmarks/scale_sim.py`)", "",
             f"Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {machine()}; 1-minute load "
             f"average at the start {os.getloadavg()[0]:.1f}. All nodes share this machine's 2 cores.", ""]
    try:
        if "train" in args.scenarios:
            write_parquet("s3://scale/data", 60, [b"not an image", b"\x89PNG\r\n\x1a\n truncated"])
            result = train_through_node_loss(cluster, "s3://scale/data", "s3://scale/runs",
                                             Path(tempfile.mkdtemp()) / "ledger", args.steps, 10)
            lines += report_training(result)
            print("\n".join(report_training(result)), flush=True)
        if "serve" in args.scenarios:
            result = serve_through_node_loss(cluster, str(DEMO_MODEL), _free_port())
            lines += report_serving(result)
            print("\n".join(report_serving(result)), flush=True)
        if "autoscale" in args.scenarios:
            port = _free_port()
            scaling = autoscale(cluster, str(DEMO_MODEL), port)
            per_replicas = throughput_per_replicas(cluster, str(DEMO_MODEL), port)
            lines += report_autoscaling(scaling, per_replicas)
            print("\n".join(report_autoscaling(scaling, per_replicas)), flush=True)
    finally:
        server.stop()
    lines += [f"Whole benchmark: {time.time() - started:.0f} s; load average at the end {os.getloadavg()[0]:.1f}.",
              END]
    if not args.no_write:
        write_block(RESULTS, "\n".join(lines), BEGIN, END)
        print(f"wrote {RESULTS}")
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
