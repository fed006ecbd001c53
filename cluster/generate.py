"""Write the generated cluster manifests from their templates and the project's single sources of truth.

    python cluster/generate.py                 # rewrite every generated file
    python cluster/generate.py --check         # exit 1 if a checked-in file is out of date (tests run this)
    python cluster/generate.py --bundle s3://diffae-models/bundles/v2 --out /tmp/rayservice-v2.yaml
    python cluster/generate.py --image         # the image name, for `docker build -t` / `docker push`

| generated file (from its .template.yaml)   | embedded source                                                                 |
|--------------------------------------------|---------------------------------------------------------------------------------|
| cluster/kuberay/rayjob-train.yaml          |                                                                                 |
| cluster/kuberay/rayservice.yaml            | serving/serve_config.yaml + cluster/kuberay/serve-gpu.yaml as `serveConfigV2`   |
| cluster/ray-cluster.yaml                   |                                                                                 |
| cluster/prometheus/kuberay-monitoring.yaml | cluster/prometheus/rules.yml as the PrometheusRule's `spec`                     |

A template embeds a source at one line ``KEY: "@path/of/source@"`` and may name ``${IMAGE}`` (the image of
cluster/image.yaml) and ``${RAY_VERSION}`` (the Ray of cluster/Dockerfile's base image) anywhere, so that
every manifest runs the image named in one place with the Ray version that image has. Any other ``${NAME}``
is an error: a typo must not reach a cluster. Only PyYAML is needed, so this runs anywhere the repository is
checked out.

    python cluster/generate.py --vendor-crds KUBERAY_CHECKOUT --kuberay-version v1.7.0
    python cluster/generate.py --vendor-crds PROMETHEUS_OPERATOR_CHECKOUT --prometheus-operator-version v0.93.0

refresh cluster/kuberay/crd-schemas.json.gz (the OpenAPI schemas of KubeRay's RayJob and RayService CRDs,
``ray-operator/config/crd/bases`` of that release) and cluster/prometheus/crd-schemas.json.gz (the
Prometheus Operator's PodMonitor and PrometheusRule, ``example/prometheus-operator-crd``), descriptions
dropped, which tests/test_cluster.py validates the manifests against, offline.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
RAYJOB = CLUSTER / "kuberay" / "rayjob-train.yaml"
RAYSERVICE = CLUSTER / "kuberay" / "rayservice.yaml"
LAUNCHER = CLUSTER / "ray-cluster.yaml"
MONITORING = CLUSTER / "prometheus" / "kuberay-monitoring.yaml"
GENERATED = (RAYJOB, RAYSERVICE, LAUNCHER, MONITORING)
IMAGE = CLUSTER / "image.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
SERVE_GPU = CLUSTER / "kuberay" / "serve-gpu.yaml"
GPU_SETTINGS = ("num_gpus", "dtype")  # the serving.settings.Scaling fields serve-gpu.yaml may set
# The CRD schemas the manifests are validated against, offline: project -> (vendored file, CRD folder of a
# checkout of its release, {kind: CRD file}).
CRDS = {
    "kuberay": (CLUSTER / "kuberay" / "crd-schemas.json.gz", "ray-operator/config/crd/bases",
                {"RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}),
    "prometheus-operator": (CLUSTER / "prometheus" / "crd-schemas.json.gz", "example/prometheus-operator-crd",
                            {"PodMonitor": "monitoring.coreos.com_podmonitors.yaml",
                             "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml"}),
}
MARKER = re.compile(r'^(?P<indent> *)(?P<key>\w+): "@(?P<source>[\w./-]+)@"$', re.MULTILINE)
PLACEHOLDER = re.compile(r"\$\{(\w+)\}")
PLACEHOLDER_SOURCES = {"IMAGE": IMAGE, "RAY_VERSION": DOCKERFILE}


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (PromQL, descriptions) as readable literal blocks."""


