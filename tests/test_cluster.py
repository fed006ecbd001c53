"""cluster/: manifests, Ray configs, Prometheus rules and the Grafana dashboard are checked against the real
tools (kubernetes-validate's schemas, KubeRay's CRD schemas, Ray's own config schema and packager, promtool)
and the real code (job parsers, serve import path, metric definitions), and the metrics are proven end to
end through a real Prometheus scraping Ray's metrics export port while the Serve app answers requests and
a training runs.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import free_port, micro_config, smooth_images

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
PROMETHEUS_DIR = CLUSTER / "prometheus"
DASHBOARD = CLUSTER / "grafana" / "diffae.json"
SERVE_CONFIG = ROOT / "serving" / "serve_config.yaml"
KUBERNETES_VERSION = "1.30"  # the oldest Kubernetes the manifests target
IMAGE_WORKDIR = "/home/ray/diffae-ray"  # where cluster/Dockerfile puts this repository
VERSION = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)[1]  # = the image tag


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _ray_manifest(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the RayJob/RayService object, its Ray cluster spec)."""
    (obj,) = _docs(KUBERAY / name)
    spec = obj["spec"]
    return obj, spec.get("rayClusterSpec") or spec.get("rayClusterConfig")


def _pod_templates(obj: dict[str, Any], cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    templates = {"head": cluster["headGroupSpec"]["template"]}
    templates.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    if "submitterPodTemplate" in obj["spec"]:
        templates["submitter"] = obj["spec"]["submitterPodTemplate"]
    return templates


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not found: Debian's package `prometheus` is not installed (make test installs it as root)")
    return path


# ---- files parse and validate ---------------------------------------------------------------------
def test_every_yaml_parses_and_generated_files_are_current():
    files = sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml")) + [SERVE_CONFIG]
    assert len(files) >= 9
    for path in files:
        assert _docs(path), f"{path} is empty"
    json.loads(DASHBOARD.read_text())
    check = subprocess.run([sys.executable, str(CLUSTER / "generate.py"), "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_generated_manifests_embed_their_sources(tmp_path):
    service, _ = _ray_manifest("rayservice.yaml")
    serve_config = yaml.safe_load(SERVE_CONFIG.read_text())
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == serve_config
    # A model upgrade: the same RayService with only the bundle URI changed.
    upgrade = tmp_path / "rayservice-v2.yaml"
    subprocess.run([sys.executable, str(CLUSTER / "generate.py"), "--bundle", "s3://models/v2", "--out", str(upgrade)],
                   check=True, capture_output=True)
    (upgraded,) = _docs(upgrade)
    serve_config["applications"][0]["args"]["bundle"] = "s3://models/v2"
    assert yaml.safe_load(upgraded["spec"].pop("serveConfigV2")) == serve_config
    service["spec"].pop("serveConfigV2")
    assert upgraded == service
    _, rule = _docs(PROMETHEUS_DIR / "kuberay-monitoring.yaml")
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"] == yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())


def test_kubernetes_objects_validate():
    import kubernetes_validate

    def validate(obj: dict[str, Any]) -> None:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)

    count = 0
    for name in ("rayjob-train.yaml", "rayservice.yaml"):
        obj, cluster = _ray_manifest(name)
        for group, template in _pod_templates(obj, cluster).items():
            validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{name}-{group}"},
                      "template": template})
            count += 1
    for doc in _docs(KUBERAY / "network-policy.yaml"):
        validate(doc)
        count += 1
    assert count == 6
    broken = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
              "template": {"spec": {"containers": [{"name": "c", "image": "i", "resourcez": {}}]}}}
    with pytest.raises(kubernetes_validate.ValidationError):  # the validator really looks
        validate(broken)


