"""Serving hardening: no 5xx and no resource blow-up from any input, slow clients cannot lock the service out,
an OpenAPI schema that states what the server enforces, fuzzed with schemathesis.

Pure parsing and limit functions are tested directly; one app (the bundle of tests/test_serving.py, small
step / n limits so that fuzzing stays cheap, short upload deadlines) serves the HTTP tests on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import httpx
import jsonschema
import numpy as np
import pytest
import schemathesis
from conftest import free_port
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_serving import app_args, assert_error, assert_healthy, b64, bundle, images, scrape, total  # noqa: F401

from serving.errors import ApiError
from serving.inputs import Payload, load_image, parse_x_T, parse_z, validate
from serving.openapi import request_body
from serving.parsing import loads, parse_float, parse_int
from serving.schemas import EncodeParams, InterpolateParams, ManipulateParams, SampleParams
from serving.settings import Limits

SIZE, Z_DIM = 16, 512
LIMITS = {"max_steps": 4, "default_steps": 2, "max_latent_steps": 4, "default_latent_steps": 2, "max_n": 3,
          "body_timeout_s": 3.0, "upload_grace_s": 0.5, "max_uploading": 4}
ZERO_X_T = base64.b64encode(bytes(3 * SIZE * SIZE * 4)).decode()


def png(width: int, height: int, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def refused(status: int, fn, *args, **kwargs) -> str:
    """Call ``fn`` and return the message of the ApiError it must raise with ``status``."""
    with pytest.raises(ApiError) as info:
        fn(*args, **kwargs)
    assert info.value.status == status, (info.value.status, info.value.message)
    assert " at 0x" not in info.value.message, info.value.message  # no Python object reprs
    return info.value.message


# ---- limits and parsing, without Ray -----------------------------------------------------------------------
def test_image_limits_hold_for_every_shape_before_any_pixel_is_resized():
    limits = Limits(max_pixels=512 * 512)
    start = time.perf_counter()
    # 1 x 10^6 px in 2 KB: the pixel count passes, its side does not; then the aspect ratio within the side.
    assert "limits.max_side" in refused(413, load_image, png(1, 1_000_000), SIZE, limits)
    assert "limits.max_aspect_ratio" in refused(413, load_image, png(4000, 1), SIZE, limits)
    assert "limits.max_pixels" in refused(413, load_image, png(1024, 1024), SIZE, limits)
    wide = Limits(max_aspect_ratio=1000.0, max_resize_pixels=100_000)  # resizing 800x1 to 16 px: 204,800 px
    assert "limits.max_resize_pixels" in refused(413, load_image, png(800, 1), SIZE, wide)
    assert time.perf_counter() - start < 2.0  # before: 1 x 10^6 took 23 s and ~2 GB in the ingress
    x = load_image(png(40, 30, "RGB"), SIZE, limits)
    assert x.shape == (3, SIZE, SIZE) and x.abs().max() <= 1
    assert "not an image" in refused(400, load_image, b"definitely not an image", SIZE, limits)


def test_json_and_text_parsing_raise_nothing_but_4xx():
    deep_array, deep_object = "[" * 100_000 + "]" * 100_000, '{"a":' * 5000 + "1" + "}" * 5000
    for text in (deep_array, deep_object, '{"n": ' + "9" * 5000 + "}", "[NaN]", '{"a": Infinity}',
                 '{"steps": 1, "steps": 99}'):
        refused(422, loads, text, 16, 20)
    refused(400, loads, b"\xff\xfe{", 16, 20)
    assert loads('{"s": "[[[[[[[[[[[[[[[[[[[[", "n": [1, [2]]}', 3, 20) == {"s": "[" * 20, "n": [1, [2]]}
    assert parse_int(" 42 ", "n", 20) == 42 and parse_float("-0.5", "alpha") == -0.5
    for bad in ("9" * 5000, "1e3", "true", "", "0x10"):
        refused(422, parse_int, bad, "n", 20)
    for bad in ("nan", "inf", "1e999", "0x1p3", "1" * 5000):
        refused(422, parse_float, bad, "alpha")


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.binary(max_size=64) | st.text(alphabet='[]{}",:0123456789.eE-+ \\aNInfity', max_size=64))
def test_any_bytes_parse_or_fail_with_a_4xx(data):
    try:
        loads(data, 4, 6)
    except ApiError as exc:
        assert exc.status in (400, 422)


def text_payload(**fields: str) -> Payload:
    return Payload(fields=dict(fields), text=set(fields))


def test_strict_types_and_ranges_of_the_schemas():
    limits = Limits(**LIMITS)
    assert validate(EncodeParams, Payload(fields={"steps": 3}, images={"image": b""}), limits).steps == 3
    assert validate(EncodeParams, text_payload(steps="3", image="x"), limits).steps == 3  # forms are text
    for fields in ({"steps": True}, {"steps": "3"}, {"steps": 3.0}, {"seed": False}, {"seed": -1},
                   {"steps": None}, {"stepz": 3}):
        refused(422, validate, EncodeParams, Payload(fields=fields, images={"image": b""}), limits)
    assert "`image`" in refused(422, validate, EncodeParams, Payload(), limits)
    assert "`n` must be in [1, 3]" in refused(422, validate, SampleParams, Payload(fields={"n": 4}), limits)
    refused(422, validate, InterpolateParams, Payload(fields={"n": 1}, images={"image_a": b"", "image_b": b""}),
            limits)
    manipulate = {"z_sem": [0.0] * Z_DIM, "x_T": ZERO_X_T}
    for fields in ({"attribute": "red", "alpha": True}, {"attribute": "red", "alpha": 2.0}, {"attribute": "red"},
                   {"edits": {"red": True}}, {"attribute": "red", "alpha": loads("1e999", 2, 20)}):
        refused(422, validate, ManipulateParams, Payload(fields={**manipulate, **fields}), limits)
    form = text_payload(z_sem=json.dumps([0.0] * Z_DIM), x_T=ZERO_X_T, edits='{"red": 0.5}')
    assert validate(ManipulateParams, form, limits).edits == {"red": 0.5}
    refused(422, validate, ManipulateParams, text_payload(z_sem="[" * 50 + "]" * 50, x_T=ZERO_X_T,
                                                          attribute="red", alpha="0.1"), limits)


def test_latents_must_stay_in_a_sane_range():
    refused(422, parse_z, [3.0e38] * Z_DIM, Z_DIM, 1000.0)  # finite in float32, inf after the first layer
    refused(422, parse_z, [1.0] * 7, Z_DIM, 1000.0)
    assert parse_z([999.0] * Z_DIM, Z_DIM, 1000.0).dtype == np.float32
    huge = base64.b64encode(np.full((3, SIZE, SIZE), 3e38, "<f4").tobytes()).decode()
    refused(422, parse_x_T, huge, SIZE, 1000.0)
    assert parse_x_T(ZERO_X_T, SIZE, 1000.0).shape == (3, SIZE, SIZE)


def test_openapi_bodies_state_ranges_required_fields_and_valid_examples():
    limits = Limits(**LIMITS)
    for model, required in ((EncodeParams, ["image"]), (SampleParams, None), (InterpolateParams, ["image_a"])):
        body = request_body(model, limits, SIZE, Z_DIM, ["round", "red"])
        schema = body["content"]["application/json"]["schema"]
        props = schema["properties"]
        assert props["steps"]["minimum"] == 1 and props["steps"]["maximum"] == limits.max_steps
        assert "null" not in json.dumps(body["content"]), "no field is nullable"
        assert body["required"] is (required is not None)
        if required:
            assert {"required": required} in schema["allOf"][0]["anyOf"]
        jsonschema.validate(schema["example"], schema)
        with pytest.raises(jsonschema.ValidationError):  # a boolean is not an integer
            jsonschema.validate({**schema["example"], "steps": True}, schema)
    sample = request_body(SampleParams, limits, SIZE, Z_DIM, [])["content"]["application/json"]["schema"]
    assert (sample["properties"]["n"]["maximum"], sample["properties"]["latent_steps"]["maximum"]) == (3, 4)
    manipulate = request_body(ManipulateParams, limits, SIZE, Z_DIM, ["round", "red"])["content"]
    props = manipulate["application/json"]["schema"]["properties"]
    assert (props["alpha"]["minimum"], props["alpha"]["maximum"]) == (-1.0, 1.0)
    assert props["z_sem"]["items"]["maximum"] == limits.max_latent_abs and props["z_sem"]["minItems"] == Z_DIM
    assert manipulate["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"
    jsonschema.validate(manipulate["application/json"]["schema"]["example"], manipulate["application/json"]["schema"])


def test_web_page_keeps_the_api_key_out_of_local_storage():
    script = (Path(__file__).parents[1] / "serving" / "static" / "app.js").read_text()
    assert "sessionStorage.getItem" in script
    assert "localStorage.getItem" not in script and "localStorage.setItem" not in script


# ---- the running app ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(ray_cluster, bundle, tmp_path_factory):  # noqa: F811 - `bundle` is test_serving's fixture
    from ray import serve

    from serving.cli import start

    keys_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys_file.write_text("")
    args = app_args(bundle, keys_file)
    args["limits"].update(LIMITS)
    # Ray keeps its sessions under its temp dir (RAY_TMPDIR, set by the ray_cluster fixture).
    logs = next(Path(ray_cluster["temp_dir"]).glob("**/session_latest")) / "logs" / "serve"
    url = start(args, port=free_port())
    seen = {p: p.stat().st_size for p in logs.glob("replica_diffae_Ingress_*.log")}  # earlier apps' lines
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            yield SimpleNamespace(url=url, client=client, port=int(url.rsplit(":", 1)[1]), logs=logs, seen=seen)
    finally:
        serve.shutdown()


def ingress_log(server) -> str:
    """What the ingress replicas wrote to their logs since this module's app started."""
    text = ""
    for path in server.logs.glob("replica_diffae_Ingress_*.log"):
        with path.open("rb") as f:
            f.seek(server.seen.get(path, 0))
            text += f.read().decode(errors="replace")
    return text


