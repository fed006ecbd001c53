"""Typed configuration for Diff-AE models, diffusion processes and training recipes.

Every model is described by one :class:`ModelConfig`; named presets live in :data:`PRESETS`.
Configs round-trip through JSON (``to_dict`` / ``from_dict``) and are stored with every bundle and run.
The numbers in the presets are the official Diff-AE templates (phizaz/diffae ``templates*.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# The 40 CelebA-HQ attributes in the official classifier's output order.
CELEBAHQ_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
    "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones",
    "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin",
    "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair",
    "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace",
    "Wearing_Necktie", "Young",
)


@dataclass
class UNetConfig:
    """The conditional UNet decoder (BeatGANs layout with two-condition AdaGN ResBlocks)."""

    image_size: int = 64
    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 64  # "net_ch": base width; also the sinusoidal time-embedding size
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    num_res_blocks: int = 2  # per level on the output path there is one more
    num_input_res_blocks: int | None = None  # input path; None = num_res_blocks
    attention_resolutions: tuple[int, ...] = (16,)
    embed_channels: int = 512  # time-embedding width (and z_sem width fed to cond_emb_layers)
    cond_channels: int = 512  # z_sem width
    dropout: float = 0.1
    num_heads: int = 1

    @property
    def input_res_blocks(self) -> int:
        return self.num_input_res_blocks if self.num_input_res_blocks is not None else self.num_res_blocks


@dataclass
class EncoderConfig:
    """The semantic encoder: a half UNet without time conditioning ending in a 1x1-conv head."""

    channel_mult: tuple[int, ...] = (1, 2, 4, 8, 8)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] | None = None  # None = the decoder's
    out_channels: int = 512  # z_sem dimension


@dataclass
class LatentConfig:
    """The latent DPM's MLP skip-net (operates on normalised z_sem)."""

    num_channels: int = 512
    num_hid_channels: int = 2048
    num_layers: int = 10
    num_time_emb_channels: int = 64
    skip_layers: tuple[int, ...] | None = None  # None = every layer but the first
    condition_bias: float = 1.0
    dropout: float = 0.0
    use_norm: bool = True

    @property
    def resolved_skip_layers(self) -> tuple[int, ...]:
        if self.skip_layers is None:
            return tuple(range(1, self.num_layers))
        return tuple(self.skip_layers)


@dataclass
class DiffusionConfig:
    """A Gaussian diffusion process and what its network predicts."""

    T: int = 1000
    beta_schedule: str = "linear"  # "linear", "cosine" or "constX" (e.g. "const0.008")
    loss: str = "mse"  # "mse" for images, "l1" for latents
    clip_denoised: bool = True  # clamp x0-hat to [-1, 1] while sampling (images yes, latents no)
    eval_steps: int = 20  # default DDIM steps for sampling / inversion
    # What the network outputs: "eps" (official: the noise) or "v" (sqrt(a_t) eps - sqrt(1-a_t) x0,
    # Salimans & Ho 2022). Under "v" the network outputs roughly -x0 at high t, so the decoder learns
    # E[x0 | z_sem] directly where the noisy image carries no information (see docs/demo-recipe.md).
    prediction: str = "eps"


@dataclass
class TrainConfig:
    """The optimisation recipe (official defaults). Pipelines override any field from flags/YAML."""

    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.0
    optimizer: str = "adam"  # "adam" or "adamw"
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup_steps: int = 0  # 0 = official (no warm-up); >0 ramps the decay for short runs
    warmup_steps: int = 0
    # Timestep sampling: a fraction of each batch draws t uniformly from [high_t_start * T, T) instead
    # of [0, T). 0.0 = official (uniform). High t is where the decoder must rely on z_sem.
    high_t_fraction: float = 0.0
    high_t_start: float = 0.5
    # Loss weighting: > 0 weights each example by clamp(1/SNR(t), 1, x0_weight_max) (truncated x0 loss
    # at high t). 0.0 = official (plain eps-MSE).
    x0_weight_max: float = 0.0
    total_samples: int = 72_000_000
    seed: int = 0