def _strict(schema: Any) -> Any:
    """A CRD schema that rejects unknown fields (the API server would silently drop them)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {k: _strict(v) for k, v in schema.items()}
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema.setdefault("additionalProperties", False)
    return schema


def test_kuberay_manifests_validate_against_the_kuberay_crds():
    import gzip

    import jsonschema

    vendored = json.loads(gzip.decompress((KUBERAY / "crd-schemas.json.gz").read_bytes()))
    for name, kind in (("rayjob-train.yaml", "RayJob"), ("rayservice.yaml", "RayService")):
        obj, _ = _ray_manifest(name)
        assert obj["kind"] == kind
        validator = jsonschema.Draft7Validator(_strict(vendored["schemas"][kind]))
        errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(obj)]
        assert not errors, f"{name} vs KubeRay {vendored['kuberay']}: {errors}"
        typo = json.loads(json.dumps(obj))
        typo["spec"]["shutdownAfterJobFinish"] = True  # the validator really rejects unknown fields
        assert not validator.is_valid(typo)


def _check_ray_cluster(cluster: dict[str, Any], dockerfile_ray: str) -> None:
    import ray

    assert cluster["rayVersion"] == dockerfile_ray == ray.__version__
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "the dashboard must not be exposed"
    groups = cluster["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        tolerations = group["template"]["spec"]["tolerations"]
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    for template in [head["template"]] + [g["template"] for g in groups]:
        for container in template["spec"]["containers"]:
            assert container["image"].endswith(f"/diffae-ray:{VERSION}")
            assert "ray stop" in " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
            env = _env(container)
            assert env["RAY_AUTH_MODE"] == "token"
            assert env["RAY_AUTH_TOKEN"]["secretKeyRef"]["name"] == "diffae-ray-auth"


def _dockerfile_ray_version() -> str:
    return re.search(r"^FROM rayproject/ray:([\d.]+)-", (CLUSTER / "Dockerfile").read_text(), re.M)[1]


def test_the_package_pins_the_cluster_images_ray():
    """Client and cluster must run the same Ray: pyproject's compatible-release pin names the image's version."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray_pin,) = [d for d in deps if d.startswith("ray[")]
    assert ray_pin.split("~=")[1].split()[0] == _dockerfile_ray_version(), ray_pin
    (torch_pin,) = [d for d in deps if d.startswith("torch>")]
    assert torch_pin.startswith("torch>=") and "==" not in torch_pin  # a CUDA or NGC build of torch also fits


def test_rayjob_has_what_kuberay_needs_and_runs_the_real_pipeline():
    job, cluster = _ray_manifest("rayjob-train.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert 3600 <= spec["activeDeadlineSeconds"] <= 7 * 86400
    _check_ray_cluster(cluster, _dockerfile_ray_version())
    # The entrypoint is the repository's pipeline script, at the path the image puts it.
    command = shlex.split(spec["entrypoint"])
    assert command[0] == "bash" and command[1].startswith(IMAGE_WORKDIR + "/")
    script = ROOT / command[1][len(IMAGE_WORKDIR) + 1:]
    assert script.is_file()
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    gpus = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in cluster["workerGroupSpecs"])
    assert int(env["DIFFAE_NUM_WORKERS"]) <= gpus, "Ray Train would wait forever for GPUs"
    _check_pipeline_commands(script, env)


def _check_pipeline_commands(script: Path, env: dict[str, str]) -> None:
    """Dry-run the script and parse every step with the real job module's own argument parser."""
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={"PATH": "/usr/bin:/bin", **env, "DIFFAE_DRY_RUN": "1"}).stdout
    steps = [shlex.split(line) for line in out.splitlines() if line.startswith("python -m ")]
    modules = [argv[2] for argv in steps]
    assert modules[0] == "pipelines.data" and "pipelines.train_autoencoder" in modules
    from pipelines import jobkit

    for argv in steps:
        module = importlib.import_module(argv[2])
        (job,) = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, jobkit.JobConfig)
                  and c.__module__ == module.__name__]
        args = jobkit.build_parser(job).parse_args(argv[3:])  # SystemExit on an unknown flag
        assert callable(module.main), argv[2]
        for value in vars(args).values():
            assert not (isinstance(value, str) and value.startswith("$")), f"unexpanded variable in {argv}"


