"""diffae_core: Diffusion Autoencoders (Preechakul et al., CVPR 2022) in pure PyTorch.

This package never imports Ray; the Ray jobs live in ``pipelines`` and the server in ``serving``.
"""

from .config import (
    PRESETS,
    DiffusionConfig,
    EncoderConfig,
    LatentConfig,
    ModelConfig,
    TrainConfig,
    UNetConfig,
)
from .model import DiffAE

__all__ = [
    "DiffAE",
    "ModelConfig",
    "UNetConfig",
    "EncoderConfig",
    "LatentConfig",
    "DiffusionConfig",
    "TrainConfig",
    "PRESETS",
]
__version__ = "0.1.0"
