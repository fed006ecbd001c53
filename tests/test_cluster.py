"""cluster/: manifests, Ray configs, Prometheus rules and the Grafana dashboard are checked against the real
tools (kubernetes-validate's schemas, KubeRay's CRD schemas, Ray's own config schema and packager, promtool)
and the real code (job parsers, serve import path, metric definitions), and the metrics are proven end to
end through a real Prometheus scraping Ray's metrics export port while the Serve app answers requests and
a training runs.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import re
import shlex
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import free_port, micro_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
PROMETHEUS_DIR = CLUSTER / "prometheus"
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
        pytest.fail("promtool not found: install Debian's prometheus package (apt-get install -y prometheus)")
    return path


# ---- files parse and validate ---------------------------------------------------------------------


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
    for argv in steps:
        module = importlib.import_module(argv[2])
        args = module.build_parser().parse_args(argv[3:])  # SystemExit on an unknown flag
        assert callable(module.main), argv[2]
        for value in vars(args).values():
            assert not (isinstance(value, str) and value.startswith("$")), f"unexpanded variable in {argv}"


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


# ---- a real Prometheus --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prometheus(ray_cluster, tmp_path_factory):
    """Debian's prometheus on 127.0.0.1 scraping Ray's metrics export port every second, with our alert
    rules loaded. Yields its base URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found: install Debian's prometheus package (apt-get install -y prometheus)")
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
