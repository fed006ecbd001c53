"""``diffae serve BUNDLE``: run the Serve application locally on an embedded Ray, until Ctrl-C / SIGTERM.

    diffae serve ./bundles/shapes32 --port 8000
    diffae serve s3://models/ffhq64 --config serving/serve_config.yaml --api-keys-file keys.txt

Programmatic use (demo scripts, benchmarks, tests) goes through :func:`start`, which needs a running
Ray (``ray.init``) and returns the base URL once the application answers.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

APP_NAME = "diffae"


_proxy: tuple[str, int] | None = None  # where the Serve proxy this process started listens


def start(args: dict[str, Any], host: str = "127.0.0.1", port: int = 8000, name: str = APP_NAME,
          route_prefix: str = "/", proxy_location: str = "EveryNode") -> str:
    """Deploy the application for ``args`` (see ``serving.settings``; ``{"bundle": URI}`` suffices) on the
    running Ray (``ray.init`` first) and return its base URL, e.g. ``http://127.0.0.1:8000``, once every
    deployment is running.

    Starts Serve's HTTP proxy on ``host:port`` unless this process started Serve already: then the app joins
    that proxy and the URL returned is its address (the app answers under ``route_prefix``). Deploying again under the same ``name`` replaces the
    application in place. ``proxy_location`` is Serve's (``EveryNode``, ``HeadOnly``) for a Serve started here.
    Raises RuntimeError when Ray has fewer logical CPUs or GPUs than the minimum
    replicas reserve, or when a Serve started elsewhere does not answer on ``host:port``.
    """
    import ray
    from ray import serve

    from .app import build_app
    from .settings import AppSettings

    quiet_serve_console()
    settings = AppSettings.from_args(args)
    have = ray.cluster_resources()
    for resource, per_replica in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        needed = sum(s.min_replicas * getattr(s, per_replica) for s in settings.deployments.values())
        if needed > have.get(resource, 0):  # Serve would otherwise wait forever for replicas it cannot place
            raise RuntimeError(
                f"the app's minimum replicas reserve {needed:g} logical {resource}s but this Ray has "
                f"{have.get(resource, 0):g}: start Ray with more (ray.init(num_cpus=..., num_gpus=...), "
                f"`diffae serve --num-cpus`) or lower deployments.*.{per_replica}")
    address = _serve(host, port, proxy_location)
    serve.run(build_app(args), name=name, route_prefix=route_prefix)
    url = f"http://{address[0]}:{address[1]}"
    if not _answers(url):
        raise RuntimeError(f"the app is deployed but no Serve proxy answers at {url}: Serve was already running in "
                           "this Ray cluster with other HTTP options; use its address or `serve.shutdown()` first")
    return url


def quiet_serve_console() -> None:
    """Serve's driver-side logger prints each step (started, deploying, ready, deleting) at INFO on the
    terminal; the caller prints the addresses that matter, so only Serve's warnings and errors stay there.
    (Serve's controller, proxy and replica logs are files under Ray's log directory, unchanged.)"""
    import logging

    from ray import serve  # noqa: F401 - importing Serve installs its console handler

    for handler in logging.getLogger("ray.serve").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


def _serve(host: str, port: int, proxy_location: str) -> tuple[str, int]:
    """Start Serve's proxy on host:port, unless this process started one that still runs; its address."""
    global _proxy
    from ray import serve

    if _proxy is None or not _answers(f"http://{_proxy[0]}:{_proxy[1]}"):
        serve.start(http_options={"host": host, "port": port}, proxy_location=proxy_location)
        _proxy = ("127.0.0.1" if host in ("0.0.0.0", "::", "") else host, port)
    return _proxy


def _answers(url: str) -> bool:
    """True when a Serve proxy answers its health route at ``url``."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/-/healthz", timeout=5) as reply:
            return reply.status == 200
    except OSError:
        return False


def metrics_url() -> str | None:
    """The Prometheus endpoint of the first live Ray node's metrics exporter (``ray_*``, ``ray_diffae_*``)."""
    import ray

    for node in ray.nodes():
        if node.get("Alive") and node.get("MetricsExportPort"):
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return None


def stop(name: str = APP_NAME) -> None:
    """Remove the application (Serve itself keeps running)."""
    from ray import serve

    serve.delete(name)


def parse_args(argv: Sequence[str] | None, prog: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", help="bundle directory: local path, file:// or s3:// URI")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to accept outside traffic)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--config", help="a serve_config.yaml (its first application's args) or a YAML/JSON "
                                    "file of app args: limits, batching, deployments (serving/settings.py)")
    p.add_argument("--api-keys-file", help="one API key per line; then /v1/* needs `Authorization: Bearer KEY` "
                                           "(keys also come from $DIFFAE_API_KEYS)")
    p.add_argument("--s3-endpoint", help="S3 endpoint URL for s3:// bundles (default: $AWS_ENDPOINT_URL)")
    p.add_argument("--max-batch-size", type=int, help="dynamic batch size of Encoder and Decoder (1: no batching)")
    p.add_argument("--num-cpus", type=int, default=max(4, 2 * (os.cpu_count() or 1)),
                   help="logical CPUs of the embedded Ray (default: max(4, 2 x cores)); the default replicas "
                        "reserve 3.1 and autoscaling more. Threads per replica are set by torch_threads")
    p.add_argument("--address", help="join this Ray cluster (e.g. `auto` after `ray start --head "
                                     "--metrics-export-port=8080`) instead of starting an embedded one")
    return p.parse_args(argv)


def app_args(ns: argparse.Namespace) -> dict[str, Any]:
    """The build_app args for parsed command-line flags."""
    args: dict[str, Any] = {}
    if ns.config:
        loaded = yaml.safe_load(Path(ns.config).read_text()) or {}
        args = dict(loaded["applications"][0].get("args") or {}) if "applications" in loaded else dict(loaded)
    args["bundle"] = ns.bundle
    if ns.api_keys_file:
        args["api_keys_file"] = str(Path(ns.api_keys_file).resolve())
    if ns.s3_endpoint:
        args["s3_endpoint"] = ns.s3_endpoint
    if ns.max_batch_size:
        batching = args.setdefault("batching", {})
        for name in ("Encoder", "Decoder"):
            batching.setdefault(name, {})["max_batch_size"] = ns.max_batch_size
    return args


def main(argv: Sequence[str] | None = None, prog: str = "diffae serve") -> int:
    ns = parse_args(argv, prog)
    args = app_args(ns)
    import ray

    if ns.address:
        ray.init(address=ns.address, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=ns.num_cpus, include_dashboard=False, log_to_driver=False)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    try:
        url = start(args, host=ns.host, port=ns.port)
        print(f"diffae serving {ns.bundle} at {url}/ (API docs: {url}/docs, metrics: {metrics_url()}). "
              "Ctrl-C stops.", flush=True)
        stopped.wait()
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    return 0
