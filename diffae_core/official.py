"""Import (and export) the OFFICIAL phizaz/diffae checkpoints as a :class:`DiffAE`, safely and without a config.

``load_official`` is the module-level spelling of ``DiffAE.from_official``; the format itself (safe
unpickling, architecture inference, key mapping, the inverse mapping for export) lives in
:mod:`diffae_core.official_format`, whose public names are re-exported here.
"""

from __future__ import annotations

from pathlib import Path

from .model import DiffAE
from .official_format import (
    OfficialFormatError,
    infer_config,
    read_latent_stats,
    read_lightning_checkpoint,
    read_official,
    split_official,
    to_official_classifier_state_dict,
    to_official_state_dict,
)
from .safe_load import LightningStandIn, UnsafeCheckpointError, pickle_globals, safe_torch_load

__all__ = [
    "LightningStandIn", "OfficialFormatError", "UnsafeCheckpointError", "convert_official", "infer_config",
    "load_official", "pickle_globals", "read_latent_stats", "read_lightning_checkpoint", "read_official",
    "safe_torch_load", "split_official", "to_official_classifier_state_dict", "to_official_state_dict",
]


# The module-level spelling of DiffAE.from_official (same signature and docstring).
load_official = DiffAE.from_official


def convert_official(
    ckpt: str | Path,
    out_dir: str | Path,
    classifier: str | Path | None = None,
    latent_stats: str | Path | None = None,
    image_size: int | None = None,
) -> DiffAE:
    """Import official files and save them as our bundle at ``out_dir`` (path or s3:// URI)."""
    model = load_official(ckpt, classifier_ckpt=classifier, latent_stats=latent_stats, image_size=image_size)
    model.save(out_dir)
    return model
