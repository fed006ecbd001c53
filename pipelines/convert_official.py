"""Convert official phizaz/diffae checkpoints into a diffae-ray bundle (safe: nothing is unpickled blindly).

    python -m pipelines.convert_official last.ckpt OUT_DIR [--classifier cls/last.ckpt] [--latent-stats latent.pkl]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from diffae_core.official import convert_official


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="the official autoencoder (or autoencoder+latent) last.ckpt")
    p.add_argument("out", help="bundle directory or s3:// URI to write")
    p.add_argument("--classifier", help="the official classifier last.ckpt (e.g. ffhq256_autoenc_cls)")
    p.add_argument("--latent-stats", help="latent.pkl with conds_mean / conds_std")
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    model = convert_official(args.checkpoint, args.out, classifier=args.classifier, latent_stats=args.latent_stats)
    summary = {
        "bundle": args.out,
        "name": model.config.name,
        "image_size": model.config.image_size,
        "latent_net": model.latent_net is not None,
        "attributes": len(model.attributes),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
