"""cluster/: manifests, Ray configs, Prometheus rules and the Grafana dashboard are checked against the real
tools (kubernetes-validate's schemas, KubeRay's CRD schemas, Ray's own config schema and packager, promtool)
and the real code (job parsers, serve import path, metric definitions), and the metrics are proven end to
end through a real Prometheus scraping Ray's metrics export port while the Serve app answers requests and
a training runs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
PROMETHEUS_DIR = CLUSTER / "prometheus"
KUBERNETES_VERSION = "1.30"  # the oldest Kubernetes the manifests target


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


