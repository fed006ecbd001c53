"""Shared fixtures: small real models (trained here in seconds), thread pinning."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch

# The environment a local Ray 2.60 and moto need on this machine; .ci/run sets the same.
for _key, _value in {
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "1.0",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}.items():
    os.environ.setdefault(_key, _value)

from diffae_core import DiffAE  # noqa: E402  (after the environment above)
from diffae_core.config import EncoderConfig, LatentConfig, ModelConfig, UNetConfig  # noqa: E402

# Tests pin one intra-op thread: beside Ray workers on a small machine, OpenMP threads spin-waiting for a
# core made a 2-thread step up to 40x slower than a 1-thread one.
torch.set_num_threads(int(os.environ.get("DIFFAE_TEST_THREADS", "1")))


def micro_config() -> ModelConfig:
    """16 px, 32 base channels, two levels: the smallest model with every block type (~2.7M params)."""
    return ModelConfig(
        name="micro16",
        unet=UNetConfig(image_size=16, model_channels=32, channel_mult=(1, 2), attention_resolutions=(8,),
                        dropout=0.0),
        encoder=EncoderConfig(channel_mult=(1, 2, 2)),
        latent=LatentConfig(num_layers=3, num_hid_channels=128),
    )


def smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """[n, 3, size, size] smooth random images in (-1, 1)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False).tanh()


def train_autoencoder(model: DiffAE, data: torch.Tensor, steps: int, lr: float = 1e-3, seed: int = 0) -> DiffAE:
    """Overfit ``model`` on ``data`` with the library's own loss (Adam, clip 1.0)."""
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, foreach=True)
    for _ in range(steps):
        loss = model.training_loss(data)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def micro_data() -> torch.Tensor:
    return smooth_images(8, 16, seed=1)


@pytest.fixture(scope="session")
def trained_micro(micro_data) -> DiffAE:
    """A micro16 Diff-AE overfit on 8 smooth images (~20 s on 2 cores). Treat as read-only."""
    torch.manual_seed(0)
    return train_autoencoder(DiffAE(micro_config()), micro_data, steps=200)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API (moto server) on 127.0.0.1; yields its http:// endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh bucket on the moto server; yields its name. Also exports AWS_ENDPOINT_URL for the test."""
    import boto3

    name = "t-" + "".join(c for c in request.node.name.lower() if c.isalnum())[:40]
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    old = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = s3_endpoint
    try:
        yield name
    finally:
        if old is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = old


HEAD_RESOURCE = "head_node"  # only the head has it; benchmarks/scale_sim.py pins light deployments with it


def metrics_port() -> int:
    """The Prometheus export port of the connected Ray's first live node (found through ``ray.nodes()``)."""
    import ray

    return next(int(n["MetricsExportPort"]) for n in ray.nodes() if n["Alive"] and n.get("MetricsExportPort"))


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray for the whole session: a head node (``ray.cluster_utils.Cluster``, Ray's own multi-node test
    harness) with 4 logical CPUs, so Train workers leave room for Ray Data. Multi-node tests add worker nodes
    to it and kill them (``cluster`` in the yielded dict); everything else runs on the head.

    Yields a dict with the metrics export port. Tests share it: never call ray.shutdown() in a test.
    Ray's temp dir and metrics interval are set through its environment variables (public settings).
    """
    import ray
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Unix socket paths must stay under 108 bytes
    os.environ["RAY_TMPDIR"] = temp_dir
    os.environ["RAY_metrics_report_interval_ms"] = "1000"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 4, "include_dashboard": False, "object_store_memory": 256 * 1024 * 1024,
        "resources": {HEAD_RESOURCE: 100}})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield {"metrics_port": metrics_port(), "temp_dir": temp_dir, "cluster": cluster}
    finally:
        ray.shutdown()
        cluster.shutdown()