def test_hostile_inputs_get_4xx_over_http(server, images):  # noqa: F811 - test_serving's fixture
    c, image = server.client, b64(images[0])
    json_body = lambda text: {"content": text.encode(), "headers": {"content-type": "application/json"}}  # noqa: E731
    start = time.perf_counter()
    cases = [
        (413, "/v1/encode", {"files": {"image": ("strip.png", png(1, 1_000_000))}}),
        (413, "/v1/reconstruct", {"files": {"image": ("strip.png", png(4000, 1))}}),
        (422, "/v1/encode", json_body("[" * 100_000 + "]" * 100_000)),
        (422, "/v1/encode", json_body('{"image": ' + '{"a":' * 3000 + "1" + "}" * 3000 + "}")),
        (422, "/v1/decode", {"data": {"z_sem": "[" * 5000 + "]" * 5000}}),
        (422, "/v1/sample", json_body('{"n": ' + "9" * 5000 + "}")),
        (422, "/v1/sample", {"data": {"n": "9" * 5000}}),
        (422, "/v1/sample?steps=" + "9" * 5000, {}),
        (422, "/v1/sample", {"json": {"steps": True}}),
        (422, "/v1/sample", {"json": {"n": 2}, "params": {"n": "2"}}),  # the same field twice
        (422, "/v1/decode", {"json": {"z_sem": [3.0e38] * Z_DIM, "format": "json"}}),
        (422, "/v1/classify", {"json": {"z_sem": [3.0e38] * Z_DIM}}),
        (422, "/v1/manipulate", {"json": {"z_sem": [3.0e38] * Z_DIM, "x_T": ZERO_X_T, "attribute": "red",
                                          "alpha": 1.0, "format": "json"}}),
        (422, "/v1/decode", {"json": {"z_sem": [{"a": 1}] * Z_DIM}}),
        (422, "/v1/decode", json_body('{"z_sem": [1e999' + ", 0" * (Z_DIM - 1) + "]}")),
        (422, "/v1/sample", json_body('{"n": 1, "n": 2}')),
        (422, "/v1/encode", {"files": [("image", ("a.png", images[0])), ("image", ("b.png", b"junk"))]}),
        (422, "/v1/encode", {"files": {"image": ("a.png", images[0])}, "data": {"image": b64(b"junk")}}),
        (422, "/v1/encode", {"json": {"image": image, "steps": None}}),
        (400, "/v1/encode", {"files": {"image": ("x.png", b"definitely not an image")}}),
    ]
    for status, path, kwargs in cases:
        body = assert_error(c.post(path, **kwargs), status)
        assert " at 0x" not in body["message"] and len(body["message"]) < 1000, body
    assert time.perf_counter() - start < 30
    ok = c.post("/v1/classify", json={"z_sem": [999.0] * Z_DIM})  # large but within the range: finite
    assert ok.status_code == 200, ok.text
    assert_healthy(server)