def test_rayservice_has_what_kuberay_needs_and_imports_the_real_app():
    service, cluster = _ray_manifest("rayservice.yaml")
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    _check_ray_cluster(cluster, _dockerfile_ray_version())
    assert cluster["enableInTreeAutoscaling"] is True
    assert any(g["maxReplicas"] > g["minReplicas"] for g in cluster["workerGroupSpecs"])
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    module_name, attr = app["import_path"].split(":")
    build_app = getattr(importlib.import_module(module_name), attr)
    assert callable(build_app)
    from serving.settings import AppSettings

    settings = AppSettings.from_args(app["args"])  # the args the cluster will pass are valid
    for deployment in serve_config["applications"][0]["deployments"]:
        assert deployment["autoscaling_config"]["max_replicas"] >= deployment["autoscaling_config"]["min_replicas"]
    # API keys come from a Secret, in the variable the app reads, on every node that runs replicas.
    for template in _pod_templates(service, cluster).values():
        (container,) = template["spec"]["containers"]
        assert _env(container)[settings.api_keys_env]["secretKeyRef"]["name"] == "diffae-api-keys"
    for group in cluster["workerGroupSpecs"]:
        probe = group["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]
        assert probe["path"] == "/healthz" and probe["port"] == serve_config["http_options"]["port"]


def test_ray_cluster_launcher_config_and_runtime_env_pass_rays_own_checks():
    """`ray up`'s own JSON schema (shipped with Ray) accepts the launcher config; RuntimeEnv accepts the runtime
    env. tests/test_jobs_submit.py submits a job with this runtime env, which packs it with Ray's packager."""
    import jsonschema
    import ray.autoscaler
    from ray.runtime_env import RuntimeEnv

    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert config["docker"]["image"].endswith(f"/diffae-ray:{VERSION}")
    gpu = config["available_node_types"]["gpu_worker"]
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= config["max_workers"]
    assert any("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"])

    runtime_env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**runtime_env)
    _check_pipeline_commands(CLUSTER / "train_pipeline.sh", runtime_env["env_vars"])


# ---- Prometheus config, rules and metric names ----------------------------------------------------
def test_promtool_checks_config_and_rules_and_unit_tests_the_alerts():
    promtool = _promtool()
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "rules.yml"],
                 ["test", "rules", "rules_test.yml"]):
        done = subprocess.run([promtool, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True)
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    alerts = {r["alert"] for g in yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())["groups"]
              for r in g["rules"]}
    assert {"DiffaeServingErrorRatioHigh", "DiffaeServingLatencyP95High", "DiffaeServingReplicasAtMax",
            "DiffaeTrainingStalled", "DiffaeTrainingLossNotFinite"} <= alerts


METRIC_DEF = re.compile(r"\b(Counter|Gauge|Histogram)\(\s*\"(diffae_\w+)\"")
SERIES = re.compile(r"\b(ray_\w+)")
RAY_SERVE_METRICS = ("serve_deployment_replica_healthy", "serve_autoscaling_target_replicas",
                     "serve_autoscaling_desired_replicas")