@dataclass
class ModelConfig:
    """Everything needed to build a Diff-AE and its diffusion processes."""

    name: str = "custom"
    unet: UNetConfig = field(default_factory=UNetConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    latent: LatentConfig | None = field(default_factory=LatentConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    latent_diffusion: DiffusionConfig = field(
        default_factory=lambda: DiffusionConfig(beta_schedule="const0.008", loss="l1", clip_denoised=False)
    )
    train: TrainConfig = field(default_factory=TrainConfig)
    latent_train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            batch_size=256, optimizer="adamw", weight_decay=0.01, total_samples=101_000_000
        )
    )
    attributes: tuple[str, ...] | None = None  # classifier attribute names, in output order

    @property
    def image_size(self) -> int:
        return self.unet.image_size

    @property
    def z_dim(self) -> int:
        return self.encoder.out_channels

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from ``to_dict`` output; unknown keys are an error (a typo must not pass silently)."""
        return from_dict(cls, data)

    def replace(self, **overrides: Any) -> ModelConfig:
        return dataclasses.replace(self, **overrides)


def from_dict(cls: type, data: Any) -> Any:
    """A config dataclass ``cls`` from a mapping (JSON/YAML): nested sections become their dataclasses, lists
    become tuples, and an unknown key is an error naming the known ones (a typo must not pass silently)."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        sub = _NESTED.get((cls, name))
        if sub is not None and value is not None:
            kwargs[name] = from_dict(sub, value)
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` laid over it: nested mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in override.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge(out[key], value) if nested else value
    return out


_NESTED: dict[tuple[type, str], type] = {
    (ModelConfig, "unet"): UNetConfig,
    (ModelConfig, "encoder"): EncoderConfig,
    (ModelConfig, "latent"): LatentConfig,
    (ModelConfig, "diffusion"): DiffusionConfig,
    (ModelConfig, "latent_diffusion"): DiffusionConfig,
    (ModelConfig, "train"): TrainConfig,
    (ModelConfig, "latent_train"): TrainConfig,
}


def _preset(
    name: str,
    image_size: int,
    model_channels: int,
    channel_mult: tuple[int, ...],
    enc_channel_mult: tuple[int, ...],
    batch_size: int,
    total_samples: int,
    latent_layers: int,
    latent_train: TrainConfig,
) -> ModelConfig:
    return ModelConfig(
        name=name,
        unet=UNetConfig(image_size=image_size, model_channels=model_channels, channel_mult=channel_mult),
        encoder=EncoderConfig(channel_mult=enc_channel_mult),
        latent=LatentConfig(num_layers=latent_layers),
        train=TrainConfig(batch_size=batch_size, total_samples=total_samples),
        latent_train=latent_train,
    )


# Official latent recipes (templates_latent.py).
_LATENT_FFHQ = TrainConfig(batch_size=256, optimizer="adamw", weight_decay=0.01, total_samples=101_000_000)
_LATENT_CELEBA = TrainConfig(batch_size=512, optimizer="adamw", weight_decay=0.01, total_samples=301_000_000)
_LATENT_LSUN = TrainConfig(batch_size=2048, optimizer="adam", weight_decay=0.0, total_samples=2_001_000_000)

_M64 = dict(image_size=64, model_channels=64, channel_mult=(1, 2, 4, 8), enc_channel_mult=(1, 2, 4, 8, 8))
_M128 = dict(
    image_size=128, model_channels=128, channel_mult=(1, 1, 2, 3, 4), enc_channel_mult=(1, 1, 2, 3, 4, 4)
)
_M256 = dict(
    image_size=256,
    model_channels=128,
    channel_mult=(1, 1, 2, 2, 4, 4),
    enc_channel_mult=(1, 1, 2, 2, 4, 4, 4),
)


def _tiny32() -> ModelConfig:
    """A CPU-sized model: 32 px, net_ch 32, three decoder levels, a 4-layer 512-wide latent net."""
    return ModelConfig(
        name="tiny32",
        unet=UNetConfig(image_size=32, model_channels=32, channel_mult=(1, 2, 2)),
        encoder=EncoderConfig(channel_mult=(1, 2, 2, 2)),
        latent=LatentConfig(num_layers=4, num_hid_channels=512),
        train=TrainConfig(batch_size=32, total_samples=1_000_000),
        latent_train=TrainConfig(batch_size=256, optimizer="adamw", weight_decay=0.01, total_samples=2_000_000),
    )


def _demo16() -> ModelConfig:
    """The CPU demo recipe (docs/demo-recipe.md): 16 px, net_ch 32, two decoder levels, no dropout,
    v prediction (the official presets predict eps), Adam 1e-3 with a linear warm-up, EMA 0.999 with
    warm-up, timesteps biased toward high t. The decoder starts using z_sem within a few thousand images
    on ``shapes`` (with eps prediction it had not after 16k)."""
    return ModelConfig(
        name="demo16",
        unet=UNetConfig(image_size=16, model_channels=32, channel_mult=(1, 2), attention_resolutions=(8,),
                        dropout=0.0),
        encoder=EncoderConfig(channel_mult=(1, 2, 2)),
        latent=LatentConfig(num_layers=4, num_hid_channels=512),
        diffusion=DiffusionConfig(prediction="v"),
        train=TrainConfig(batch_size=32, lr=1e-3, warmup_steps=100, ema_decay=0.999, ema_warmup_steps=200,
                          high_t_fraction=0.5, high_t_start=0.5, total_samples=100_000),
        # The latent DPM also predicts v, with the short-run optimiser: with eps and the official EMA
        # (0.9999, no warm-up) a few-minute run sampled z with 100x the data's spread (docs/demo-recipe.md).
        latent_diffusion=DiffusionConfig(beta_schedule="const0.008", loss="l1", clip_denoised=False, prediction="v"),
        latent_train=TrainConfig(batch_size=256, optimizer="adamw", weight_decay=0.01, lr=1e-3, ema_decay=0.999,
                                 ema_warmup_steps=200, total_samples=2_000_000),
    )


PRESETS: dict[str, ModelConfig] = {
    "ffhq64": _preset("ffhq64", **_M64, batch_size=128, total_samples=72_000_000, latent_layers=10,
                      latent_train=_LATENT_FFHQ),
    "celeba64": _preset("celeba64", **_M64, batch_size=128, total_samples=72_000_000, latent_layers=10,
                        latent_train=_LATENT_CELEBA),
    "ffhq128": _preset("ffhq128", **_M128, batch_size=128, total_samples=130_000_000, latent_layers=10,
                       latent_train=_LATENT_FFHQ),
    "horse128": _preset("horse128", **_M128, batch_size=128, total_samples=130_000_000, latent_layers=20,
                        latent_train=_LATENT_LSUN),
    "bedroom128": _preset("bedroom128", **_M128, batch_size=128, total_samples=120_000_000, latent_layers=20,
                          latent_train=_LATENT_LSUN),
    "ffhq256": _preset("ffhq256", **_M256, batch_size=64, total_samples=200_000_000, latent_layers=10,
                       latent_train=_LATENT_FFHQ),
    "tiny32": _tiny32(),
    "demo16": _demo16(),
}


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset (mutating it never changes :data:`PRESETS`)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig.from_dict(PRESETS[name].to_dict())