_Dumper.add_representer(
    str, lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def template_of(output: Path) -> Path:
    return output.with_name(output.name.replace(".yaml", ".template.yaml"))


def placeholders() -> dict[str, str]:
    """What ``${NAME}`` stands for in a template."""
    base = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-", DOCKERFILE.read_text(), re.MULTILINE)
    if base is None:
        raise ValueError(f"{_rel(DOCKERFILE)} has no `FROM rayproject/ray:X.Y.Z-...` line")
    return {"IMAGE": yaml.safe_load(IMAGE.read_text())["image"], "RAY_VERSION": base[1]}


def serve_on_gpus(config: dict[str, Any], bundle: str | None = None) -> dict[str, Any]:
    """The RayService's Serve config: serving/serve_config.yaml with ``bundle`` (if given) and serve-gpu.yaml's
    per-deployment ``num_gpus`` and ``dtype``, written into the app's args and, for ``num_gpus``, into the
    matching ``ray_actor_options`` of its ``deployments`` section (what Serve reserves for a replica).
    serving.app.deployment_options derives the same options from the args; tests/test_cluster.py checks that
    the two agree."""
    (app,) = config["applications"]
    if bundle:
        app["args"]["bundle"] = bundle
    options = {d["name"]: d for d in app["deployments"]}
    for name, settings in yaml.safe_load(SERVE_GPU.read_text()).items():
        unknown = sorted(set(settings) - set(GPU_SETTINGS))
        if name not in options or unknown:
            raise ValueError(f"{_rel(SERVE_GPU)}: `{name}` must be a deployment of the serve config "
                             f"({sorted(options)}) with only {list(GPU_SETTINGS)}; got {sorted(settings)}")
        app["args"].setdefault("deployments", {}).setdefault(name, {}).update(settings)
        if "num_gpus" in settings:
            actor = options[name].setdefault("ray_actor_options", {})
            actor.pop("num_gpus", None)
            if settings["num_gpus"]:
                actor["num_gpus"] = settings["num_gpus"]
    return config


def render(output: Path, bundle: str | None = None) -> str:
    """The text of a generated file: its template with ``${NAME}`` replaced and the marker line (if any)
    replaced by its source.

    ``serveConfigV2`` takes the source as a YAML string (what KubeRay expects); any other key as a mapping.
    """
    template_path = template_of(output)
    known = placeholders()
    embedded: list[Path] = []
    used: set[str] = set()

    def substitute(m: re.Match[str]) -> str:
        if m[1] not in known:
            raise ValueError(f"{_rel(template_path)}: unknown ${{{m[1]}}}; a template may name {sorted(known)}")
        used.add(m[1])
        return known[m[1]]

    text = PLACEHOLDER.sub(substitute, template_path.read_text())
    markers = list(MARKER.finditer(text))
    if len(markers) > 1:
        raise ValueError(f"{_rel(template_path)} may contain one line `KEY: \"@path/of/source@\"`, not {len(markers)}")
    for m in markers:
        indent, key, source = m["indent"], m["key"], m["source"]
        data = yaml.safe_load((ROOT / source).read_text())
        embedded.append(ROOT / source)
        if key == "serveConfigV2":
            data = serve_on_gpus(data, bundle)
            embedded.append(SERVE_GPU)
        body = yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=110)
        head = f"{indent}{key}: |" if key == "serveConfigV2" else f"{indent}{key}:"
        block = "\n".join([head] + [f"{indent}  {line}" for line in body.splitlines()])
        text = text[: m.start()] + block + text[m.end():]
    named = [path for name, path in PLACEHOLDER_SOURCES.items() if name in used]
    names = [_rel(path) for path in [template_path, *embedded, *named]]
    listed = " and ".join(filter(None, [", ".join(names[:-1]), names[-1]]))
    note = (f"GENERATED by `python cluster/generate.py` from {listed}: edit them, then regenerate "
            "(tests/test_cluster.py fails on drift).")
    wrapped = textwrap.wrap(note, 108, break_on_hyphens=False, break_long_words=False)
    return "".join(f"# {line}\n" for line in wrapped) + text


def _drop_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _drop_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_drop_descriptions(v) for v in node]
    return node


def vendor_crd_schemas(project: str, checkout: Path, version: str) -> Path:
    """Write a project's vendored schemas from a checkout of its release:
    {project: version, "schemas": {kind: the v1 openAPIV3Schema}}."""
    vendored, folder, files = CRDS[project]
    schemas = {}
    for kind, name in files.items():
        crd = yaml.safe_load((checkout / folder / name).read_text())
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schemas[kind] = _drop_descriptions(v1["schema"]["openAPIV3Schema"])
    data = json.dumps({project: version, "schemas": schemas}, sort_keys=True, separators=(",", ":"))
    vendored.write_bytes(gzip.compress(data.encode(), compresslevel=9, mtime=0))
    return vendored


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python cluster/generate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare with the checked-in files instead of writing")
    p.add_argument("--bundle", help="render only the RayService, serving this bundle URI (use with --out)")
    p.add_argument("--out", type=Path, help="with --bundle: where to write that RayService")
    p.add_argument("--image", action="store_true", help=f"print the image named in {_rel(IMAGE)} and exit")
    p.add_argument("--vendor-crds", type=Path, metavar="CHECKOUT", help="refresh the vendored CRD schemas of the "
                   "KubeRay or Prometheus Operator release checked out there")
    p.add_argument("--kuberay-version", help="with --vendor-crds: the KubeRay release checked out (e.g. v1.7.0)")
    p.add_argument("--prometheus-operator-version", help="with --vendor-crds: the Prometheus Operator release")
    args = p.parse_args(argv)
    if args.image:
        print(placeholders()["IMAGE"])
        return 0
    if args.vendor_crds:
        releases = {"kuberay": args.kuberay_version, "prometheus-operator": args.prometheus_operator_version}
        releases = {project: version for project, version in releases.items() if version}
        if len(releases) != 1:
            p.error("--vendor-crds needs one of --kuberay-version and --prometheus-operator-version")
        ((project, version),) = releases.items()
        vendored = vendor_crd_schemas(project, args.vendor_crds, version)
        print(f"wrote {_rel(vendored)} ({project} {version})")
        return 0
    if args.bundle:
        if args.check or not args.out:
            p.error("--bundle writes a variant of the RayService: give --out FILE (and no --check)")
        args.out.write_text(render(RAYSERVICE, args.bundle))
        print(f"wrote {args.out}")
        return 0
    stale = []
    for output in GENERATED:
        text = render(output)
        if args.check:
            if not output.exists() or output.read_text() != text:
                stale.append(output)
        else:
            output.write_text(text)
            print(f"wrote {_rel(output)}")
    for output in stale:
        print(f"{_rel(output)} is out of date: run `python cluster/generate.py`", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
