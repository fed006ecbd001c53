"""The ``diffae`` command: a thin dispatcher over the job modules and the server.

Each sub-command hands its remaining arguments to the ``main(argv)`` of the module that implements it,
so ``diffae train autoencoder ...`` and ``python -m pipelines.train_autoencoder ...`` (what
``ray job submit`` runs) take exactly the same flags.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# command words -> (module, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("convert-official",): ("pipelines.convert_official", "import official phizaz/diffae checkpoints as a bundle"),
    ("serve",): ("serving.cli", "serve a bundle over HTTP with Ray Serve on an embedded Ray (Ctrl-C stops)"),
    ("data", "prepare"): ("pipelines.data", "decode, crop and resize images into sharded parquet (local or s3://)"),
    ("train", "autoencoder"): ("pipelines.train_autoencoder", "train a Diff-AE autoencoder with Ray Train (DDP)"),
    ("train", "latent"): ("pipelines.train_latent", "train the latent DPM on z_sem and add it to a bundle"),
    ("train", "classifier"): ("pipelines.train_classifier", "train a linear attribute head on z_sem, add it to a bundle"),
    ("infer-latents",): ("pipelines.infer_latents", "encode a data set to z_sem parquet + mean/std (Ray Data)"),
    ("evaluate",): ("pipelines.evaluate", "reconstruction MSE/PSNR/SSIM/LPIPS and FID of a bundle (Ray Data)"),
    ("export",): ("pipelines.export", "export a bundle (EMA weights) from a training run's checkpoint"),
    ("demo",): ("pipelines.demo", "train, evaluate and serve a small Diff-AE on `shapes` end to end (make demo)"),
}


def _usage() -> str:
    width = max(len(" ".join(words)) for words in COMMANDS)
    lines = [f"  diffae {' '.join(words):<{width}}  {help_}" for words, (_, help_) in sorted(COMMANDS.items())]
    return "usage: diffae COMMAND [ARGS...]\n\ncommands:\n" + "\n".join(lines) + "\n\n`diffae COMMAND --help` for its flags."


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    for words, (module, _) in sorted(COMMANDS.items(), key=lambda item: -len(item[0])):
        if tuple(argv[: len(words)]) == words:
            job = importlib.import_module(module)
            return int(job.main(argv[len(words):], prog=f"diffae {' '.join(words)}") or 0)
    print(f"diffae: unknown command {' '.join(argv[:2])!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
