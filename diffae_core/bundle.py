"""Our model format: a directory (local or s3://) of safetensors + JSON with a checksummed manifest.

    manifest.json             format name/version, preset, image size, z dim, attributes, files + sha256
    config.json               ModelConfig as JSON
    autoencoder.safetensors   encoder.* and unet.* (EMA / inference weights)
    latent.safetensors        optional: net.* (latent MLP) + z_mean, z_std (the stats it was trained with)
    classifier.safetensors    optional: weight, bias, z_mean, z_std (the classifier's own stats)

The manifest is written last, so a bundle whose upload broke off has none and is refused. Loading
verifies every file's size and sha256 and every tensor's shape, naming the file on any mismatch.
Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import storage
from .config import ModelConfig

if TYPE_CHECKING:
    from .model import DiffAE

FORMAT_NAME = "diffae-ray-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "config.json"
AUTOENCODER = "autoencoder.safetensors"
LATENT = "latent.safetensors"
CLASSIFIER = "classifier.safetensors"


class BundleError(RuntimeError):
    """A bundle is missing, incomplete, corrupted or does not match its config."""


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def bundle_files(model: DiffAE) -> dict[str, bytes]:
    """The serialised files of a bundle (without the manifest)."""
    files = {
        CONFIG: json.dumps(model.config.to_dict(), indent=2).encode(),
        AUTOENCODER: st_save(_tensors({
            **{f"encoder.{k}": v for k, v in model.encoder.state_dict().items()},
            **{f"unet.{k}": v for k, v in model.unet.state_dict().items()},
        })),
    }
    if model.latent_net is not None:
        files[LATENT] = st_save(_tensors({
            **{f"net.{k}": v for k, v in model.latent_net.state_dict().items()},
            "z_mean": model.latent_mean, "z_std": model.latent_std,
        }))
    if model.classifier is not None:
        head = model.classifier
        files[CLASSIFIER] = st_save(_tensors({
            "weight": head.linear.weight, "bias": head.linear.bias, "z_mean": head.z_mean, "z_std": head.z_std,
        }))
    return files


def save_bundle(model: DiffAE, uri: str, endpoint: str | None = None) -> None:
    """Write ``model`` to a bundle directory at ``uri`` (path, file:// or s3://bucket/prefix)."""
    fs, root = storage.resolve(uri, endpoint)
    files = bundle_files(model)
    for name, data in files.items():
        storage.write_bytes(fs, storage.join(root, name), data)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "preset": model.config.name,
        "image_size": model.config.image_size,
        "z_dim": model.config.z_dim,
        "attributes": list(model.config.attributes or []),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)} for name, data in files.items()
        },
    }
    storage.write_bytes(fs, storage.join(root, MANIFEST), json.dumps(manifest, indent=2).encode())


def read_manifest(uri: str, endpoint: str | None = None) -> dict:
    fs, root = storage.resolve(uri, endpoint)
    path = storage.join(root, MANIFEST)
    if not storage.exists(fs, path):
        raise BundleError(
            f"{uri}: no {MANIFEST} — not a diffae-ray bundle, or its upload did not finish "
            "(the manifest is written last). Save it again with DiffAE.save / `diffae export`."
        )
    try:
        manifest = json.loads(storage.read_bytes(fs, path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{uri}/{MANIFEST} is not valid JSON ({exc}); the bundle is corrupted") from None
    if manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{uri}/{MANIFEST}: format {manifest.get('format')!r} is not {FORMAT_NAME!r}")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise BundleError(
            f"{uri}: bundle format version {manifest['format_version']} is newer than this diffae-ray "
            f"understands ({FORMAT_VERSION}); upgrade diffae-ray"
        )
    return manifest


def _read_verified(fs, root: str, uri: str, name: str, entry: dict) -> bytes:
    path = storage.join(root, name)
    if not storage.exists(fs, path):
        raise BundleError(f"{uri}/{name} is listed in the manifest but missing")
    data = storage.read_bytes(fs, path)
    if len(data) != entry["bytes"]:
        raise BundleError(
            f"{uri}/{name} is truncated or corrupted: {len(data)} bytes, the manifest says {entry['bytes']}"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise BundleError(f"{uri}/{name} is corrupted: sha256 {digest} does not match the manifest's {entry['sha256']}")
    return data


def _load_tensors(data: bytes, uri: str, name: str) -> dict[str, torch.Tensor]:
    try:
        return st_load(data)
    except (SafetensorError, ValueError) as exc:
        raise BundleError(f"{uri}/{name} is not a readable safetensors file: {exc}") from None


def _load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], uri: str, name: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"{uri}/{name} does not match config.json: {exc}") from None


def _parse_config(data: bytes, uri: str) -> ModelConfig:
    try:
        return ModelConfig.from_dict(json.loads(data))
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{uri}/{CONFIG} is not a valid model config: {exc}") from None


