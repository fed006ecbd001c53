"""Serving on a real multi-node Ray on this machine: through the loss of a node, and autoscaling up and down.

Three worker nodes carry a ``model_node`` resource; the Encoder and Decoder replicas ask for it (one replica
per node), while the Ingress, Classifier and LatentSampler stay on the head. Under a steady, bounded
closed-loop load (serving.loadgen) the node of a Decoder replica dies (raylet and workers killed): only
requests in flight may fail, and only with 503 + Retry-After, Serve puts the replica on another node, and
every later request succeeds. Then the Decoder autoscales from one replica to three under load and back down
when the load stops, as Serve's status and the replica metrics on Ray's metrics ports show.
"""

from __future__ import annotations

import base64
import time
import urllib.request

import pytest
from conftest import HEAD_RESOURCE, free_port

from diffae_core.images import png_bytes
from serving.loadgen import ClosedLoop, summary

pytestmark = pytest.mark.timeout(900)
NODE = {"num_cpus": 2, "resources": {"model_node": 2}}
ON_HEAD = {"num_cpus": 0.25, "resources": {HEAD_RESOURCE: 0.01}, "min_replicas": 1, "max_replicas": 1}
ON_MODEL_NODES = {"num_cpus": 0.5, "resources": {"model_node": 0.5}, "health_check_period_s": 1.0}


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    """Three worker nodes and a Serve whose HTTP proxy runs on the head only: the nodes share this machine's
    loopback address, so proxies on every node would share one port and a node's death would cut the
    connections its proxy held, which on a real cluster (one address per node) a load balancer handles."""
    from ray import serve

    serve.shutdown()  # an earlier module's Serve has proxies on every node
    cluster = ray_cluster["cluster"]
    nodes = [cluster.add_node(**NODE) for _ in range(3)]
    cluster.wait_for_nodes()
    yield cluster, nodes
    serve.shutdown()
    for node in list(cluster.worker_nodes):
        cluster.remove_node(node, allow_graceful=False)


@pytest.fixture(scope="module")
def bundle(trained_micro, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("scale") / "bundle")
    trained_micro.save(path)
    return path


def deploy(bundle: str, decoder: dict, encoder: dict) -> str:
    from serving.cli import start

    deployments = {"Ingress": ON_HEAD, "Classifier": ON_HEAD, "LatentSampler": ON_HEAD,
                   "Encoder": {**ON_MODEL_NODES, **encoder}, "Decoder": {**ON_MODEL_NODES, **decoder}}
    url = start({"bundle": bundle, "deployments": deployments, "limits": {"max_inflight": 256}},
                port=free_port(), name="scale", route_prefix="/scale", proxy_location="HeadOnly")
    return f"{url}/scale"


def node_alive(node_id: str) -> bool:
    import ray

    return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())


def running(name: str) -> int:
    from ray import serve

    return serve.status().applications["scale"].deployments[name].replica_states.get("RUNNING", 0)


def replica_metric(name: str, deployment: str) -> float:
    """A replica metric summed over every live node's metrics port (what Prometheus scrapes)."""
    import ray

    total = 0.0
    for node in ray.nodes():
        if not (node["Alive"] and node.get("MetricsExportPort")):
            continue
        text = urllib.request.urlopen(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", timeout=5).read()
        for line in text.decode().splitlines():
            if line.startswith(f"{name}{{") and f'deployment="{deployment}"' in line and 'application="scale"' in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


def wait_until(condition, timeout: float, what: str) -> float:
    start = time.time()
    while not condition():
        if time.time() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.5)
    return time.time()


def reconstruct_body(micro_data) -> dict:
    return {"image": base64.b64encode(png_bytes(micro_data[0])).decode(), "steps": 4, "seed": 0}


def test_serving_survives_the_loss_of_a_node(cluster, bundle, micro_data):
    from ray import serve

    ray_cluster, nodes = cluster
    spread = {"min_replicas": 2, "max_replicas": 2, "max_replicas_per_node": 1}
    url = deploy(bundle, decoder=spread, encoder=spread)
    handle = serve.get_deployment_handle("Decoder", app_name="scale")
    load = ClosedLoop(url, "/v1/reconstruct", reconstruct_body(micro_data), concurrency=4, max_requests=2000,
                      max_seconds=240, timeout_s=60).start()
    time.sleep(10)
    placed = {handle.describe.remote().result(timeout_s=30)["node_id"] for _ in range(8)}
    victim = next(n for n in nodes if n.node_id in placed)
    killed = time.time()
    ray_cluster.remove_node(victim, allow_graceful=False)
    dead = wait_until(lambda: not node_alive(victim.node_id), 120, "Ray to mark the node dead")
    healed = wait_until(lambda: running("Decoder") == 2 and running("Encoder") == 2, 240, "replicas on the survivors")
    time.sleep(10)  # load on the healed app
    samples = load.stop()

    failed = [s for s in samples if s.status != 200]
    after = [s for s in samples if s.start > healed]
    last_failure = max((s.end for s in failed), default=killed)
    print(f"node loss: {len(failed)} of {len(samples)} requests failed ({summary(failed)['codes']}); node dead "
          f"{dead - killed:.1f} s after the kill, replicas back {healed - killed:.1f} s after it, last failure "
          f"{last_failure - killed:.1f} s after it; {len(after)} requests after that, {summary(after)['codes']}")
    assert {s.status for s in failed} <= {503}, summary(failed)  # never a 500, never a dropped connection
    assert all(s.retry_after for s in failed)
    assert all(s.start < healed for s in failed)  # failures only around the loss
    assert len(after) >= 4 and all(s.status == 200 for s in after)
    assert victim.node_id not in {handle.describe.remote().result(timeout_s=30)["node_id"] for _ in range(8)}


def test_the_decoder_autoscales_up_under_load_and_back_down(cluster, bundle, micro_data):
    elastic = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1, "max_ongoing_requests": 4,
               "upscale_delay_s": 1.0, "downscale_delay_s": 4.0, "look_back_period_s": 2.0}
    url = deploy(bundle, decoder=elastic, encoder={"min_replicas": 1, "max_replicas": 1})
    wait_until(lambda: running("Decoder") == 1, 120, "the minimum of one Decoder replica")
    timeline = [(time.time(), 1)]
    load = ClosedLoop(url, "/v1/reconstruct", reconstruct_body(micro_data), concurrency=8, max_requests=3000,
                      max_seconds=180, timeout_s=60).start()
    start = time.time()

    def at_max() -> bool:
        timeline.append((time.time(), running("Decoder")))
        return timeline[-1][1] == 3

    up = wait_until(at_max, 150, "three Decoder replicas under load") - start
    assert wait_until(lambda: replica_metric("ray_serve_deployment_replica_healthy", "Decoder") >= 3, 60,
                      "three healthy Decoder replicas in the metrics")
    samples = load.stop()
    stopped = time.time()

    def at_min() -> bool:
        timeline.append((time.time(), running("Decoder")))
        return timeline[-1][1] == 1

    down = wait_until(at_min, 180, "the Decoder back at one replica") - stopped
    print(f"autoscaling: 1 -> 3 replicas {up:.1f} s after the load started, 3 -> 1 {down:.1f} s after it "
          f"stopped; load {summary(samples)}")
    assert {s.status for s in samples} <= {200, 503}
    assert max(n for _, n in timeline) == 3 and timeline[-1][1] == 1
