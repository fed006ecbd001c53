"""The composed Serve application: ``build_app(args)`` (the ``serve run`` / ``serve deploy`` target).

    serve run serving.app:build_app bundle=/path/to/bundle     # flat args as key=value
    serve run serving/serve_config.yaml                          # nested args (limits, batching, scaling)
    serve build serving.app:app -o my_config.yaml                # `app`: built from serve_config.yaml's args

``args`` are documented in ``serving.settings``. The graph: Ingress (FastAPI) -> handles to Encoder,
Decoder, Classifier and LatentSampler, each with its own autoscaling_config, request limits and CPUs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from ray.serve import Application

from .api import Ingress
from .deployments import Classifier, Decoder, Encoder, LatentSampler
from .settings import AppSettings, Scaling

CONFIG_FILE = Path(__file__).parent / "serve_config.yaml"


def deployment_options(scaling: Scaling) -> dict[str, Any]:
    """The Serve options of one deployment, exactly as serve_config.yaml's `deployments` section lists them."""
    options = {
        "autoscaling_config": scaling.autoscaling_config(),
        "max_ongoing_requests": scaling.max_ongoing_requests,
        "max_queued_requests": scaling.max_queued_requests,
        "ray_actor_options": scaling.actor_options(),
        "health_check_period_s": scaling.health_check_period_s,
        "health_check_timeout_s": scaling.health_check_timeout_s,
    }
    if scaling.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = scaling.max_replicas_per_node
    return options


def build_app(args: dict[str, Any]) -> Application:
    """The application for ``args`` (a bundle URI and optional limits / batching / scaling / auth).

    Nothing is loaded here: each replica loads its own part of the bundle when it starts, so building
    (``serve build``, ``serve deploy``) works without access to the bundle.
    """
    args = dict(args)
    if not args.get("bundle") and os.environ.get("DIFFAE_BUNDLE"):
        args["bundle"] = os.environ["DIFFAE_BUNDLE"]
    settings = AppSettings.from_args(args)
    scale = settings.deployments
    source = (settings.bundle, settings.s3_endpoint)

    def batched(cls: Any, name: str) -> Any:
        return cls.options(**deployment_options(scale[name])).bind(
            *source, vars(settings.batching[name]), scale[name].replica())

    def plain(cls: Any, name: str) -> Any:
        return cls.options(**deployment_options(scale[name])).bind(*source, scale[name].replica())

    return Ingress.options(**deployment_options(scale["Ingress"])).bind(
        batched(Encoder, "Encoder"), batched(Decoder, "Decoder"), plain(Classifier, "Classifier"),
        plain(LatentSampler, "LatentSampler"), settings.to_args())


def packaged_args() -> dict[str, Any]:
    """The ``args`` of the application in serving/serve_config.yaml (``DIFFAE_BUNDLE`` overrides the bundle)."""
    config = yaml.safe_load(CONFIG_FILE.read_text())
    args = dict(config["applications"][0]["args"])
    if os.environ.get("DIFFAE_BUNDLE"):
        args["bundle"] = os.environ["DIFFAE_BUNDLE"]
    return args


# For `serve build serving.app:app` (which needs an Application object, not a builder function).
app = build_app(packaged_args())