def load_bundle(uri: str, device: str | torch.device = "cpu", endpoint: str | None = None) -> DiffAE:
    """Load a bundle written by :func:`save_bundle`, verifying checksums and shapes."""
    from .model import DiffAE

    manifest = read_manifest(uri, endpoint)
    fs, root = storage.resolve(uri, endpoint)
    entries = manifest["files"]
    for required in (CONFIG, AUTOENCODER):
        if required not in entries:
            raise BundleError(f"{uri}/{MANIFEST} lists no {required}; the bundle is incomplete")
    blobs = {name: _read_verified(fs, root, uri, name, entry) for name, entry in entries.items()}
    config = _parse_config(blobs[CONFIG], uri)

    model = DiffAE(config)
    auto = _load_tensors(blobs[AUTOENCODER], uri, AUTOENCODER)
    _load_into(model.encoder, {k[8:]: v for k, v in auto.items() if k.startswith("encoder.")}, uri, AUTOENCODER)
    _load_into(model.unet, {k[5:]: v for k, v in auto.items() if k.startswith("unet.")}, uri, AUTOENCODER)
    if LATENT in blobs:
        lat = _load_tensors(blobs[LATENT], uri, LATENT)
        from .latent import LatentMLP

        if config.latent is None:
            raise BundleError(f"{uri}: has {LATENT} but config.json has no latent section")
        net = LatentMLP(config.latent)
        _load_into(net, {k[4:]: v for k, v in lat.items() if k.startswith("net.")}, uri, LATENT)
        model.attach_latent(net, lat["z_mean"], lat["z_std"])
    if CLASSIFIER in blobs:
        cls = _load_tensors(blobs[CLASSIFIER], uri, CLASSIFIER)
        missing = {"weight", "bias", "z_mean", "z_std"} - set(cls)
        if missing:
            raise BundleError(f"{uri}/{CLASSIFIER} lacks {sorted(missing)}")
        attributes = config.attributes or tuple(f"attr_{i}" for i in range(cls["weight"].shape[0]))
        model.attach_classifier(cls["weight"], cls["bias"], cls["z_mean"], cls["z_std"], attributes)
    return model.to(device)


# Which file holds each network a caller can load on its own with load_part.
PART_FILES = {"encoder": AUTOENCODER, "unet": AUTOENCODER, "latent": LATENT, "classifier": CLASSIFIER}


@dataclass
class BundlePart:
    """One network of a bundle. ``stats`` holds the latent net's z_mean / z_std [Z] (empty otherwise;
    the classifier keeps its own statistics as buffers)."""

    config: ModelConfig
    module: torch.nn.Module
    stats: dict[str, torch.Tensor]


def load_part(uri: str, part: str, device: str | torch.device = "cpu", endpoint: str | None = None) -> BundlePart:
    """Load one network (``encoder``, ``unet``, ``latent`` or ``classifier``) without building the rest.

    Reads and verifies only config.json and the file that holds the part, so a serving replica that
    needs the encoder never allocates the UNet. Raises BundleError if the bundle has no such part.
    """
    if part not in PART_FILES:
        raise ValueError(f"unknown bundle part {part!r}; choose one of {sorted(PART_FILES)}")
    manifest = read_manifest(uri, endpoint)
    fs, root = storage.resolve(uri, endpoint)
    entries, name = manifest["files"], PART_FILES[part]
    for required in (CONFIG, name):
        if required not in entries:
            raise BundleError(f"{uri}/{MANIFEST} lists no {required}: this bundle has no {part}")
    config = _parse_config(_read_verified(fs, root, uri, CONFIG, entries[CONFIG]), uri)
    tensors = _load_tensors(_read_verified(fs, root, uri, name, entries[name]), uri, name)
    stats: dict[str, torch.Tensor] = {}
    if part == "encoder":
        from .encoder import SemanticEncoder

        module: torch.nn.Module = SemanticEncoder(config.unet, config.encoder)
        _load_into(module, {k[8:]: v for k, v in tensors.items() if k.startswith("encoder.")}, uri, name)
    elif part == "unet":
        from .unet import ConditionalUNet

        module = ConditionalUNet(config.unet)
        _load_into(module, {k[5:]: v for k, v in tensors.items() if k.startswith("unet.")}, uri, name)
    elif part == "latent":
        from .latent import LatentMLP

        if config.latent is None:
            raise BundleError(f"{uri}: has {LATENT} but config.json has no latent section")
        module = LatentMLP(config.latent)
        _load_into(module, {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}, uri, name)
        stats = {"z_mean": tensors["z_mean"].reshape(-1).to(device), "z_std": tensors["z_std"].reshape(-1).to(device)}
    else:
        from .classifier import AttributeClassifier

        missing = {"weight", "bias", "z_mean", "z_std"} - set(tensors)
        if missing:
            raise BundleError(f"{uri}/{CLASSIFIER} lacks {sorted(missing)}")
        module = AttributeClassifier(tensors["weight"].shape[1], tensors["weight"].shape[0])
        _load_into(module, {"linear.weight": tensors["weight"], "linear.bias": tensors["bias"],
                            "z_mean": tensors["z_mean"].reshape(-1), "z_std": tensors["z_std"].reshape(-1)}, uri, name)
        if config.attributes is None:
            config.attributes = tuple(f"attr_{i}" for i in range(tensors["weight"].shape[0]))
    return BundlePart(config=config, module=module.to(device).eval(), stats=stats)