def exported_metrics() -> dict[str, str]:
    """Every diffae_* metric the code defines (serving and pipelines), name -> type."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / "serving").rglob("*.py")) + sorted((ROOT / "pipelines").rglob("*.py")):
        for kind, name in METRIC_DEF.findall(path.read_text()):
            assert found.setdefault(name, kind) == kind, f"{name} defined twice with different types"
    return found


def _expressions() -> dict[str, list[str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v.get("definition")]
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())
    return {"dashboard": exprs, "rules": [r["expr"] for g in rules["groups"] for r in g["rules"]]}


def _series_to_metric(series: str, metrics: dict[str, str]) -> str | None:
    name = series.removeprefix("ray_")
    for suffix in ("_bucket", "_sum", "_count", ""):
        base = name.removesuffix(suffix) if suffix else name
        if name.endswith(suffix) and base in metrics and (suffix == "" or metrics[base] == "Histogram"):
            return base
    return None


def test_dashboard_and_rules_use_only_exported_metrics_and_show_them_all():
    import ray.serve

    metrics = exported_metrics()
    expected = {"diffae_requests_total", "diffae_request_seconds", "diffae_batch_size", "diffae_model_seconds",
                "diffae_denoise_steps_total", "diffae_train_loss", "diffae_train_images_per_second",
                "diffae_train_samples_total"}
    assert expected <= set(metrics), f"docs/architecture.md metrics missing from the code: {expected - set(metrics)}"
    serve_source = "".join(p.read_text() for p in Path(ray.serve.__file__).parent.rglob("*.py"))
    used: dict[str, set[str]] = {}
    for where, exprs in _expressions().items():
        for expr in exprs:
            for series in SERIES.findall(expr):
                if series.startswith("ray_serve_"):
                    assert series.removeprefix("ray_") in RAY_SERVE_METRICS, series
                    assert f'"{series.removeprefix("ray_")}"' in serve_source, f"Ray Serve has no {series}"
                    continue
                metric = _series_to_metric(series, metrics)
                assert metric is not None, f"{where} uses {series}, which no code exports (or a wrong suffix)"
                used.setdefault(where, set()).add(metric)
    assert used["dashboard"] == set(metrics), f"not on the dashboard: {set(metrics) - used['dashboard']}"


# ---- a real Prometheus --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prometheus(ray_cluster, tmp_path_factory):
    """Debian's prometheus on 127.0.0.1 scraping Ray's metrics export port every second, with our alert
    rules loaded. Yields its base URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not found: Debian's package `prometheus` is not installed (make test installs it as root)")
    tmp = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(PROMETHEUS_DIR / "rules.yml")],
        "scrape_configs": [{"job_name": "ray",
                            "static_configs": [{"targets": [f"127.0.0.1:{ray_cluster['metrics_port']}"]}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp / "prometheus.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _poll(lambda: proc.poll() is None and httpx.get(f"{url}/-/ready", timeout=2).status_code == 200,
              60, lambda: f"prometheus did not become ready:\n{(tmp / 'prometheus.log').read_text()[-3000:]}")
        _poll(lambda: _targets_up(url), 60, lambda: f"Ray's metrics port is not scraped: {_targets(url)}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _poll(condition, timeout: float, message, interval: float = 0.5):
    """Call ``condition`` until it returns a truthy value (returned) or ``timeout`` s pass (fail)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except (httpx.HTTPError, OSError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(message() if callable(message) else message)
        time.sleep(interval)


def _targets(url: str) -> list[dict[str, Any]]:
    return httpx.get(f"{url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]


def _targets_up(url: str) -> bool:
    return any(t["health"] == "up" for t in _targets(url))


def query(url: str, promql: str) -> list[tuple[dict[str, str], float]]:
    """An instant query: [(labels, value)]."""
    body = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert body["status"] == "success", body
    return [(r["metric"], float(r["value"][1])) for r in body["data"]["result"]]


def _scalar(url: str, promql: str) -> float | None:
    result = query(url, promql)
    return result[0][1] if result else None


def _png(image) -> str:
    from diffae_core.images import png_bytes

    return base64.b64encode(png_bytes(image)).decode()


def test_prometheus_counts_every_serving_request(ray_cluster, prometheus, tmp_path):
    from diffae_core import DiffAE
    from serving.cli import start, stop
    from serving.settings import DEPLOYMENTS

    app_name, n = "cluster-e2e", 7
    bundle = tmp_path / "bundle"
    DiffAE(micro_config()).save(str(bundle))
    small = {name: {"num_cpus": 0.1, "min_replicas": 1, "max_replicas": 1} for name in DEPLOYMENTS}
    url = start({"bundle": str(bundle), "deployments": small}, port=free_port(), name=app_name,
                route_prefix=f"/{app_name}")  # an earlier module's Serve keeps its port: start() says which
    try:
        image = _png(smooth_images(1, 16, seed=3)[0])
        with httpx.Client(base_url=f"{url}/{app_name}", timeout=60) as client:
            for _ in range(n):
                response = client.post("/v1/encode", json={"image": image})
                assert response.status_code == 200, response.text
        selector = f'application="{app_name}"'
        total = _poll(lambda: _scalar(prometheus, f"sum(ray_diffae_requests_total{{{selector}}}) == {n}"), 60,
                      lambda: f"Prometheus has {query(prometheus, f'ray_diffae_requests_total{{{selector}}}')}")
        assert total == n
        by_code = query(prometheus, f"sum by (code) (ray_diffae_requests_total{{{selector}}})")
        assert by_code == [({"code": "200"}, n)]
        # The other serving metrics of the same requests: latency histogram, batching and model time.
        assert _poll(lambda: _scalar(prometheus, f"sum(ray_diffae_request_seconds_count{{{selector}}}) == {n}"),
                     30, "no request latency histogram") == n
        # Sequential requests: each image is one encoder batch of size 1. (Ray 2.60 exports a histogram's
        # _sum from bucket midpoints, so the bucket counts are what can be checked exactly.)
        encoder = f'{selector}, deployment="Encoder"'
        assert _poll(lambda: _scalar(prometheus, f"sum(ray_diffae_batch_size_count{{{encoder}}}) == {n}"), 30,
                     lambda: f"batches: {query(prometheus, f'ray_diffae_batch_size_count{{{encoder}}}')}") == n
        assert _scalar(prometheus, f'sum(ray_diffae_batch_size_bucket{{{encoder}, le="1.0"}})') == n
        ops = query(prometheus, f"sum by (deployment, op) (ray_diffae_model_seconds_count{{{selector}}})")
        assert {(labels["deployment"], labels["op"]) for labels, _ in ops} >= {("Encoder", "encode")}
        healthy = f"sum(ray_serve_deployment_replica_healthy{{{selector}}}) == {len(DEPLOYMENTS)}"
        assert _poll(lambda: _scalar(prometheus, healthy), 30, "no Ray Serve replica metrics") == len(DEPLOYMENTS)
    finally:
        stop(app_name)


def test_prometheus_follows_a_training_run(ray_cluster, prometheus, tmp_path):
    from pipelines.train_autoencoder import TrainJobConfig, train_autoencoder

    model = micro_config()
    model.train = dataclasses.replace(model.train, batch_size=4, total_samples=4 * 24, ema_warmup_steps=1)
    run = "prometheus-e2e"
    job = TrainJobConfig(data="shapes:16", storage=str(tmp_path / "runs"), name=run, model=model,
                         num_workers=1, cpus_per_worker=1.0, log_every=1, checkpoint_every=10**9,
                         grid_every=10**9, grid_images=2, grid_steps=2)
    results: list[Any] = []
    errors: list[BaseException] = []

    def train() -> None:
        try:
            results.append(train_autoencoder(job))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    selector = f'run="{run}"'
    seen = _poll(lambda: errors or _scalar(prometheus, f"max(ray_diffae_train_samples_total{{{selector}}}) > 0"),
                 300, "no training samples reached Prometheus", interval=1.0)
    thread.join(timeout=600)
    assert not errors, errors
    assert results and results[0].summary["samples_seen"] == job.model.train.total_samples
    assert 0 < float(seen) <= job.model.train.total_samples
    window = "[10m]"
    loss = _scalar(prometheus, f"max(max_over_time(ray_diffae_train_loss{{{selector}}}{window}))")
    assert loss is not None and math.isfinite(loss) and loss > 0
    ips = _scalar(prometheus, f"max(max_over_time(ray_diffae_train_images_per_second{{{selector}}}{window}))")
    assert ips is not None and ips > 0
    # The counter never exceeds the run's samples and never goes backwards while the run lives.
    most = _scalar(prometheus, f"max(max_over_time(ray_diffae_train_samples_total{{{selector}}}{window}))")
    assert float(seen) <= most <= job.model.train.total_samples
    # Every alert rule evaluates without error against the live series.
    rules = httpx.get(f"{prometheus}/api/v1/rules", timeout=5).json()["data"]["groups"]
    health = {r["name"]: (r["health"], r.get("lastError")) for g in rules for r in g["rules"]}
    assert len(health) == 5 and all(h == "ok" for h, _ in health.values()), health