async def _trickle(port: int, seconds: float, stall: bool = False) -> tuple[float, str]:
    """A client that sends a body one byte every 0.2 s (or half of it, then nothing); (seconds, status line)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.perf_counter()
    writer.write(b"POST /v1/classify HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 10000\r\n\r\n" + (b" " * 5000 if stall else b""))
    try:
        while time.perf_counter() - start < seconds:
            if not stall:
                writer.write(b" ")
                await writer.drain()
            try:
                line = await asyncio.wait_for(reader.readline(), 0.2)
                if line:
                    return time.perf_counter() - start, line.decode().strip()
            except TimeoutError:
                pass
        return time.perf_counter() - start, "no answer"
    finally:
        writer.close()


async def _probe(url: str, seconds: float) -> list[int]:
    codes = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            codes.append((await client.post("/v1/classify", json={"z_sem": [0.0] * Z_DIM})).status_code)
            await asyncio.sleep(0.2)
    return codes


def test_slow_uploads_get_408_and_never_lock_out_fully_read_requests(server):
    """3 x max_uploading tricklers (before: 128 of them held every request at 503 for over a minute)."""
    async def scenario():
        clients = [_trickle(server.port, 10.0) for _ in range(3 * LIMITS["max_uploading"])]
        clients.append(_trickle(server.port, 10.0, stall=True))
        return await asyncio.gather(_probe(server.url, 4.0), *clients)

    probes, *trickled = asyncio.run(scenario())
    print(f"probes while trickling: {Counter(probes)}; tricklers: "
          f"{Counter(line for _, line in trickled)} after {[round(t, 1) for t, _ in trickled]} s")
    assert probes and set(probes) == {200}, probes
    assert all(" 408 " in line for _, line in trickled), trickled
    assert max(t for t, _ in trickled) < LIMITS["body_timeout_s"] + 2
    assert_healthy(server)


def test_client_disconnects_are_499_not_500_and_one_log_line(server, images):  # noqa: F811
    async def hang_up_mid_body() -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /v1/encode HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"image\": ")
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()

    async def hang_up_mid_compute() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            request = asyncio.create_task(client.post("/v1/reconstruct", json={"image": b64(images[0]), "steps": 4}))
            await asyncio.sleep(0.3)
            request.cancel()
            await asyncio.gather(request, return_exceptions=True)

    for _ in range(2):
        asyncio.run(hang_up_mid_body())
    asyncio.run(hang_up_mid_compute())
    deadline, samples = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        samples = scrape()
        if total(samples, "ray_diffae_requests_total", route="/v1/encode", code="499") >= 2:
            break
        time.sleep(1)
    assert total(samples, "ray_diffae_requests_total", route="/v1/encode", code="499") >= 2, samples
    assert total(samples, "ray_diffae_requests_total", code="500") == 0
    log = ingress_log(server)
    assert log.count("client closed POST /v1/encode") >= 2 and "Traceback" not in log
    assert_healthy(server)


# ---- fuzzing: every operation, against the running app -----------------------------------------------------
OPERATIONS = ["GET /healthz", "GET /v1/model"] + [f"POST /v1/{name}" for name in (
    "encode", "decode", "reconstruct", "manipulate", "interpolate", "sample", "classify")]


@pytest.fixture(scope="module")
def api_schema(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    assert sorted(r.ok().label for r in schema.get_all_operations()) == sorted(OPERATIONS)  # none escapes
    return schema


@pytest.mark.parametrize("label", OPERATIONS)
def test_fuzz_every_operation_no_5xx_and_responses_match_the_schema(api_schema, label):
    """The schema's examples, then generated cases (a bounded number, derandomised), over real HTTP."""
    from schemathesis import checks

    operation = api_schema.find_operation_by_label(label)
    validate_checks = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
                       checks.response_schema_conformance, checks.response_headers_conformance]
    seen: Counter[int] = Counter()

    def call(case) -> None:
        seen[case.call_and_validate(timeout=60, checks=validate_checks).status_code] += 1

    for strategy, examples in [(s, 1) for s in operation.get_strategies_from_examples()] + [
            (operation.as_strategy(), 12)]:
        settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                 phases=[Phase.generate], suppress_health_check=list(HealthCheck))(given(case=strategy)(call))()
    print(f"{label}: {sum(seen.values())} cases, status codes {dict(seen)}")
    assert seen
