"""The Serve application end to end: one real app on 127.0.0.1 for the whole module, driven over HTTP.

The app serves a bundle written here from the trained micro model (16 px) plus a random latent net and a
random two-attribute classifier. Test settings: every deployment pinned to one replica with few logical
CPUs, a longer batch wait (so concurrent requests really meet), small upload/pixel limits, an API key file
that tests switch on and off, and max_inflight 32.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import json
import math
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from conftest import free_port
from PIL import Image

from diffae_core.images import png_bytes
from diffae_core.latent import LatentMLP

ATTRIBUTES = ["round", "red"]
MAX_UPLOAD = 64 * 1024
MAX_PIXELS = 512 * 512
MAX_INFLIGHT = 32
SIZE = 16



# ---- fixtures --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(trained_micro, tmp_path_factory) -> str:
    m = copy.deepcopy(trained_micro)
    torch.manual_seed(7)
    m.attach_latent(LatentMLP(m.config.latent), torch.randn(512) * 0.1, torch.rand(512) + 0.5)
    m.attach_classifier(torch.randn(2, 512), torch.randn(2), torch.randn(512), torch.rand(512) + 0.5, ATTRIBUTES)
    path = tmp_path_factory.mktemp("serve") / "bundle"
    m.save(str(path))
    return str(path)


def app_args(bundle: str, keys_file: Path) -> dict:
    small = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.25, "health_check_period_s": 2.0}
    batching = {"max_batch_size": 8, "batch_wait_timeout_s": 0.2}
    return {
        "bundle": bundle,
        "api_keys_file": str(keys_file),
        "limits": {"max_upload_bytes": MAX_UPLOAD, "max_pixels": MAX_PIXELS, "default_steps": 10,
                   "max_inflight": MAX_INFLIGHT},
        "batching": {"Encoder": batching, "Decoder": batching},
        "deployments": {name: dict(small) for name in ("Ingress", "Encoder", "Decoder", "Classifier", "LatentSampler")},
    }


@pytest.fixture(scope="module")
def server(ray_cluster, bundle, tmp_path_factory):
    from ray import serve

    from serving.cli import start

    keys_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys_file.write_text("")
    url = start(app_args(bundle, keys_file), port=free_port())
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            yield SimpleNamespace(url=url, client=client, keys_file=keys_file)
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def images(micro_data) -> list[bytes]:
    """The eight training images of the micro model as 16x16 PNGs."""
    return [png_bytes(x) for x in micro_data]


# ---- helpers ---------------------------------------------------------------------------------------------
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_array(data: bytes) -> np.ndarray:
    """PNG bytes -> [H,W,3] float in [0,1] (asserting it is a PNG)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:40]
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64) / 255.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * math.log10(1.0 / max(float(((a - b) ** 2).mean()), 1e-12))


def assert_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:300])
    body = response.json()
    assert body["status"] == status and body["error"] and body["message"], body
    return body


def assert_healthy(server) -> None:
    assert server.client.get("/healthz").json()["status"] == "ok"
    r = server.client.post("/v1/encode", json={"image": b64(png_bytes(torch.zeros(3, 8, 8)))})
    assert r.status_code == 200 and len(r.json()["z_sem"]) == 512


def odd_images() -> dict[str, bytes]:
    """Inputs of other sizes, modes and formats, all accepted and converted to 16x16 RGB."""
    out = {}
    rng = np.random.default_rng(0)
    for name, mode, size, fmt in [("gray.jpg", "L", (40, 30), "JPEG"), ("rgba.png", "RGBA", (17, 50), "PNG"),
                                  ("palette.gif", "P", (64, 64), "GIF"), ("big.webp", "RGB", (300, 200), "WEBP")]:
        channels = {"L": 1, "RGBA": 4, "P": 1, "RGB": 3}[mode]
        arr = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8).squeeze()
        buf = io.BytesIO()
        Image.fromarray(arr).convert(mode).save(buf, format=fmt)
        out[name] = buf.getvalue()
    return out


