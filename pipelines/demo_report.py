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


def _model_sections(out: Path, folder: str, m: dict[str, Any], who: str) -> str:
    """Reconstruction, manipulation, interpolation and samples of one model; figures in ``out/folder``."""
    def fig(name: str, caption: str) -> str:
        return _figure(out, f"{folder}{name}", f"{caption} ({who})")

    sem = m["semantic_reconstruction"]
    semantic = _table([(a, v) for a, v in sem["agreement"].items()] + [("all four", sem["agreement_all"]),
                                                                        ("chance (all four)", sem["chance_all"])],
                      ("attribute", "agreement with input"))
    manip = _table([(a, r["best_alpha"], r["success"], r["flip_rate"], r["kept"])
                    for a, r in m["manipulation"].items()],
                   ("attribute", "best alpha", "success (flip, others kept)", "flip rate", "others kept"))
    samp = m["samples"]
    samples = _table([(a, samp["frequency"][a], samp["data_frequency"][a]) for a in samp["frequency"]],
                     ("attribute", "frequency in samples", "frequency in data"))
    stoch = m["stochastic_reconstruction"]
    manip_figs = "".join(fig(f"manipulation-{a}.png", f"manipulation of <b>{html.escape(a)}</b>: input, then "
                             "z_sem moved from -alpha to +alpha, decoded from the image's own x_T")
                         for a in m["manipulation"])
    return f"""<h3>Reconstruction</h3>
<p>Stochastic (DDIM inversion then decoding, {stoch['steps']} steps): PSNR {_fmt(stoch['psnr_db'])} dB,
SSIM {_fmt(stoch['ssim'])}, all attributes preserved in {_fmt(stoch['oracle_agreement'])} of images.</p>
{fig("reconstruction.png", "rows: held-out inputs; stochastic reconstructions; semantic reconstructions "
     "(the input's z_sem with fresh random x_T)")}
<h4>Semantic reconstruction (z_sem alone)</h4>{semantic}
<h3>Manipulation</h3>{manip}{manip_figs}
<h3>Interpolation</h3>{fig("interpolation.png", "each row: z_sem lerped and x_T slerped between two inputs")}
<h3>Unconditional samples</h3>{samples}
<p>{samp['no_foreground']} of {samp['samples']} samples have no shape the oracle can find.</p>
{fig("samples.png", "latent DPM samples of z_sem, decoded from random x_T")}
"""


def _demo_model_part(out: Path, shipped: dict[str, Any]) -> str:
    """The report's section on the shipped demo model, or why it was not evaluated."""
    if "headline" not in shipped:
        reason = shipped.get("skipped", "no shipped demo model was found")
        return f"<h2>Demo model (shipped)</h2><p>Not evaluated: {html.escape(reason)}.</p>"
    about = shipped.get("about") or {}
    how = html.escape(str(about.get("command", "make demo-model")))
    intro = (f"<p>The shipped demo model <code>{html.escape(str(shipped['bundle']))}</code> was trained by "
             f"the same pipeline with a longer budget: <code>{how}</code> "
             f"({_fmt(about.get('samples_seen', '?'))} images seen, {_fmt(about.get('train_seconds', '?'))} s "
             f"of training on {html.escape(str(about.get('machine', 'an unrecorded machine')))}, "
             f"{html.escape(str(about.get('date', '')))}). It is judged on the same held-out images.</p>")
    return f"<h2>Demo model (shipped)</h2>{intro}{_model_sections(out, 'demo-model/', shipped, 'demo model')}"


def write_html(out: Path, metrics: dict[str, Any]) -> Path:
    """Write ``out/report.html`` from the demo's metrics (as in metrics.json) and the figures beside it.

    The live model's figures are in ``out/``, the shipped demo model's (``metrics["demo_model"]``, if
    evaluated) in ``out/demo-model/``; every caption names its model.
    """
    live = metrics["headline"]
    shipped = metrics.get("demo_model") or {}
    has_demo = "headline" in shipped

    def met(row: dict[str, Any]) -> str:
        return "yes" if row["value"] >= row["target"] else "no"

    headline = _table(
        [(name, row["target"], row["value"], met(row),
          *((shipped["headline"][name]["value"], met(shipped["headline"][name])) if has_demo else ()))
         for name, row in live.items()],
        ("measure", "target", "live model", "met", *(("demo model", "met") if has_demo else ())),
    )
    train = metrics["training"]
    cls = metrics.get("classifier") or {}
    served = metrics.get("serving") or {}
    served_figs = "".join(_figure(out, f"served/{name}", f"{html.escape(name)} — answer of the HTTP API")
                          for name in served.get("files", []))
    timings = _table(list((metrics.get("timings_s") or {}).items()), ("step", "seconds"))
    demo_part = _demo_model_part(out, shipped)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>diffae-ray demo report</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 980px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: .5em 0 1.5em; }} td, th {{ border: 1px solid #ccc; padding: .25em .6em; }}
th {{ background: #f3f3f3; }} figure {{ margin: 1em 0; }} img {{ image-rendering: pixelated; max-width: 100%; }}
figcaption {{ color: #555; font-size: .9em; }} code {{ background: #f5f5f5; padding: 0 .2em; }}
</style></head><body>
<h1>diffae-ray demo</h1>
<p>A Diff-AE trained on the procedural <code>shapes</code> set by this project's Ray pipeline, judged on
{metrics['test_images']} held-out images by a pixel oracle (not by the model's own classifier). Two models:
the <b>live model</b> trained just now ({html.escape(str(train.get('num_workers')))} Ray Train workers,
{_fmt(train.get('samples_seen'))} images seen in {_fmt(train.get('seconds'))} s, {_fmt(train.get('images_per_second'))}
images/s at the end; bundle <code>{html.escape(str(metrics['bundle']))}</code>) and, when shipped, the <b>demo
model</b> that the same pipeline trained with a longer budget. Every caption names the model it shows.</p>
<h2>Targets</h2>{headline}
{demo_part}
<h2>Live model (trained by this run)</h2>{_model_sections(out, '', metrics, 'live model')}
<h2>Classifier of the live model (linear head on z_sem, held-out)</h2><pre>{html.escape(json.dumps(cls, indent=1, default=str)[:3000])}</pre>
<h2>Serving</h2>
<p>Bundle served: <code>{html.escape(str(served.get('bundle', '')))}</code>. {html.escape(served.get('note', 'not run'))}</p>{served_figs}
<h2>Timings</h2>{timings}
</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path
