"""Our model format: a directory (local or s3://) of safetensors + JSON with a checksummed manifest.

    manifest.json             format name/version, preset, image size, z dim, attributes, files + sha256
    config.json               ModelConfig as JSON
    autoencoder.safetensors   encoder.* and unet.* (EMA / inference weights)
    latent.safetensors        optional: net.* (latent MLP) + z_mean, z_std (the stats it was trained with)
    classifier.safetensors    optional: weight, bias, z_mean, z_std (the classifier's own stats)

The manifest is written last, so a bundle whose upload broke off has none and is refused. Reading
verifies every file's size and sha256, naming the file on any mismatch. Nothing is unpickled. This
module turns files into :class:`~diffae_core.weights.ModelWeights` and back; ``DiffAE.load`` /
``DiffAE.save`` build and take the networks.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Collection

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .config import ModelConfig
from .storage import exists, join, read_bytes, write_bytes
from .weights import ClassifierWeights, LatentWeights, ModelWeights, StateDict, WeightsMismatch

FORMAT_NAME = "diffae-ray-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "config.json"
AUTOENCODER = "autoencoder.safetensors"
LATENT = "latent.safetensors"
CLASSIFIER = "classifier.safetensors"
# Which file holds each network a reader can ask for on its own (a serving replica loads one part).
PART_FILES = {"encoder": AUTOENCODER, "unet": AUTOENCODER, "latent": LATENT, "classifier": CLASSIFIER}
CLASSIFIER_KEYS = ("weight", "bias", "z_mean", "z_std")


class BundleError(RuntimeError):
    """A bundle is missing, incomplete, corrupted or does not match its config."""


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def _prefixed(prefix: str, state: StateDict) -> StateDict:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def _unprefixed(prefix: str, state: StateDict) -> StateDict:
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in state.items() if k.startswith(f"{prefix}.")}


def bundle_files(weights: ModelWeights) -> dict[str, bytes]:
    """The serialised files of a bundle (without the manifest)."""
    if weights.encoder is None or weights.unet is None:
        raise ValueError("a bundle needs the whole autoencoder (encoder and UNet); this model has only part of it")
    files = {
        CONFIG: json.dumps(weights.config.to_dict(), indent=2).encode(),
        AUTOENCODER: st_save(_tensors({**_prefixed("encoder", weights.encoder), **_prefixed("unet", weights.unet)})),
    }
    if weights.latent is not None:
        lat = weights.latent
        files[LATENT] = st_save(_tensors({**_prefixed("net", lat.state), "z_mean": lat.mean, "z_std": lat.std}))
    if weights.classifier is not None:
        head = weights.classifier
        files[CLASSIFIER] = st_save(_tensors({k: getattr(head, k) for k in CLASSIFIER_KEYS}))
    return files


def write_bundle(uri: str, weights: ModelWeights, endpoint: str | None = None) -> None:
    """Write ``weights`` as a bundle directory at ``uri`` (path, file:// or s3://bucket/prefix)."""
    files = bundle_files(weights)
    for name, data in files.items():
        write_bytes(join(uri, name), data, endpoint)
    config = weights.config
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "preset": config.name,
        "image_size": config.image_size,
        "z_dim": config.z_dim,
        "attributes": list(config.attributes or []),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)} for name, data in files.items()},
    }
    write_bytes(join(uri, MANIFEST), json.dumps(manifest, indent=2).encode(), endpoint)


def read_manifest(uri: str, endpoint: str | None = None) -> dict:
    """A bundle's manifest.json, checked for our format name and a version this code understands."""
    path = join(uri, MANIFEST)
    if not exists(path, endpoint):
        raise BundleError(
            f"{uri}: no {MANIFEST} — not a diffae-ray bundle, or its upload did not finish "
            "(the manifest is written last). Save it again with DiffAE.save / `diffae export`."
        )
    try:
        manifest = json.loads(read_bytes(path, endpoint))
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


def read_config(uri: str, endpoint: str | None = None) -> ModelConfig:
    """A bundle's ModelConfig, checked against the manifest, without reading any weights."""
    entries = read_manifest(uri, endpoint)["files"]
    if CONFIG not in entries:
        raise BundleError(f"{uri}/{MANIFEST} lists no {CONFIG}; the bundle is incomplete")
    return _parse_config(_read_verified(uri, CONFIG, entries[CONFIG], endpoint), uri)


