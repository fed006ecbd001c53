"""The OFFICIAL phizaz/diffae checkpoint format: safe reading, architecture inference, key mapping, export.

Files understood:

- ``last.ckpt`` of an autoencoder or autoencoder + latent DPM (a PyTorch-Lightning 1.4 checkpoint);
  the EMA weights (``ema_model.*``) are used, the online copy (``model.*``) is ignored;
- a classifier ``last.ckpt`` (``conds_mean``/``conds_std`` [1,Z] and the ONLINE ``classifier.*``
  weights, which the official manipulation uses);
- ``latent.pkl``: ``{'conds', 'conds_mean', 'conds_std'}`` (z_sem statistics of the training set).

Nothing is unpickled with the full pickle machinery: files go through torch's ``weights_only``
unpickler. Lightning 1.4 keys its ``callbacks`` dict by the class object
``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint``; such Lightning callback classes are
mapped to inert stand-ins, so the files load without Lightning installed. Any other global
(``os.system``, ``builtins.eval``, ...) raises :class:`UnsafeCheckpointError` before anything runs.

The architecture (channels, levels, res blocks, attention, z / latent sizes) is inferred from key
names and shapes; :func:`read_official` returns the weights in our layout and ``DiffAE.from_official``
rebuilds the networks and checks them key by key against the file (``diffae_core.official`` is the
module-level spelling of the same import).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .config import CELEBAHQ_ATTRIBUTES, EncoderConfig, LatentConfig, ModelConfig, UNetConfig
from .safe_load import safe_torch_load
from .weights import ClassifierWeights, LatentWeights, ModelWeights, WeightsMismatch

log = logging.getLogger(__name__)

Tensor = torch.Tensor
StateDict = dict[str, Tensor]

_LATENT_ALIAS = re.compile(r"^layers\.(\d+)\.cond_layers\.1\.(weight|bias)$")


class OfficialFormatError(ValueError):
    """The file is readable but is not an official Diff-AE checkpoint we know how to import."""


# ---- reading the official files --------------------------------------------------------------------


def read_lightning_checkpoint(path: str | Path) -> tuple[StateDict, int | None]:
    """(state_dict, global_step) of a Lightning checkpoint; a bare state dict is accepted too."""
    obj = safe_torch_load(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        state, step = obj["state_dict"], obj.get("global_step")
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        state, step = obj, None
    else:
        raise OfficialFormatError(f"{path}: expected a Lightning checkpoint with a 'state_dict' entry")
    return {str(k): v for k, v in state.items() if isinstance(v, Tensor)}, step


def read_latent_stats(path: str | Path) -> tuple[Tensor, Tensor]:
    """(mean [Z], std [Z]) from an official ``latent.pkl`` (or any file with conds_mean/conds_std)."""
    obj = safe_torch_load(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not (isinstance(obj, Mapping) and "conds_mean" in obj and "conds_std" in obj):
        raise OfficialFormatError(f"{path}: expected a latent.pkl with 'conds_mean' and 'conds_std' tensors")
    # clone: the loaded tensors may be memory-mapped from the file
    return obj["conds_mean"].float().reshape(-1).clone(), obj["conds_std"].float().reshape(-1).clone()


# ---- architecture inference --------------------------------------------------------------------


def _indices(weights: Mapping[str, Tensor], prefix: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    found = sorted({int(m.group(1)) for k in weights if (m := pattern.match(k))})
    if found != list(range(len(found))):
        raise OfficialFormatError(f"{prefix}: block indices are not contiguous: {found}")
    return found


def _shape(weights: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in weights:
        raise OfficialFormatError(f"missing key {key!r}: not an official Diff-AE autoencoder checkpoint")
    return tuple(weights[key].shape)


def _mult(channels: int, model_channels: int, where: str) -> int:
    if channels % model_channels:
        raise OfficialFormatError(
            f"{where}: {channels} channels is not a multiple of net_ch={model_channels}"
        )
    return channels // model_channels


def _out_ch(weights: Mapping[str, Tensor], block: str) -> int:
    return _shape(weights, f"{block}.in_layers.2.weight")[0]


def _attention_resolutions(levels_with_attention: list[bool], image_size: int) -> tuple[int, ...]:
    return tuple(image_size // 2**lvl for lvl, has in enumerate(levels_with_attention) if has)


def _infer_unet(w: Mapping[str, Tensor], image_size: int) -> tuple[UNetConfig, int]:
    """Decoder config and its input-path res blocks per level."""
    if "time_embed.0.weight" in w:
        raise OfficialFormatError(
            "this is a DDIM baseline (beatgans_ddpm) checkpoint without a semantic encoder; only Diff-AE "
            "autoencoder checkpoints (ffhq*_autoenc*, bedroom128/horse128_autoenc*, celeba64d2c_autoenc*) import"
        )
    embed_channels, model_channels = _shape(w, "time_embed.time_embed.0.weight")
    n_out = len(_indices(w, "output_blocks"))
    # an up ResBlock (.1 without attention, .2 with) closes every decoder level but the top one
    closes = [any(f"output_blocks.{k}.{j}.in_layers.2.weight" in w for j in (1, 2)) for k in range(n_out)]
    levels = sum(closes) + 1
    per_level = n_out // levels
    expected = [(k + 1) % per_level == 0 and k < n_out - per_level for k in range(n_out)]
    if n_out % levels or per_level < 1 or closes != expected:
        raise OfficialFormatError(
            f"unexpected decoder layout: {n_out} output blocks, up blocks at "
            f"{[k for k, c in enumerate(closes) if c]}"
        )
    first = [(levels - 1 - lvl) * per_level for lvl in range(levels)]  # first output block of each level
    channel_mult = tuple(
        _mult(_out_ch(w, f"output_blocks.{k}.0"), model_channels, f"output_blocks.{k}") for k in first
    )
    attention = [f"output_blocks.{k}.1.qkv.weight" in w for k in first]
    n_in = len(_indices(w, "input_blocks"))
    input_res_blocks, rest = divmod(n_in - 1 - (levels - 1), levels)
    if rest or input_res_blocks < 1:
        raise OfficialFormatError(f"unexpected decoder input path: {n_in} blocks for {levels} levels")
    if image_size % 2 ** (levels - 1):
        raise OfficialFormatError(
            f"image size {image_size} is not divisible by 2^{levels - 1} ({levels} levels)"
        )
    num_res_blocks = per_level - 1
    cfg = UNetConfig(
        image_size=image_size,
        in_channels=_shape(w, "input_blocks.0.0.weight")[1],
        out_channels=_shape(w, "out.2.weight")[0],
        model_channels=model_channels,
        channel_mult=channel_mult,
        num_res_blocks=num_res_blocks,
        num_input_res_blocks=None if input_res_blocks == num_res_blocks else input_res_blocks,
        attention_resolutions=_attention_resolutions(attention, image_size),
        embed_channels=embed_channels,
        cond_channels=_shape(w, "middle_block.0.cond_emb_layers.1.weight")[1],
    )
    return cfg, input_res_blocks


def _encoder_layout(w: Mapping[str, Tensor], levels: int, res_blocks: int, mc: int) -> tuple | None:
    """(channel_mult, attention per level) if the encoder blocks fit this split, else None."""
    mults, attention = [], []
    ch = _shape(w, "encoder.input_blocks.0.0.weight")[0]
    for lvl in range(levels):
        base = 1 + lvl * (res_blocks + 1)
        blocks = [f"encoder.input_blocks.{base + j}" for j in range(res_blocks)]
        outs = {_out_ch(w, f"{b}.0") for b in blocks}
        attn = {f"{b}.1.qkv.weight" in w for b in blocks}
        if len(outs) != 1 or len(attn) != 1:
            return None
        ch = outs.pop()
        if lvl < levels - 1:
            down = f"encoder.input_blocks.{base + res_blocks}"
            if _shape(w, f"{down}.0.in_layers.2.weight")[:2] != (ch, ch) or f"{down}.1.norm.weight" in w:
                return None
        if ch % mc:
            return None
        mults.append(ch // mc)
        attention.append(attn.pop())
    if ch != _shape(w, "encoder.out.3.weight")[1]:
        return None
    return tuple(mults), attention


def _infer_encoder(w: Mapping[str, Tensor], unet: UNetConfig, input_res_blocks: int) -> EncoderConfig:
    n_blocks = len(_indices(w, "encoder.input_blocks")) - 1  # without the stem conv
    fits = {}
    for levels in range(1, n_blocks + 2):
        per_level, rest = divmod(n_blocks + 1, levels)  # res blocks + the down block (or the stem)
        if rest == 0 and per_level >= 2 and unet.image_size % 2 ** (levels - 1) == 0:
            layout = _encoder_layout(w, levels, per_level - 1, unet.model_channels)
            if layout is not None:
                fits[(levels, per_level - 1)] = layout

    # the official encoder repeats the decoder's res blocks and adds one level; prefer that reading
    def rank(split: tuple[int, int]) -> tuple[bool, bool]:
        return split[1] != input_res_blocks, split[0] != len(unet.channel_mult) + 1

    ranked = sorted(fits, key=rank)
    if not ranked or (len(ranked) > 1 and rank(ranked[0]) == rank(ranked[1])):
        raise OfficialFormatError(
            f"cannot determine the encoder's levels from {n_blocks + 1} input blocks "
            f"(consistent (levels, res blocks) splits: {sorted(fits)})"
        )
    levels, res_blocks = ranked[0]
    mults, attention = fits[ranked[0]]
    attn = _attention_resolutions(attention, unet.image_size)
    return EncoderConfig(
        channel_mult=mults,
        num_res_blocks=res_blocks,
        attention_resolutions=None if attn == unet.attention_resolutions else attn,
        out_channels=_shape(w, "encoder.out.3.weight")[0],
    )


def _infer_latent(w: Mapping[str, Tensor]) -> LatentConfig:
    """Latent MLP config from latent-net keys WITHOUT the ``latent_net.`` prefix."""
    if sorted(k for k in w if k.startswith("time_embed.")) != [
        f"time_embed.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")
    ]:
        raise OfficialFormatError(
            "latent net: only the official 2-layer time MLP (Linear, SiLU, Linear) is supported"
        )
    channels, time_channels = _shape(w, "time_embed.0.weight")
    num_layers = len(_indices(w, "layers"))
    if num_layers < 2:
        raise OfficialFormatError(f"latent net with {num_layers} layer(s): at least 2 expected")
    hidden = _shape(w, "layers.0.linear.weight")[0]
    skip = []
    for i in range(num_layers):
        extra = _shape(w, f"layers.{i}.linear.weight")[1] - (channels if i == 0 else hidden)
        if extra not in (0, channels):
            raise OfficialFormatError(f"latent net layer {i}: input width does not match a (skip) layer")
        if extra:
            skip.append(i)
    return LatentConfig(
        num_channels=channels,
        num_hid_channels=hidden,
        num_layers=num_layers,
        num_time_emb_channels=time_channels,
        skip_layers=None if skip == list(range(1, num_layers)) else tuple(skip),
        use_norm="layers.0.norm.weight" in w,
    )


def split_official(weights: Mapping[str, Tensor]) -> dict[str, StateDict]:
    """Split one official model copy (no ``ema_model.`` prefix) into our parts.

    Returns {'unet', 'encoder', 'latent_net'} state dicts in our key layout; the latent net's
    ``cond_layers.1`` alias of ``linear_emb`` (the same tensor in official files) is dropped.
    """
    parts: dict[str, StateDict] = {"unet": {}, "encoder": {}, "latent_net": {}}
    for key, value in weights.items():
        for part in ("encoder", "latent_net"):
            if key.startswith(part + "."):
                parts[part][key[len(part) + 1 :]] = value
                break
        else:
            parts["unet"][key] = value
    latent = parts["latent_net"]
    for key in [k for k in latent if _LATENT_ALIAS.match(k)]:
        latent.setdefault(key.replace("cond_layers.1", "linear_emb"), latent.pop(key))
    return parts


def infer_config(weights: Mapping[str, Tensor], image_size: int, name: str = "official") -> ModelConfig:
    """The :class:`ModelConfig` of one official model copy (keys without ``ema_model.``)."""
    parts = split_official(weights)
    unet, input_res_blocks = _infer_unet(parts["unet"], image_size)
    encoder = _infer_encoder(weights, unet, input_res_blocks)
    latent = _infer_latent(parts["latent_net"]) if parts["latent_net"] else None
    return ModelConfig(name=name, unet=unet, encoder=encoder, latent=latent)


# ---- import -------------------------------------------------------------------------------------


def _ema_weights(state: Mapping[str, Tensor], path: str | Path) -> StateDict:
    ema = {k[len("ema_model.") :]: v for k, v in state.items() if k.startswith("ema_model.")}
    if not ema:
        raise OfficialFormatError(
            f"{path}: no EMA weights (ema_model.*) found. Pass the autoencoder's last.ckpt here; a classifier "
            "checkpoint goes to classifier_ckpt=, a latent.pkl to latent_stats="
        )
    return ema


def _image_size(state: Mapping[str, Tensor], image_size: int | None, path: str | Path) -> int:
    if image_size is not None:
        return int(image_size)
    x_T = state.get("x_T")
    if x_T is None or x_T.dim() != 4 or x_T.shape[-1] != x_T.shape[-2]:
        raise OfficialFormatError(
            f"{path} has no x_T buffer [N,3,H,W] to read the image size from: pass image_size=... "
            "(64, 128 or 256 for the official models)"
        )
    return int(x_T.shape[-1])


def _name_from_path(path: Path) -> str:
    return path.parent.name if path.stem == "last" and path.parent.name else path.stem


def read_official(
    path: str | Path,
    classifier_ckpt: str | Path | None = None,
    latent_stats: str | Path | None = None,
    image_size: int | None = None,
) -> ModelWeights:
    """The weights of official files, with the architecture inferred from the checkpoint.

    :param path: autoencoder (or autoencoder + latent DPM) ``last.ckpt``; EMA weights are used.
    :param classifier_ckpt: optional classifier ``last.ckpt`` (online weights, its own z statistics);
        40 outputs get the CelebA-HQ attribute names, other sizes ``attr_0..attr_{A-1}``.
    :param latent_stats: optional ``latent.pkl``; overrides the latent checkpoint's conds_mean/std.
    :param image_size: only needed when the checkpoint has no ``x_T`` buffer.
    """
    path = Path(path)
    state, step = read_lightning_checkpoint(path)
    ema = _ema_weights(state, path)
    config = infer_config(ema, _image_size(state, image_size, path), name=_name_from_path(path))
    parts = split_official(ema)
    weights = ModelWeights(config, encoder=parts["encoder"], unet=parts["unet"])
    if config.latent is not None:
        if latent_stats is not None:
            mean, std = read_latent_stats(latent_stats)
        elif "conds_mean" in state and "conds_std" in state:
            mean, std = state["conds_mean"].clone().reshape(-1), state["conds_std"].clone().reshape(-1)
        else:
            raise OfficialFormatError(
                f"{path} has a latent net but no conds_mean/conds_std: pass latent_stats="
                "'checkpoints/<base>/latent.pkl'"
            )
        _check_z_dim(mean, std, config.z_dim, "latent statistics")
        weights.latent = LatentWeights(parts["latent_net"], mean.float(), std.float())
    elif latent_stats is not None:
        warnings.warn(f"latent_stats={latent_stats} ignored: {path} has no latent net", stacklevel=2)
    if classifier_ckpt is not None:
        weights.classifier = _read_classifier(classifier_ckpt, config.z_dim)
        config.attributes = weights.classifier.attributes
    log.info("read %s (global_step %s) as %s", path, step, config.name)
    return weights


def _check_z_dim(mean: Tensor, std: Tensor, z_dim: int, what: str) -> None:
    if mean.numel() != z_dim or std.numel() != z_dim:
        raise OfficialFormatError(
            f"{what} have {mean.numel()}/{std.numel()} entries, the encoder's z_sem {z_dim}"
        )


def _read_classifier(path: str | Path, z_dim: int) -> ClassifierWeights:
    state, _ = read_lightning_checkpoint(path)
    needed = ("classifier.weight", "classifier.bias", "conds_mean", "conds_std")
    missing = [k for k in needed if k not in state]
    if missing:
        raise OfficialFormatError(f"{path}: not an official classifier checkpoint (missing {missing})")
    weight, bias = state["classifier.weight"].float(), state["classifier.bias"].float()
    if weight.dim() != 2 or weight.shape[1] != z_dim:
        raise OfficialFormatError(
            f"{path}: classifier weight {tuple(weight.shape)} does not fit z_sem "
            f"of size {z_dim}; is it the classifier of this autoencoder?"
        )
    _check_z_dim(state["conds_mean"], state["conds_std"], z_dim, "classifier statistics")
    num = weight.shape[0]
    names = CELEBAHQ_ATTRIBUTES if num == len(CELEBAHQ_ATTRIBUTES) else tuple(f"attr_{i}" for i in range(num))
    return ClassifierWeights(weight, bias, state["conds_mean"].float().reshape(-1),
                             state["conds_std"].float().reshape(-1), names)


def mismatch_error(path: str | Path, exc: WeightsMismatch) -> OfficialFormatError:
    """The error for official weights that the inferred architecture does not reproduce."""
    return OfficialFormatError(
        f"{path}: the inferred architecture does not reproduce the checkpoint's {exc}\nThe file may come from a "
        "variant of the official code that diffae-ray does not support; please report it with the list above."
    )


# ---- export -------------------------------------------------------------------------------------


def to_official_state_dict(model: nn.Module) -> StateDict:
    """Our weights in the official ``LitModel`` layout (``model.*`` = ``ema_model.*`` = our weights).

    Includes an ``x_T`` buffer [1,3,H,W] (zeros; the official one is logging noise), the latent net
    with its ``cond_layers.1`` aliases, and ``conds_mean``/``conds_std`` [1,Z] when a latent net exists.
    """
    copy: StateDict = {}
    copy.update({k: v for k, v in model.unet.state_dict().items()})
    copy.update({f"encoder.{k}": v for k, v in model.encoder.state_dict().items()})
    if model.latent_net is not None:
        for key, value in model.latent_net.state_dict().items():
            copy[f"latent_net.{key}"] = value
            if ".linear_emb." in key:
                copy[f"latent_net.{key.replace('.linear_emb.', '.cond_layers.1.')}"] = value
    out: StateDict = {
        f"{prefix}.{k}": v.detach() for prefix in ("model", "ema_model") for k, v in copy.items()
    }
    out["x_T"] = torch.zeros(1, model.unet.cfg.in_channels, model.image_size, model.image_size)
    if model.latent_net is not None:
        out["conds_mean"] = model.latent_mean.detach().reshape(1, -1)
        out["conds_std"] = model.latent_std.detach().reshape(1, -1)
    return out


def to_official_classifier_state_dict(model: nn.Module) -> StateDict:
    """The classifier in the official ``ClsModel`` layout (online and EMA copies both ours)."""
    head = model.classifier
    if head is None:
        raise ValueError("this model has no attribute classifier to export")
    out = {"conds_mean": head.z_mean.reshape(1, -1), "conds_std": head.z_std.reshape(1, -1)}
    for prefix in ("classifier", "ema_classifier"):
        out[f"{prefix}.weight"] = head.linear.weight
        out[f"{prefix}.bias"] = head.linear.bias
    return {k: v.detach() for k, v in out.items()}
