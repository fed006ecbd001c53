"""Serving on a real multi-node Ray on this machine: through the loss of a node, and autoscaling up and down.

Model nodes carry a ``model_node`` resource that the Encoder and Decoder replicas ask for, while the Ingress,
Classifier and LatentSampler stay on the head; Serve's HTTP proxy runs on the head only (the nodes share this
machine's loopback address, so proxies on every node would share one port and a dying node would cut the
connections its proxy held, which a load balancer handles on a real cluster). Under a steady, bounded
closed-loop load (serving.loadgen) the node of a Decoder replica dies: only requests in flight may fail, and
only with 503 + Retry-After; Serve runs the replica on another node and every later request succeeds. The
Decoder then autoscales from one replica to three under load and back down when it stops, as Serve's status
and the replica metrics on Ray's metrics ports show. The scenarios are benchmarks/scale_sim.py's.
"""

from __future__ import annotations

import pytest
from conftest import free_port

from benchmarks.scale_sim import autoscale, serve_through_node_loss
from serving.loadgen import summary

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def head_only_serve(ray_cluster):
    from ray import serve

    serve.shutdown()  # an earlier module's Serve has proxies on every node
    yield ray_cluster["cluster"]
    serve.shutdown()


@pytest.fixture(scope="module")
def bundle(trained_micro, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("scale") / "bundle")
    trained_micro.save(path)
    return path


def test_serving_survives_the_loss_of_a_node(head_only_serve, bundle):
    result = serve_through_node_loss(head_only_serve, bundle, free_port())
    failed = [s for s in result.samples if s.status != 200]
    after = [s for s in result.samples if s.start > result.healed]
    print("\n".join(result.timeline.lines()))
    print(f"node loss: {len(failed)} of {len(result.samples)} failed {summary(failed)['codes']}; after the "
          f"replicas ran again: {summary(after)['codes']}")
    assert {s.status for s in failed} <= {503}, summary(failed)  # never a 500, never a dropped connection
    assert all(s.retry_after for s in failed)
    assert all(s.start < result.healed for s in failed)  # failures only around the loss
    assert len(after) >= 4 and all(s.status == 200 for s in after)


def test_the_decoder_autoscales_up_under_load_and_back_down(head_only_serve, bundle):
    result = autoscale(head_only_serve, bundle, free_port())
    print("\n".join(result.timeline.lines()))
    print(f"autoscaling: up {result.up_s:.1f} s, down {result.down_s:.1f} s; load {summary(result.samples)}")
    assert {s.status for s in result.samples} <= {200, 503}
    counts = [n for _, n in result.replicas]
    assert counts[0] <= 2 and max(counts) == 3 and counts[-1] == 1


def test_gpu_replicas_land_on_gpu_resources_with_their_settings(head_only_serve, bundle):
    """With Ray's logical GPUs (a node started with num_gpus=2, no CUDA here): replicas that ask for
    num_gpus are placed on that node with GPU ids assigned, compute in their deployment's dtype, and fall back
    to the CPU because this machine has no CUDA; CPU-only deployments get no GPU."""
    from ray import serve

    from benchmarks.scale_sim import ON_HEAD, running, wait_until
    from serving.cli import start

    cluster = head_only_serve
    gpu_node = cluster.add_node(num_cpus=2, num_gpus=2)
    cluster.wait_for_nodes()
    deployments = {"Ingress": ON_HEAD, "Classifier": ON_HEAD, "LatentSampler": ON_HEAD,
                   "Encoder": {"num_cpus": 0.25, "num_gpus": 0.25, "dtype": "bf16", "min_replicas": 1, "max_replicas": 1},
                   "Decoder": {"num_cpus": 0.25, "num_gpus": 0.5, "dtype": "bf16", "min_replicas": 2, "max_replicas": 2}}
    try:
        start({"bundle": bundle, "deployments": deployments}, port=free_port(), name="scale", route_prefix="/gpu",
              proxy_location="HeadOnly")
        wait_until(lambda: running("Decoder") == 2, 120, "two Decoder replicas")
        seen = {}
        for name in ("Encoder", "Decoder", "Classifier"):
            handle = serve.get_deployment_handle(name, app_name="scale")
            seen[name] = [handle.describe.remote().result(timeout_s=60) for _ in range(12)]
        for name in ("Encoder", "Decoder"):
            for replica in seen[name]:
                assert replica["node_id"] == gpu_node.node_id and replica["gpu_ids"], replica
                assert replica["dtype"] == "bf16" and replica["device"] == "cpu", replica  # no CUDA: the CPU
        assert {r["actor"] for r in seen["Decoder"]} and len({r["actor"] for r in seen["Decoder"]}) == 2
        assert all(not r["gpu_ids"] and r["dtype"] == "fp32" for r in seen["Classifier"])
    finally:
        serve.delete("scale")
        cluster.remove_node(gpu_node, allow_graceful=False)
