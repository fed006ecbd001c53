"""Convert official phizaz/diffae checkpoints into a diffae-ray bundle (safe: nothing is unpickled blindly).

    python -m pipelines.convert_official last.ckpt OUT_DIR [--classifier cls/last.ckpt] [--latent-stats latent.pkl]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from diffae_core import DiffAE

from . import jobkit
from .jobkit import option


@dataclass(kw_only=True)
class ConvertJob(jobkit.JobConfig):
    """Convert official phizaz/diffae checkpoints into a diffae-ray bundle."""

    job_name: ClassVar[str] = "convert_official"

    checkpoint: str = option(positional=True, help="the official autoencoder (or autoencoder+latent) last.ckpt")
    out: str = option(positional=True, help="bundle directory or s3:// URI to write")
    classifier: str | None = option(None, help="the official classifier last.ckpt (e.g. ffhq256_autoenc_cls)")
    latent_stats: str | None = option(None, help="latent.pkl with conds_mean / conds_std")
    image_size: int | None = option(None, help="image size, for checkpoints without the x_T buffer")


def _run(job: ConvertJob) -> dict[str, Any]:
    model = DiffAE.from_official(job.checkpoint, classifier_ckpt=job.classifier, latent_stats=job.latent_stats,
                                 image_size=job.image_size)
    model.save(job.out, job.s3_endpoint)
    return {"bundle": job.out, "name": model.config.name, "image_size": model.config.image_size,
            "latent_net": model.latent_net is not None, "attributes": len(model.attributes)}


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    return jobkit.run_cli(ConvertJob, argv, prog, _run, needs_ray=False)


if __name__ == "__main__":
    raise SystemExit(main(prog="python -m pipelines.convert_official"))