# ---- happy paths -----------------------------------------------------------------------------------------
def test_model_health_docs_and_page(server):
    c = server.client
    assert c.get("/healthz").json() == {"status": "ok", "preset": "micro16"}
    info = c.get("/v1/model").json()
    assert info["image_size"] == SIZE and info["attributes"] == ATTRIBUTES
    assert info["has_latent"] and info["has_classifier"] and not info["auth"]
    assert info["limits"]["max_upload_bytes"] == MAX_UPLOAD
    paths = set(c.get("/openapi.json").json()["paths"])
    assert {f"/v1/{r}" for r in ("model", "encode", "decode", "reconstruct", "manipulate", "interpolate",
                                 "sample", "classify")} | {"/healthz"} <= paths
    assert "swagger" in c.get("/docs").text.lower()
    page = c.get("/")
    assert page.status_code == 200 and "diffae-ray" in page.text
    assert c.get("/static/app.js").status_code == 200


def test_every_route_happy_path(server, images):
    c = server.client
    image = images[0]
    enc = c.post("/v1/encode", json={"image": b64(image), "steps": 10})
    assert enc.status_code == 200, enc.text
    code = enc.json()
    assert len(code["z_sem"]) == 512 and code["x_T_shape"] == [3, SIZE, SIZE] and code["steps"] == 10
    assert len(base64.b64decode(code["x_T"])) == 3 * SIZE * SIZE * 4

    for name, data in odd_images().items():  # any size, mode and format -> the model's size
        r = c.post("/v1/reconstruct", files={"image": (name, data)}, data={"steps": "5"})
        assert r.status_code == 200, (name, r.text[:200])
        assert r.headers["content-type"] == "image/png" and png_array(r.content).shape == (SIZE, SIZE, 3)

    decoded = c.post("/v1/decode", json={"z_sem": code["z_sem"], "x_T": code["x_T"], "steps": 10})
    assert png_array(decoded.content).shape == (SIZE, SIZE, 3)
    seeded = [c.post("/v1/decode", json={"z_sem": code["z_sem"], "seed": 3, "steps": 5}) for _ in range(2)]
    assert seeded[0].content == seeded[1].content and seeded[0].headers["x-seed"] == "3"

    manip = c.post("/v1/manipulate", json={"image": b64(image), "attribute": "red", "alpha": 0.5, "steps": 10,
                                           "format": "json"})
    assert manip.status_code == 200, manip.text
    assert png_array(base64.b64decode(manip.json()["image"])).shape == (SIZE, SIZE, 3)
    assert manip.json()["edits"] == {"red": 0.5}
    again = c.post("/v1/manipulate", json={"z_sem": code["z_sem"], "x_T": code["x_T"],
                                           "edits": {"red": 0.5, "round": -0.3}, "steps": 10})
    assert png_array(again.content).shape == (SIZE, SIZE, 3)

    interp = c.post("/v1/interpolate", files={"image_a": ("a.png", images[0]), "image_b": ("b.png", images[1])},
                    data={"n": "4", "steps": "5"})
    assert interp.status_code == 200, interp.text
    assert png_array(interp.content).shape == (SIZE, 4 * SIZE, 3)

    sample = c.post("/v1/sample", json={"n": 3, "steps": 5, "latent_steps": 5, "seed": 11})
    assert png_array(sample.content).shape == (SIZE, 3 * SIZE, 3)
    assert c.post("/v1/sample", json={"n": 3, "steps": 5, "latent_steps": 5, "seed": 11}).content == sample.content

    cls = c.post("/v1/classify", files={"image": ("x.png", image)})
    assert cls.status_code == 200, cls.text
    probs = cls.json()["attributes"]
    assert set(probs) == set(ATTRIBUTES) and all(0 <= v["probability"] <= 1 for v in probs.values())
    by_z = c.post("/v1/classify", json={"z_sem": cls.json()["z_sem"]}).json()["attributes"]
    assert by_z == probs


