"""The demo's last step: serve the trained bundle and call it over real HTTP like an application would."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from diffae_core.datasets import render_shape


def _shape_png(index: int, size: int) -> bytes:
    arr, _ = render_shape(index, size=size, seed=12345)  # a seed the training set never used
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _post(client: httpx.Client, route: str, body: dict[str, Any]) -> bytes:
    reply = client.post(route, json=body)
    if reply.status_code != 200:
        raise RuntimeError(f"POST {route} answered {reply.status_code}: {reply.text[:300]}")
    return reply.content


def call_app(bundle: str, out: Path, port: int, keep_serving: bool = False) -> dict[str, Any]:
    """Start the Serve app for ``bundle`` on 127.0.0.1:``port`` (Ray must be running), send reconstruct,
    manipulate and sample requests, save the PNG answers under ``out``, and stop the app unless
    ``keep_serving`` (then block until Ctrl-C). Returns URLs, files and the cold-start timing."""
    from serving import cli as serve_cli

    out.mkdir(parents=True, exist_ok=True)
    cold = time.perf_counter()
    url = serve_cli.start({"bundle": str(Path(bundle).resolve())}, port=port)
    files: list[str] = []
    with httpx.Client(base_url=url, timeout=300) as client:
        info = client.get("/v1/model").json()
        size = int(info.get("image_size", 32))
        image = base64.b64encode(_shape_png(0, size)).decode()
        (out / "input.png").write_bytes(base64.b64decode(image))
        files.append("input.png")
        (out / "reconstruct.png").write_bytes(_post(client, "/v1/reconstruct", {"image": image, "seed": 0}))
        first_reconstruction_s = time.perf_counter() - cold
        files.append("reconstruct.png")
        attributes = list(info.get("attributes") or [])
        for name in attributes[:2]:
            for alpha in (-0.5, 0.5):
                fname = f"manipulate-{name}-{alpha:+.1f}.png"
                (out / fname).write_bytes(_post(client, "/v1/manipulate",
                                                {"image": image, "attribute": name, "alpha": alpha, "seed": 0}))
                files.append(fname)
        (out / "sample.png").write_bytes(_post(client, "/v1/sample", {"n": 8, "seed": 0}))
        files.append("sample.png")
    metrics_url = serve_cli.metrics_url()
    print(f"web page:   {url}/\nAPI docs:   {url}/docs\nPrometheus: {metrics_url}", flush=True)
    result = {"url": url, "metrics_url": metrics_url, "files": files,
              "cold_start_to_first_reconstruction_s": round(first_reconstruction_s, 2),
              "note": f"Served at {url} (web page {url}/, API docs {url}/docs, metrics {metrics_url}); "
                      f"first reconstruction {first_reconstruction_s:.1f} s after the app was started."}
    if keep_serving:
        print("DEMO_KEEP_SERVING=1: serving until Ctrl-C", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    serve_cli.stop()
    return result