def _read_verified(uri: str, name: str, entry: dict, endpoint: str | None) -> bytes:
    path = join(uri, name)
    if not exists(path, endpoint):
        raise BundleError(f"{uri}/{name} is listed in the manifest but missing")
    data = read_bytes(path, endpoint)
    if len(data) != entry["bytes"]:
        raise BundleError(f"{uri}/{name} is truncated or corrupted: {len(data)} bytes, the manifest says {entry['bytes']}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise BundleError(f"{uri}/{name} is corrupted: sha256 {digest} does not match the manifest's {entry['sha256']}")
    return data


def _load_tensors(data: bytes, uri: str, name: str) -> dict[str, torch.Tensor]:
    try:
        return st_load(data)
    except (SafetensorError, ValueError) as exc:
        raise BundleError(f"{uri}/{name} is not a readable safetensors file: {exc}") from None


def _parse_config(data: bytes, uri: str) -> ModelConfig:
    try:
        return ModelConfig.from_dict(json.loads(data))
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{uri}/{CONFIG} is not a valid model config: {exc}") from None


def _latent(tensors: StateDict, config: ModelConfig, uri: str) -> LatentWeights:
    if config.latent is None:
        raise BundleError(f"{uri}: has {LATENT} but config.json has no latent section")
    return LatentWeights(_unprefixed("net", tensors), tensors["z_mean"].reshape(-1), tensors["z_std"].reshape(-1))


def _classifier(tensors: StateDict, config: ModelConfig, uri: str) -> ClassifierWeights:
    missing = set(CLASSIFIER_KEYS) - set(tensors)
    if missing:
        raise BundleError(f"{uri}/{CLASSIFIER} lacks {sorted(missing)}")
    names = config.attributes or tuple(f"attr_{i}" for i in range(tensors["weight"].shape[0]))
    return ClassifierWeights(tensors["weight"], tensors["bias"], tensors["z_mean"].reshape(-1),
                             tensors["z_std"].reshape(-1), tuple(names))


def read_bundle(uri: str, endpoint: str | None = None, parts: Collection[str] | None = None) -> ModelWeights:
    """The weights of a bundle, every file verified against the manifest.

    parts: None for every network the bundle has; otherwise a subset of ``PART_FILES`` (only their files
    are read, so a replica that needs the encoder never reads the latent net). A part the bundle lacks is
    a BundleError saying so.
    """
    unknown = set(parts or ()) - set(PART_FILES)
    if unknown:
        raise ValueError(f"unknown bundle part(s) {sorted(unknown)}; choose from {sorted(PART_FILES)}")
    entries = read_manifest(uri, endpoint)["files"]
    if parts is None:
        parts = [p for p, name in PART_FILES.items() if name in entries]
    for required in (CONFIG, *(PART_FILES[p] for p in parts)):
        if required not in entries:
            what = [p for p in parts if PART_FILES[p] == required] or ["a config"]
            raise BundleError(f"{uri}/{MANIFEST} lists no {required}: this bundle has no {what[0]}")
    config = _parse_config(_read_verified(uri, CONFIG, entries[CONFIG], endpoint), uri)
    files = {name: _load_tensors(_read_verified(uri, name, entries[name], endpoint), uri, name)
             for name in {PART_FILES[p] for p in parts}}
    weights = ModelWeights(config)
    if "encoder" in parts:
        weights.encoder = _unprefixed("encoder", files[AUTOENCODER])
    if "unet" in parts:
        weights.unet = _unprefixed("unet", files[AUTOENCODER])
    if "latent" in parts:
        weights.latent = _latent(files[LATENT], config, uri)
    if "classifier" in parts:
        weights.classifier = _classifier(files[CLASSIFIER], config, uri)
    return weights


def mismatch_error(uri: str, exc: WeightsMismatch) -> BundleError:
    """The BundleError for weights that do not fit the bundle's own config, naming the file."""
    return BundleError(f"{uri}/{PART_FILES[exc.part]} does not match config.json: {exc}")


def autoencoder_sha256(uri: str, endpoint: str | None = None) -> str:
    """The sha256 of a bundle's autoencoder weights: identifies which encoder produced a set of latents."""
    return read_manifest(uri, endpoint)["files"][AUTOENCODER]["sha256"]