def test_reconstruction_through_stochastic_encoding_is_near_exact(server, images):
    """PNG in, PNG out (both 8-bit): measured 37.1-38.5 dB at 100 steps on training images (7-9 dB when
    decoding the same z_sem from fresh noise); we assert 33 dB."""
    c = server.client
    scores, fresh = [], []
    for image in images[:4]:
        r = c.post("/v1/reconstruct", files={"image": ("x.png", image)}, data={"steps": "100"})
        assert r.status_code == 200, r.text
        scores.append(psnr(png_array(r.content), png_array(image)))
        z = c.post("/v1/encode", json={"image": b64(image)}).json()["z_sem"]
        noise = c.post("/v1/decode", json={"z_sem": z, "seed": 0, "steps": 100})
        fresh.append(psnr(png_array(noise.content), png_array(image)))
    print(f"reconstruction PSNR (dB): {[round(s, 1) for s in scores]}; from fresh noise: "
          f"{[round(s, 1) for s in fresh]}")
    assert min(scores) > 33, scores
    assert min(scores) > max(fresh) + 5, (scores, fresh)


# ---- bad input -------------------------------------------------------------------------------------------
def test_bad_inputs_get_the_right_4xx_and_leave_the_app_healthy(server, images):
    c, image = server.client, b64(images[0])
    truncated = images[0][: len(images[0]) // 2]
    bomb = io.BytesIO()
    Image.new("L", (1024, 1024)).save(bomb, format="PNG")  # 1 Mpx in ~1 KB: over max_pixels, under max bytes
    assert len(bomb.getvalue()) < MAX_UPLOAD
    cases = [
        # 400: undecodable
        (400, "/v1/encode", dict(files={"image": ("x.png", b"definitely not an image")})),
        (400, "/v1/reconstruct", dict(json={"image": b64(b"\x00" * 100)})),
        (400, "/v1/reconstruct", dict(files={"image": ("x.png", truncated)})),
        (400, "/v1/encode", dict(json={"image": "!!! not base64 !!!"})),
        (400, "/v1/encode", dict(content=b"{not json", headers={"content-type": "application/json"})),
        # 413: too large (bytes, decoded pixels, whole body)
        (413, "/v1/encode", dict(files={"image": ("x.png", b"\x89PNG" + b"\x00" * MAX_UPLOAD)})),
        (413, "/v1/encode", dict(json={"image": b64(b"\x00" * (MAX_UPLOAD + 10))})),
        (413, "/v1/reconstruct", dict(files={"image": ("bomb.png", bomb.getvalue())})),
        (413, "/v1/encode", dict(content=b"x" * (4 * 2**20), headers={"content-type": "application/json"})),
        # 422: bad parameters
        (422, "/v1/reconstruct", dict(json={"image": image, "steps": 0})),
        (422, "/v1/reconstruct", dict(json={"image": image, "steps": 10**6})),
        (422, "/v1/reconstruct", dict(files={"image": ("x.png", images[0])}, data={"steps": "many"})),
        (422, "/v1/manipulate", dict(content=json.dumps({"image": image, "attribute": "red", "alpha": float("nan")}),
                                     headers={"content-type": "application/json"})),
        (422, "/v1/manipulate", dict(files={"image": ("x.png", images[0])}, data={"attribute": "red", "alpha": "nan"})),
        (422, "/v1/manipulate", dict(json={"image": image, "attribute": "red", "alpha": 50})),
        (422, "/v1/manipulate", dict(json={"image": image, "attribute": "Smiling", "alpha": 0.3})),
        (422, "/v1/manipulate", dict(json={"image": image, "alpha": 0.3})),
        (422, "/v1/manipulate", dict(json={"attribute": "red", "alpha": 0.3})),
        (422, "/v1/reconstruct", dict(json={"steps": 5})),
        (422, "/v1/decode", dict(json={"steps": 5})),
        (422, "/v1/decode", dict(json={"z_sem": [0.0] * 7})),
        (422, "/v1/interpolate", dict(json={"image_a": image})),
        (422, "/v1/interpolate", dict(json={"image_a": image, "image_b": image, "n": 10**6})),
        (422, "/v1/sample", dict(json={"n": 0})),
        (422, "/v1/encode", dict(json={"image": image, "stepz": 5})),
        (422, "/v1/classify", dict(json={"z_sem": ["a"] * 512})),
    ]
    for status, path, kwargs in cases:
        body = assert_error(c.post(path, **kwargs), status)
        assert len(body["message"]) < 2000
    assert_healthy(server)


def test_auth_on_and_off(server, images):
    c = server.client
    server.keys_file.write_text("# rotated keys\nkey-one\nkey-two\n")
    try:
        assert_error(c.get("/v1/model"), 401)
        missing = c.post("/v1/encode", json={"image": b64(images[0])})
        assert_error(missing, 401)
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert_error(c.get("/v1/model", headers={"Authorization": "Bearer key-three"}), 401)
        assert_error(c.get("/v1/model", headers={"Authorization": "Basic a2V5LW9uZQ=="}), 401)
        assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200  # stay open
        for key in ("key-one", "key-two"):
            r = c.post("/v1/encode", json={"image": b64(images[0])}, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
        assert c.get("/v1/model", headers={"Authorization": "Bearer key-one"}).json()["auth"] is True
    finally:
        server.keys_file.write_text("")
    assert c.get("/v1/model").status_code == 200


# ---- batching, metrics, overload -------------------------------------------------------------------------
async def _post_all(url: str, calls: list[tuple[str, dict]]) -> list[httpx.Response]:
    """Send all calls at once (one connection each)."""
    limits = httpx.Limits(max_connections=len(calls), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        return await asyncio.gather(*(client.post(path, **kwargs) for path, kwargs in calls))


def x_T_array(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4")


def assert_same_result(alone: httpx.Response, batched: httpx.Response) -> None:
    """Identical up to float summation order: batched convolutions may differ from batch-1 ones in the last
    bits (measured through Serve: z_sem <= 2.3e-7, x_T <= 2e-5), which 8-bit images almost never show."""
    a, b = alone.json(), batched.json()
    assert a["seed"] == b["seed"] and a.keys() == b.keys()
    if "z_sem" in a:
        np.testing.assert_allclose(a["z_sem"], b["z_sem"], rtol=0, atol=1e-5)
    if "x_T" in a:
        np.testing.assert_allclose(x_T_array(a["x_T"]), x_T_array(b["x_T"]), rtol=0, atol=1e-3)
    if "image" in a:
        pa, pb = png_array(base64.b64decode(a["image"])), png_array(base64.b64decode(b["image"]))
        assert np.abs(pa - pb).max() <= 1 / 255 + 1e-9 and (pa != pb).mean() < 0.02


def test_concurrent_requests_are_batched_and_identical_to_one_by_one(server, images):
    z = server.client.post("/v1/encode", json={"image": b64(images[0])}).json()["z_sem"]
    calls = []
    for i, image in enumerate(images):
        calls.append(("/v1/encode", {"json": {"image": b64(image), "steps": 5, "seed": i}}))
        calls.append(("/v1/reconstruct", {"json": {"image": b64(image), "steps": 5, "seed": i, "format": "json"}}))
        calls.append(("/v1/decode", {"json": {"z_sem": z, "steps": 5, "seed": i, "format": "json"}}))  # x_T from seed
    one_by_one = [server.client.post(path, **kwargs) for path, kwargs in calls]
    together = asyncio.run(_post_all(server.url, calls))
    assert all(r.status_code == 200 for r in one_by_one + together), [r.text[:200] for r in together]
    assert {r.headers["x-diffae-batch-size"] for r in one_by_one} == {"1"}
    batch_sizes = [int(r.headers["x-diffae-batch-size"]) for r in together]
    print(f"batch sizes seen by {len(calls)} concurrent requests: {batch_sizes}")
    assert max(batch_sizes) > 1
    for alone, batched in zip(one_by_one, together, strict=True):
        assert_same_result(alone, batched)


def scrape() -> dict[str, list[tuple[dict, float]]]:
    """Every live Ray node's metrics (replicas report on the node they run on), as Prometheus would scrape
    them: metric name -> [(labels, value)], over all nodes."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, list[tuple[dict, float]]] = {}
    for node in ray.nodes():
        if not (node["Alive"] and node.get("MetricsExportPort")):
            continue
        with urllib.request.urlopen(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", timeout=30) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(v for tags, v in samples.get(name, []) if all(tags.get(k) == x for k, x in labels.items()))


def test_metrics_on_rays_prometheus_port(server):
    """Earlier tests sent >= 9 good encodes, 4xx errors and batched requests; Ray reports every ~1 s."""
    def ready(s: dict) -> bool:
        return (total(s, "ray_diffae_requests_total", route="/v1/encode", code="200") >= 9
                and total(s, "ray_diffae_requests_total", code="422") >= 10
                and total(s, "ray_diffae_batch_size_count", deployment="Encoder") > 0
                and total(s, "ray_diffae_model_seconds_count", deployment="Decoder", op="invert") > 0)

    deadline, samples = time.monotonic() + 90, {}
    while time.monotonic() < deadline:
        samples = scrape()
        if ready(samples):
            break
        time.sleep(2)
    assert ready(samples), {k: v for k, v in samples.items() if k.startswith("ray_diffae")}
    assert total(samples, "ray_diffae_requests_total", code="401") >= 4
    assert total(samples, "ray_diffae_requests_total", code="413") >= 4
    assert total(samples, "ray_diffae_request_seconds_count", route="/v1/reconstruct") >= 8
    assert total(samples, "ray_diffae_request_seconds_sum", route="/v1/reconstruct") > 0
    # batched: some Encoder and Decoder batches held more than one request (the batching test sent 24 at once)
    for deployment in ("Encoder", "Decoder"):
        count = total(samples, "ray_diffae_batch_size_count", deployment=deployment)
        singles = total(samples, "ray_diffae_batch_size_bucket", deployment=deployment, le="1.0")
        assert 0 <= singles < count, (deployment, samples["ray_diffae_batch_size_bucket"])
    assert total(samples, "ray_diffae_model_seconds_count", deployment="Decoder", op="decode") > 0
    assert total(samples, "ray_diffae_denoise_steps_total") >= 100 * 8  # the PSNR test alone: 8 x 100 steps
    assert any(name.startswith("ray_serve_") for name in samples), "Ray's own Serve metrics are missing"


def test_overload_answers_503_with_retry_after(server, images):
    calls = [("/v1/reconstruct", {"json": {"image": b64(images[i % 8]), "steps": 20}}) for i in range(3 * MAX_INFLIGHT)]
    responses = asyncio.run(_post_all(server.url, calls))
    codes = [r.status_code for r in responses]
    print(f"overload: {codes.count(200)} x 200, {codes.count(503)} x 503 of {len(codes)}")
    assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) >= MAX_INFLIGHT // 2
    for r in responses:
        if r.status_code == 503:
            assert_error(r, 503)
            assert int(r.headers["retry-after"]) >= 1
    assert_healthy(server)


# ---- the web page in a real browser ----------------------------------------------------------------------
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage", "--window-size=1280,1600")


@pytest.fixture
def browser(monkeypatch):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("the web page test needs Debian's packages `chromium` and `chromium-driver` (make test installs "
                    "them as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never try to download a browser
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def test_web_page_upload_reconstruct_and_edit_with_a_slider(server, micro_data, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    upload = tmp_path / "face.png"
    big = torch.nn.functional.interpolate(micro_data[:1], size=48, mode="bilinear", align_corners=False)[0]
    upload.write_bytes(png_bytes(big))  # 48 px: the page's image goes through the server's resizing
    wait = WebDriverWait(browser, 180, poll_frequency=0.2)
    src = lambda element_id: browser.find_element(By.ID, element_id).get_attribute("src") or ""  # noqa: E731
    status = lambda: browser.find_element(By.ID, "status").text  # noqa: E731

    browser.get(server.url + "/")
    wait.until(lambda _: "micro16" in browser.find_element(By.ID, "model-info").text)
    browser.find_element(By.ID, "file").send_keys(str(upload))
    wait.until(lambda _: src("recon-img").startswith("data:image/png") or "failed" in status())
    assert "reconstructed" in status(), status()
    reconstruction = src("recon-img")
    assert png_array(base64.b64decode(reconstruction.split(",", 1)[1])).shape == (SIZE, SIZE, 3)

    slider = browser.find_elements(By.CSS_SELECTOR, "#attributes input[type=range]")[1]  # "red"
    wait.until(lambda _: slider.is_enabled())
    slider.send_keys(Keys.ARROW_RIGHT * 10)  # +0.5, one input event per key
    wait.until(lambda _: "edited: red +0.5" in status() or "failed" in status())  # the last slider position
    assert "edited: red +0.5" in status(), status()
    edited = base64.b64decode(src("edit-img").split(",", 1)[1])
    assert png_array(edited).shape == (SIZE, SIZE, 3)
    assert edited != base64.b64decode(reconstruction.split(",", 1)[1])


# ---- failure recovery (last: it disturbs the app) --------------------------------------------------------
def test_decoder_replica_killed_under_load_is_replaced(server, images):
    import threading

    import ray
    from ray import serve

    handle = serve.get_deployment_handle("Decoder", app_name="diffae")
    old = handle.replica_actor_name.remote().result(timeout_s=120)
    calls = [("/v1/reconstruct", {"json": {"image": b64(images[i % 8]), "steps": 20}}) for i in range(12)]
    results: list[list[httpx.Response]] = []
    load = threading.Thread(target=lambda: results.append(asyncio.run(_post_all(server.url, calls))))
    load.start()
    time.sleep(1.0)  # requests are in the decoder now (each needs several seconds of DDIM)
    ray.kill(ray.get_actor(old, namespace="serve"), no_restart=True)
    load.join(timeout=300)
    assert results, "the load did not finish"
    codes = [r.status_code for r in results[0]]
    failed = [r for r in results[0] if r.status_code != 200]
    print(f"decoder replica killed under load: {len(failed)} of {len(codes)} in-flight requests failed "
          f"(codes {sorted(set(codes))})")
    for r in failed:  # a lost replica is a retryable 503, never a 500
        assert_error(r, 503)
        assert "retry-after" in r.headers

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        r = server.client.post("/v1/reconstruct", json={"image": b64(images[0]), "steps": 5})
        if r.status_code == 200:
            break
        time.sleep(1)
    assert r.status_code == 200, r.text
    for image in images[:4]:
        assert server.client.post("/v1/reconstruct", json={"image": b64(image), "steps": 5}).status_code == 200
    assert handle.replica_actor_name.remote().result(timeout_s=120) != old


def test_start_refuses_an_app_that_cannot_fit(ray_cluster, bundle):
    from serving.cli import start

    with pytest.raises(RuntimeError, match="logical CPUs"):
        start({"bundle": bundle, "deployments": {"Decoder": {"num_cpus": 64.0}}}, port=free_port())


# ---- configuration (no running app needed) ---------------------------------------------------------------
def test_serve_config_matches_build_app_and_serve_build(tmp_path):
    import yaml
    from click.testing import CliRunner
    from ray.serve.scripts import cli as serve_cli

    from serving.app import CONFIG_FILE, deployment_options
    from serving.settings import AppSettings

    packaged = yaml.safe_load(CONFIG_FILE.read_text())["applications"][0]
    assert packaged["import_path"] == "serving.app:build_app"
    options = {d.pop("name"): d for d in packaged["deployments"]}
    settings = AppSettings.from_args(packaged["args"])
    assert options == {name: deployment_options(s) for name, s in settings.deployments.items()}

    out = tmp_path / "built.yaml"
    result = CliRunner().invoke(serve_cli, ["build", "serving.app:app", "-o", str(out)])
    assert result.exit_code == 0, result.output
    built = yaml.safe_load(out.read_text())["applications"][0]["deployments"]
    assert {d.pop("name"): d for d in built} == options


def test_settings_refuse_typos_and_coerce_strings():
    from serving.settings import AppSettings

    s = AppSettings.from_args({"bundle": "b", "limits": {"max_steps": "50"},
                               "batching": {"Decoder": {"pad_batches": "true"}}})
    assert s.limits.max_steps == 50 and s.batching["Decoder"].pad_batches is True
    for bad in [{}, {"bundle": "b", "limit": {}}, {"bundle": "b", "limits": {"max_stepz": 5}},
                {"bundle": "b", "deployments": {"Decoderr": {}}}, {"bundle": "b", "limits": {"max_steps": 0}},
                {"bundle": "b", "limits": {"max_alpha": float("nan")}}]:
        with pytest.raises(ValueError):
            AppSettings.from_args(bad)


def test_diffae_serve_command_flags(tmp_path):
    from serving.cli import app_args, parse_args

    config = tmp_path / "args.yaml"
    config.write_text("limits: {max_steps: 30}\n")
    ns = parse_args(["./b", "--port", "9001", "--config", str(config), "--max-batch-size", "1"], "diffae serve")
    args = app_args(ns)
    assert ns.port == 9001 and ns.host == "127.0.0.1"
    assert args["bundle"] == "./b" and args["limits"] == {"max_steps": 30}
    assert args["batching"]["Decoder"]["max_batch_size"] == 1
    from serving.app import CONFIG_FILE

    packaged = app_args(parse_args(["./b", "--config", str(CONFIG_FILE)], "diffae serve"))
    assert packaged["bundle"] == "./b" and "deployments" in packaged


def test_a_part_of_a_bundle_loads_one_network_with_the_bundles_weights(bundle, trained_micro, tmp_path):
    """What each replica loads: DiffAE.load(parts=...) builds only the networks asked for, with the same weights."""
    from diffae_core import DiffAE
    from diffae_core.bundle import BundleError

    full = DiffAE.load(bundle)
    x, t, z = torch.rand(2, 3, SIZE, SIZE) * 2 - 1, torch.tensor([3, 700]), torch.randn(2, 512)
    encoder = DiffAE.load(bundle, parts=("encoder",))
    assert encoder.unet is None and encoder.latent_net is None and encoder.classifier is None
    assert torch.equal(encoder.encode(x), full.encode(x))
    unet = DiffAE.load(bundle, parts=("unet",))
    assert unet.encoder is None and torch.equal(unet.predict_noise(x, t, z), full.predict_noise(x, t, z))
    with pytest.raises(RuntimeError, match="without its encoder"):
        unet.encode(x)
    latent = DiffAE.load(bundle, parts=("latent",))
    assert torch.equal(latent.predict_latent_noise(z, t), full.predict_latent_noise(z, t))
    assert torch.equal(latent.latent_mean, full.latent_mean)
    head = DiffAE.load(bundle, parts=("classifier",))
    assert torch.equal(head.classify(z), full.classify(z)) and head.attributes == ATTRIBUTES
    trained_micro.save(str(tmp_path / "plain"))
    with pytest.raises(BundleError, match="no classifier"):
        DiffAE.load(str(tmp_path / "plain"), parts=("classifier",))
    with pytest.raises(ValueError, match="unknown bundle part"):
        DiffAE.load(bundle, parts=("decoder",))
