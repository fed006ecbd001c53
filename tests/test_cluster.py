"""cluster/: manifests, Ray configs, Prometheus rules and the Grafana dashboard are checked against the real
tools (kubernetes-validate's schemas, KubeRay's and the Prometheus Operator's CRD schemas, Ray's own config
schema and packager, promtool) and the real code (job parsers, serve import path, Serve options, metric
definitions), and the metrics are proven end to end through a real Prometheus scraping Ray's metrics export
port while the Serve app answers requests and a training runs.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import importlib
import importlib.util
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
SERVE_GPU = KUBERAY / "serve-gpu.yaml"
GENERATED = [KUBERAY / "rayjob-train.yaml", KUBERAY / "rayservice.yaml", CLUSTER / "ray-cluster.yaml",
             PROMETHEUS_DIR / "kuberay-monitoring.yaml"]
IMAGE = yaml.safe_load((CLUSTER / "image.yaml").read_text())["image"]
SERVICE_ACCOUNT = "diffae-ray"
AUTH_SECRET = "diffae-ray-auth"
# KubeRay v1.7 reads the token from this key of authOptions.secretName (utils.RAY_AUTH_TOKEN_SECRET_KEY) and
# refuses token mode below this Ray version (utils/validation.go).
AUTH_SECRET_KEY = "auth_token"
KUBERAY_TOKEN_AUTH_MIN_RAY = (2, 52, 0)
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


def _generator():
    """cluster/generate.py as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("cluster_generate", CLUSTER / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _vendored(path: Path) -> dict[str, Any]:
    return json.loads(gzip.decompress(path.read_bytes()))


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
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    # serve_config.yaml, except what serve-gpu.yaml sets: the GPU deployments' num_gpus and dtype in the args
    # and the GPUs their replicas reserve (test_rayservice_gpu_replicas_fit_its_gpu_worker_group checks those).
    gpu = yaml.safe_load(SERVE_GPU.read_text())
    assert gpu and set(gpu) < set(embedded["applications"][0]["args"]["deployments"])
    for config in (embedded, serve_config):
        (app,) = config["applications"]
        for name, settings in app["args"]["deployments"].items():
            for key in gpu.get(name, {}):
                settings.pop(key, None)
        for options in app["deployments"]:
            options["ray_actor_options"].pop("num_gpus", None)
    assert embedded == serve_config
    # A model upgrade: the same RayService with only the bundle URI changed.
    upgrade = tmp_path / "rayservice-v2.yaml"
    subprocess.run([sys.executable, str(CLUSTER / "generate.py"), "--bundle", "s3://models/v2", "--out", str(upgrade)],
                   check=True, capture_output=True)
    (upgraded,) = _docs(upgrade)
    upgraded_config = yaml.safe_load(upgraded["spec"].pop("serveConfigV2"))
    current_config = yaml.safe_load(service["spec"].pop("serveConfigV2"))
    assert upgraded_config["applications"][0]["args"].pop("bundle") == "s3://models/v2"
    current_config["applications"][0]["args"].pop("bundle")
    assert upgraded_config == current_config
    assert upgraded == service
    _, _, rule = _docs(PROMETHEUS_DIR / "kuberay-monitoring.yaml")
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"] == yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())


def test_the_image_and_its_ray_version_are_named_once(monkeypatch, capsys):
    """cluster/image.yaml names the image and cluster/Dockerfile's base image the Ray version; every manifest
    gets both from the generator, and `generate.py --check` fails when a manifest no longer matches them."""
    generate = _generator()
    assert IMAGE.endswith(f"/diffae-ray:{VERSION}")
    assert generate.main(["--image"]) == 0 and capsys.readouterr().out.strip() == IMAGE
    ray_version = _dockerfile_ray_version()
    manifests = {path.name: _docs(path)[0] for path in GENERATED[:3]}
    images = [c["image"] for name in ("rayjob-train.yaml", "rayservice.yaml")
              for template in _pod_templates(*_ray_manifest(name)).values() for c in template["spec"]["containers"]]
    assert len(images) == 5 and set(images) == {IMAGE}
    assert manifests["ray-cluster.yaml"]["docker"]["image"] == IMAGE
    assert {_ray_manifest(name)[1]["rayVersion"] for name in ("rayjob-train.yaml", "rayservice.yaml")} == {ray_version}
    # Nothing else in the repository's cluster files and operations guide spells them out.
    generated = set(GENERATED) | {CLUSTER / "image.yaml"}
    for path in sorted(CLUSTER.rglob("*")) + [ROOT / "docs" / "operations.md"]:
        if path.is_file() and path not in generated and path.suffix != ".gz":
            text = path.read_text()
            assert IMAGE not in text, f"{path.relative_to(ROOT)} names the image: use ${{IMAGE}} or generate.py --image"
            assert f'rayVersion: "{ray_version}"' not in text, f"{path.relative_to(ROOT)}: use ${{RAY_VERSION}}"
    # Another image in image.yaml reaches every manifest that runs it, and --check reports each stale one.
    real = generate.placeholders

    def moved() -> dict[str, str]:
        return {**real(), "IMAGE": "registry.internal/diffae-ray:9.9.9"}

    monkeypatch.setattr(generate, "placeholders", moved)
    assert generate.main(["--check"]) == 1
    stale = capsys.readouterr().err
    for path in GENERATED[:3]:
        assert f"{path.relative_to(ROOT)} is out of date" in stale
        assert "image: registry.internal/diffae-ray:9.9.9" in generate.render(path)
    assert "kuberay-monitoring.yaml" not in stale
    monkeypatch.setattr(generate, "placeholders", lambda: {"IMAGE": "x"})
    with pytest.raises(ValueError, match=r"unknown \$\{RAY_VERSION\}"):  # a name without a value is an error
        generate.render(GENERATED[0])


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
    for doc in _docs(KUBERAY / "network-policy.yaml") + _docs(KUBERAY / "service-account.yaml"):
        validate(doc)
        count += 1
    assert count == 7
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


def _crd_errors(vendored: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(_strict(vendored["schemas"][obj["kind"]]))
    return [f"{obj['kind']} {'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(obj)]


def test_kuberay_manifests_validate_against_the_kuberay_crds():
    vendored = _vendored(KUBERAY / "crd-schemas.json.gz")
    assert vendored["kuberay"] == "v1.7.0"
    for name, kind in (("rayjob-train.yaml", "RayJob"), ("rayservice.yaml", "RayService")):
        obj, _ = _ray_manifest(name)
        assert obj["kind"] == kind
        assert not _crd_errors(vendored, obj), f"{name} vs KubeRay {vendored['kuberay']}"
        typo = json.loads(json.dumps(obj))
        typo["spec"]["shutdownAfterJobFinish"] = True  # the validator really rejects unknown fields
        assert _crd_errors(vendored, typo)
        no_mode = json.loads(json.dumps(obj))
        (no_mode["spec"].get("rayClusterSpec") or no_mode["spec"]["rayClusterConfig"])["authOptions"]["mode"] = "Token"
        assert _crd_errors(vendored, no_mode)  # authOptions.mode is an enum


def test_monitoring_objects_validate_against_the_prometheus_operator_crds():
    vendored = _vendored(PROMETHEUS_DIR / "crd-schemas.json.gz")
    docs = _docs(PROMETHEUS_DIR / "kuberay-monitoring.yaml")
    assert [d["kind"] for d in docs] == ["PodMonitor", "PodMonitor", "PrometheusRule"]
    for doc in docs:
        assert not _crd_errors(vendored, doc), f"vs Prometheus Operator {vendored['prometheus-operator']}"
    typo = json.loads(json.dumps(docs[0]))
    typo["spec"]["podMetricsEndpoints"][0]["relabelings"][0]["action"] = "copy"
    assert _crd_errors(vendored, typo)


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
            assert container["image"] == IMAGE
            assert "ray stop" in " ".join(container["lifecycle"]["preStop"]["exec"]["command"])


def _dockerfile_ray_version() -> str:
    return re.search(r"^FROM rayproject/ray:([\d.]+)-", (CLUSTER / "Dockerfile").read_text(), re.M)[1]


# KubeRay's own PodMonitor sample (config/prometheus/podMonitor.yaml, v1.7) relabels every endpoint so.
KUBERAY_RELABELING = {"action": "replace", "sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"],
                      "targetLabel": "ray_io_cluster"}


def test_podmonitors_relabel_like_kuberay_and_scrape_every_metrics_port_of_every_ray_pod():
    import ray

    monitors = [d for d in _docs(PROMETHEUS_DIR / "kuberay-monitoring.yaml") if d["kind"] == "PodMonitor"]
    for monitor in monitors:
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert KUBERAY_RELABELING in endpoint["relabelings"], (monitor["metadata"]["name"], endpoint["port"])
    # `ray_io_cluster` is the label Ray's own Grafana dashboards filter clusters by.
    dashboards = Path(ray.__file__).parent / "dashboard" / "modules" / "metrics" / "dashboards"
    assert any("ray_io_cluster" in path.read_text() for path in dashboards.glob("*.json"))
    # Ray's documented default metrics ports of the autoscaler and the dashboard (Ray's metrics guide)
    default_ports = {"as-metrics": 44217, "dash-metrics": 44227}
    (policy,) = _docs(KUBERAY / "network-policy.yaml")
    (from_monitoring,) = [rule for rule in policy["spec"]["ingress"] for peer in rule.get("from", [])
                          if peer.get("namespaceSelector", {}).get("matchLabels", {}).get(
                              "kubernetes.io/metadata.name") == "monitoring"]
    open_to_prometheus = {port["port"] for port in from_monitoring["ports"]}
    scraped: dict[str, set[str]] = {m["metadata"]["name"]: set() for m in monitors}
    for name, obj, cluster in _kuberay_manifests():
        groups = [("head", cluster["headGroupSpec"])] + [("worker", g) for g in cluster["workerGroupSpecs"]]
        for node_type, group in groups:
            # The labels KubeRay puts on the pod next to the template's own.
            labels = {**group["template"]["metadata"]["labels"], "ray.io/node-type": node_type,
                      "ray.io/is-ray-node": "yes", "ray.io/cluster": obj["metadata"]["name"]}
            selecting = [m for m in monitors if m["spec"]["selector"]["matchLabels"].items() <= labels.items()]
            assert len(selecting) == 1, f"{name} {node_type}: scraped by {len(selecting)} PodMonitors"
            ports = {port["name"]: port["containerPort"] for container in group["template"]["spec"]["containers"]
                     for port in container.get("ports", [])}
            metrics = {port for port in ports if port.endswith("metrics")}
            endpoints = {e["port"] for e in selecting[0]["spec"]["podMetricsEndpoints"]}
            assert metrics <= endpoints, f"{name} {node_type}: {metrics - endpoints} not scraped"
            assert ports["metrics"] == int(group["rayStartParams"]["metrics-export-port"])
            for port, number in default_ports.items():
                assert ports.get(port, number) == number, f"{name} {node_type}: Ray exports {port} on {number}"
            assert {ports[port] for port in metrics} <= open_to_prometheus, "the network policy blocks a scrape"
            scraped[selecting[0]["metadata"]["name"]] |= metrics
        # Only an autoscaled cluster runs the autoscaler whose metrics `as-metrics` carries.
        head_ports = {p["name"] for c in cluster["headGroupSpec"]["template"]["spec"]["containers"] for p in c["ports"]}
        assert ("as-metrics" in head_ports) == bool(cluster.get("enableInTreeAutoscaling")), name
        submitter = obj["spec"].get("submitterPodTemplate", {}).get("metadata", {}).get("labels", {})
        assert not any(m["spec"]["selector"]["matchLabels"].items() <= submitter.items() for m in monitors)
    for monitor in monitors:  # every endpoint names a port some selected pod has
        assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} == scraped[monitor["metadata"]["name"]]


def test_the_package_pins_the_cluster_images_ray():
    """Client and cluster must run the same Ray: pyproject's compatible-release pin names the image's version."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray_pin,) = [d for d in deps if d.startswith("ray[")]
    assert ray_pin.split("~=")[1].split()[0] == _dockerfile_ray_version(), ray_pin
    (torch_pin,) = [d for d in deps if d.startswith("torch>")]
    assert torch_pin.startswith("torch>=") and "==" not in torch_pin  # a CUDA or NGC build of torch also fits


def _kuberay_manifests() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [(name, *_ray_manifest(name)) for name in ("rayjob-train.yaml", "rayservice.yaml")]


def test_every_ray_cluster_uses_kuberay_token_auth_with_the_secret_it_reads():
    """KubeRay sends the token to the dashboard, and sets RAY_AUTH_MODE / RAY_AUTH_TOKEN on every container it
    runs, only for a cluster spec with authOptions; it reads the token from the Secret's key `auth_token`."""
    for name, obj, cluster in _kuberay_manifests():
        assert cluster["authOptions"] == {"mode": "token", "secretName": AUTH_SECRET}, name
        ray_version = tuple(int(part) for part in cluster["rayVersion"].split("."))
        assert ray_version >= KUBERAY_TOKEN_AUTH_MIN_RAY, f"KubeRay refuses token auth on Ray {cluster['rayVersion']}"
        # KubeRay adds its variables only where a container has none: a hand-set one would win over them.
        containers = [c for t in _pod_templates(obj, cluster).values() for c in t["spec"]["containers"]]
        containers.append(cluster.get("autoscalerOptions", {}))
        for container in containers:
            assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & set(_env(container)), f"{name}: leave them to KubeRay"
    # Wherever the Secret is explained, it is created with the key KubeRay reads.
    create = f"kubectl create secret generic {AUTH_SECRET} --from-literal={AUTH_SECRET_KEY}="
    for path in (KUBERAY / "rayjob-train.yaml", KUBERAY / "rayservice.yaml", ROOT / "docs" / "operations.md"):
        text = path.read_text()
        assert create in text, f"{path.relative_to(ROOT)} does not say how to create the Secret"
        assert f"{AUTH_SECRET} --from-literal=token=" not in text


def test_pods_run_as_the_service_account_and_only_the_autoscaler_gets_an_api_token():
    (account,) = _docs(KUBERAY / "service-account.yaml")
    assert account["kind"] == "ServiceAccount" and account["metadata"]["name"] == SERVICE_ACCOUNT
    assert account["automountServiceAccountToken"] is False
    # KubeRay creates (and binds to the head's account) the autoscaler's Role itself: none is shipped here.
    kinds = {d.get("kind") for path in KUBERAY.glob("*.yaml") for d in _docs(path)}
    assert not kinds & {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
    heads_with_token = []
    for name, obj, cluster in _kuberay_manifests():
        for group, template in _pod_templates(obj, cluster).items():
            spec = template["spec"]
            assert spec["serviceAccountName"] == SERVICE_ACCOUNT, f"{name} {group}"
            if spec.get("automountServiceAccountToken", False):
                heads_with_token.append(f"{name} {group}")
        # An autoscaled cluster's head runs KubeRay's autoscaler, which scales pods through the Kubernetes API.
        if cluster.get("enableInTreeAutoscaling"):
            assert cluster["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] is True
    assert heads_with_token == ["rayservice.yaml head"]


def _quantity(value: Any) -> float:
    """A Kubernetes quantity of CPUs or GPUs ("6", 1, "500m") as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _ray_node(group: dict[str, Any]) -> tuple[float, int]:
    """(CPUs, GPUs) that Ray advertises on one pod of a head or worker group, as KubeRay starts it: the
    rayStartParams num-cpus / num-gpus where given, else the Ray container's limits (CPUs: else requests,
    rounded up). The GPUs must be the ones Kubernetes gives the pod."""
    container = group["template"]["spec"]["containers"][0]  # KubeRay's Ray container
    limits = container["resources"].get("limits", {})
    requests = container["resources"].get("requests", {})
    gpus = int(limits.get("nvidia.com/gpu", 0))
    assert int(requests.get("nvidia.com/gpu", gpus)) == gpus, "Kubernetes needs GPU requests == limits"
    params = group["rayStartParams"]
    if "num-gpus" in params:
        assert int(params["num-gpus"]) == gpus, "Ray would advertise other GPUs than the pod has"
    if gpus:
        assert any(t["key"] == "nvidia.com/gpu" for t in group["template"]["spec"].get("tolerations", []))
    cpus = float(params["num-cpus"]) if "num-cpus" in params else math.ceil(
        _quantity(limits.get("cpu", requests.get("cpu", 0))))
    return cpus, gpus


def _ray_nodes(cluster: dict[str, Any], size: str) -> list[tuple[float, int]]:
    """The head and ``size`` ("minReplicas" or "maxReplicas") pods of every worker group."""
    return [_ray_node(cluster["headGroupSpec"])] + [
        _ray_node(g) for g in cluster["workerGroupSpecs"] for _ in range(g[size])]


def _fits(replicas: list[tuple[float, float]], nodes: list[tuple[float, int]]) -> bool:
    """Whether replicas, each (CPUs, GPUs), can be placed on Ray nodes, each (CPUs, GPUs): first fit, the
    largest GPU share first. As in Ray, a fractional share comes from one GPU; a whole number of GPUs takes
    that many unshared GPUs of one node. True means a placement exists."""
    free = [[cpus, [1.0] * gpus] for cpus, gpus in nodes]
    for cpus, share in sorted(replicas, key=lambda r: (r[1], r[0]), reverse=True):
        for node in free:
            if node[0] + 1e-9 < cpus:
                continue
            if share >= 1:
                whole = [i for i, f in enumerate(node[1]) if f >= 1 - 1e-9]
                if share != int(share) or len(whole) < share:
                    continue
                for i in whole[: int(share)]:
                    node[1][i] = 0.0
            elif share > 0:
                shared = [i for i, f in enumerate(node[1]) if f + 1e-9 >= share]
                if not shared:
                    continue
                node[1][shared[0]] -= share
            node[0] -= cpus
            break
        else:
            return False
    return True


def test_rayservice_gpu_replicas_fit_its_gpu_worker_group():
    """The serving group's GPUs are what Serve's GPU replicas ask for: each GPU deployment's share fits a pod
    of a GPU group, and all replicas fit the cluster at the deployments' min_replicas on the groups' minReplicas
    pods and at max_replicas on maxReplicas pods."""
    from serving.app import deployment_options
    from serving.settings import DEPLOYMENTS, AppSettings

    service, cluster = _ray_manifest("rayservice.yaml")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    settings = AppSettings.from_args(app["args"]).deployments
    # The deployments section (which Serve applies over the code's options) reserves what build_app derives.
    options = {d.pop("name"): d for d in app["deployments"]}
    assert options == {name: deployment_options(s) for name, s in settings.items()}
    gpu = {name: s for name, s in settings.items() if s.num_gpus > 0}
    assert set(gpu) == set(yaml.safe_load(SERVE_GPU.read_text())) == {"Encoder", "Decoder"}
    for name in set(DEPLOYMENTS) - set(gpu):
        assert settings[name].dtype != "fp16", f"{name} computes on the CPU, where fp16 is not offered"
    assert all(s.dtype == "bf16" for s in gpu.values())
    gpu_pods = [_ray_node(g) for g in cluster["workerGroupSpecs"] if _ray_node(g)[1] > 0]
    for name, s in gpu.items():
        assert any(gpus >= math.ceil(s.num_gpus) and cpus >= s.num_cpus for cpus, gpus in gpu_pods), name
        assert s.num_gpus < 1 or s.num_gpus == int(s.num_gpus), f"{name}: more than one GPU must be whole GPUs"

    def demand(replicas: str, changed: dict[str, float] | None = None) -> list[tuple[float, float]]:
        return [(s.num_cpus, (changed or {}).get(name, s.num_gpus))
                for name, s in settings.items() for _ in range(s.autoscaling_config()[replicas])]

    assert _fits(demand("min_replicas"), _ray_nodes(cluster, "minReplicas"))
    assert _fits(demand("max_replicas"), _ray_nodes(cluster, "maxReplicas"))
    # The check can fail: a whole GPU per decoder does not fit beside the encoder on the one minimum pod,
    # nor its max_replicas on the group's GPUs; a replica that asks for more GPUs than a pod has never fits.
    assert not _fits(demand("min_replicas", {"Decoder": 1.0}), _ray_nodes(cluster, "minReplicas"))
    assert not _fits(demand("max_replicas", {"Decoder": 1.0}), _ray_nodes(cluster, "maxReplicas"))
    assert not _fits([(1.0, 2.0)], _ray_nodes(cluster, "maxReplicas"))


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
    # Ray Train asks for all its workers (one GPU and DIFFAE_CPUS_PER_WORKER CPUs each) at once.
    workers = [(float(env["DIFFAE_CPUS_PER_WORKER"]), 1.0)] * int(env["DIFFAE_NUM_WORKERS"])
    assert _fits(workers, _ray_nodes(cluster, "minReplicas")), "Ray Train would wait forever for its workers"
    assert not _fits(workers + [(0.0, 1.0)], _ray_nodes(cluster, "minReplicas"))
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
        # Ray Serve's own replica metrics beside ours: the Encoder replica's request counter saw every encode.
        # (Not the controller's replica-health gauge: Serve re-sends it only every 10 s, and scrapes were seen
        # to miss it for minutes.)
        served = f'sum(ray_serve_deployment_request_counter_total{{{encoder}}}) >= {n}'
        assert _poll(lambda: _scalar(prometheus, served), 60,
                     lambda: f"Serve's replica metrics: {query(prometheus, 'ray_serve_deployment_request_counter_total')}") >= n
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
