"""The demo's figures (PNG grids) and its one-page ``report.html``.

Figures are written next to the report: ``reconstruction.png`` (rows: held-out inputs, stochastic
reconstructions, semantic reconstructions with fresh x_T), ``samples.png``, ``manipulation-<attr>.png``
(rows: images; columns: the input, then alpha from -max to +max) and ``interpolation.png``.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from diffae_core import DiffAE
from diffae_core.images import make_grid

UPSCALE = 3  # 32 px images are hard to see at their own size
FIGURE_ROWS = 8


def _save(images: torch.Tensor, path: Path, nrow: int) -> None:
    make_grid(images.float().cpu(), nrow=nrow, upscale=UPSCALE).save(path)


def write_figures(out: Path, model: DiffAE, images: torch.Tensor, stochastic: torch.Tensor, semantic: torch.Tensor,
                  samples: torch.Tensor, z: torch.Tensor, x_T: torch.Tensor, alphas: Sequence[float],
                  steps: int) -> list[str]:
    """Write the PNG grids; images/stochastic/semantic/samples [N, 3, S, S] in [-1, 1]; z [N, Z]; x_T like images.

    Returns the file names written.
    """
    out.mkdir(parents=True, exist_ok=True)
    k = min(FIGURE_ROWS, len(images))
    _save(torch.cat([images[:k], stochastic[:k], semantic[:k]]), out / "reconstruction.png", nrow=k)
    _save(samples[:32], out / "samples.png", nrow=8)
    written = ["reconstruction.png", "samples.png"]
    if model.classifier is not None:
        scale = sorted({-a for a in alphas} | set(alphas))
        rows = min(6, len(images))
        for name in model.attributes or ():
            cols = [images[:rows]]
            for alpha in scale:
                z2 = model.manipulate(z[:rows], name, alpha)
                cols.append(model.decode(x_T[:rows], z2, steps=steps).cpu())
            grid = torch.stack(cols, dim=1).reshape(-1, *images.shape[1:])
            _save(grid, out / f"manipulation-{name}.png", nrow=len(cols))
            written.append(f"manipulation-{name}.png")
    pairs = min(4, len(images) // 2)
    frames = [model.interpolate(images[2 * i], images[2 * i + 1], n=8, steps=steps).cpu() for i in range(pairs)]
    if frames:
        _save(torch.cat(frames), out / "interpolation.png", nrow=8)
        written.append("interpolation.png")
    return written


# ---- report.html ------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def _table(rows: list[Sequence[Any]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure(out: Path, name: str, caption: str) -> str:
    if not (out / name).exists():
        return ""
    return f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}"><figcaption>{caption}</figcaption></figure>'


def write_html(out: Path, metrics: dict[str, Any]) -> Path:
    """Write ``out/report.html`` from the demo's metrics (as in metrics.json) and the figures beside it."""
    head = metrics["headline"]
    headline = _table(
        [(name, row["value"], row["target"], "yes" if row["value"] >= row["target"] else "no")
         for name, row in head.items()],
        ("measure", "reached", "target", "met"),
    )
    sem = metrics["semantic_reconstruction"]
    semantic = _table([(a, v) for a, v in sem["agreement"].items()] + [("all four", sem["agreement_all"]),
                                                                        ("chance (all four)", sem["chance_all"])],
                      ("attribute", "agreement with input"))
    manip = _table([(a, r["best_alpha"], r["success"], r["flip_rate"], r["kept"])
                    for a, r in metrics["manipulation"].items()],
                   ("attribute", "best alpha", "success (flip, others kept)", "flip rate", "others kept"))
    samp = metrics["samples"]
    samples = _table([(a, samp["frequency"][a], samp["data_frequency"][a]) for a in samp["frequency"]],
                     ("attribute", "frequency in samples", "frequency in data"))
    stoch = metrics["stochastic_reconstruction"]
    train = metrics["training"]
    cls = metrics.get("classifier") or {}
    manip_figs = "".join(_figure(out, f"manipulation-{a}.png", f"manipulation of <b>{html.escape(a)}</b>: input, "
                                 "then z_sem moved from -alpha to +alpha, decoded from the image's own x_T")
                         for a in metrics["manipulation"])
    served = metrics.get("serving") or {}
    served_figs = "".join(_figure(out, f"served/{name}", f"{html.escape(name)} — answer of the HTTP API")
                          for name in served.get("files", []))
    timings = _table(list((metrics.get("timings_s") or {}).items()), ("step", "seconds"))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>diffae-ray demo report</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 980px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: .5em 0 1.5em; }} td, th {{ border: 1px solid #ccc; padding: .25em .6em; }}
th {{ background: #f3f3f3; }} figure {{ margin: 1em 0; }} img {{ image-rendering: pixelated; max-width: 100%; }}
figcaption {{ color: #555; font-size: .9em; }} code {{ background: #f5f5f5; padding: 0 .2em; }}
</style></head><body>
<h1>diffae-ray demo</h1>
<p>A Diff-AE trained on the procedural <code>shapes</code> set by this project's Ray pipeline
({html.escape(str(train.get('num_workers')))} Ray Train workers, {_fmt(train.get('samples_seen'))} images seen in
{_fmt(train.get('seconds'))} s, {_fmt(train.get('images_per_second'))} images/s at the end), judged on
{metrics['test_images']} held-out images by a pixel oracle (not by the model's own classifier).
Every figure below comes from the bundle <code>{html.escape(str(metrics['bundle']))}</code>.</p>
<h2>Targets</h2>{headline}
<h2>Reconstruction</h2>
<p>Stochastic (DDIM inversion then decoding, {stoch['steps']} steps): PSNR {_fmt(stoch['psnr_db'])} dB,
SSIM {_fmt(stoch['ssim'])}, all attributes preserved in {_fmt(stoch['oracle_agreement'])} of images.</p>
{_figure(out, "reconstruction.png", "rows: held-out inputs; stochastic reconstructions; semantic reconstructions "
         "(the input's z_sem with fresh random x_T)")}
<h3>Semantic reconstruction (z_sem alone)</h3>{semantic}
<h2>Manipulation</h2>{manip}{manip_figs}
<h2>Interpolation</h2>{_figure(out, "interpolation.png", "each row: z_sem lerped and x_T slerped between two inputs")}
<h2>Unconditional samples</h2>{samples}
<p>{samp['no_foreground']} of {samp['samples']} samples have no shape the oracle can find.</p>
{_figure(out, "samples.png", "latent DPM samples of z_sem, decoded from random x_T")}
<h2>Classifier (linear head on z_sem, held-out)</h2><pre>{html.escape(json.dumps(cls, indent=1, default=str)[:3000])}</pre>
<h2>Serving</h2>
<p>{html.escape(served.get('note', 'not run'))}</p>{served_figs}
<h2>Timings</h2>{timings}
</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path
