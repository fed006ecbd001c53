"""`make demo`: the whole product end to end on one machine, through the same job code a cluster runs.

    python -m pipelines.demo [--out outputs/demo] [--budget-images N] [--fresh]

Steps (each prints its name and time; a failure stops the demo and says which step failed and why):

1. data        build the ``shapes`` set as parquet shards (a 10% held-out test split by id hash)
2. train       the autoencoder with 2 Ray Train workers (DDP on CPU) for a fixed image budget
3. latents     infer z_sem of the training split (Ray Data actor pool) with its mean / std
4. latent-dpm  train the latent DPM on the normalised latents (Ray Train)
5. classifier  train the linear attribute head (held-out AUROC / F1)
6. evaluate    judge with the pixel oracle on the test split: stochastic and semantic reconstruction,
               manipulation per attribute, attribute frequencies of unconditional samples
7. demo-model  the same evaluation of the shipped demo model (``assets/demo-model``: the same pipeline
               trained longer by ``make demo-model``), whose figures go to ``out/demo-model/``
8. report      PNG grids, metrics.json and report.html in the output directory
9. serve       start the Serve app on 127.0.0.1 (the demo model when shipped, else the live one), call
               it over HTTP (reconstruct, manipulate, sample), save the answers, print the URLs; stop
               unless DEMO_KEEP_SERVING=1

The live training shows the pipeline at work; within a CPU budget of minutes its semantic code is only
partly learned, so the shipped model shows what the same pipeline reaches with a longer budget. The
report says which model produced each figure.

Ray starts in-process (a local instance) and everything is written to local disk. Running the demo
again reuses every finished step whose settings did not change (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from diffae_core import DiffAE, storage
from diffae_core.bundle import read_config
from diffae_core.config import PRESETS, get_preset

from . import cluster, demo_report, jobkit
from .jobkit import option

DEFAULT_OUT = "outputs/demo"
DEFAULT_PRESET = "demo16"
# The shipped bundle `make demo-model` produced (see assets/demo-model/README.md); "" = none.
DEFAULT_DEMO_MODEL = str(Path(__file__).resolve().parents[1] / "assets" / "demo-model")


@dataclasses.dataclass(kw_only=True)
class DemoSettings(jobkit.JobConfig):
    """Train, evaluate and serve a small Diff-AE on `shapes` end to end (make demo). A step is reused only
    when the settings it depends on are unchanged."""

    job_name: ClassVar[str] = "demo"

    out: str = option(DEFAULT_OUT, help="output directory")
    preset: str = option(DEFAULT_PRESET, choices=sorted(PRESETS), help="model preset")
    images: int = option(6000, help="size of the shapes data set (--holdout of it held out for testing)")
    holdout: float = option(0.1, help="held-out fraction of the shapes set")
    budget_images: int = option(14_080, help="autoencoder training budget, images seen (all workers)")
    num_workers: int = option(2, help="Ray Train workers of the autoencoder")
    latent_budget: int = option(128_000, help="latent DPM training budget, latents seen")
    classifier_budget: int = option(64_000, help="classifier training budget, latents seen")
    test_images: int = option(200, help="held-out images judged by the oracle")
    manipulation_images: int = option(64, help="held-out images manipulated along each attribute")
    sample_images: int = option(100, help="unconditional samples judged by the oracle")
    steps: int = option(20, help="DDIM steps of inversion and decoding in the evaluation")
    alphas: tuple[float, ...] = option((0.5, 1.0, 2.0), help="manipulation strengths tried; the best per attribute "
                                                                 "is reported")
    seed: int = option(0, help="seed of the data, the training runs and the evaluation")
    port: int = option(8000, help="HTTP port of the Serve app")
    demo_model: str = option(DEFAULT_DEMO_MODEL, help="shipped bundle to evaluate and serve beside the live "
                                                      "model ('' = none)")
    ship: str | None = option(None, help="after the run, copy the trained bundle to DIR with DIR.json (its "
                                         "provenance): how `make demo-model` updates assets/demo-model")
    fresh: bool = option(False, help="delete the output directory and start over")

    def fingerprint(self, *names: str) -> str:
        values = {n: getattr(self, n) for n in names}
        return hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]


class DemoStepError(RuntimeError):
    """A demo step failed; the message names the step."""


class StepRunner:
    """Runs named steps in order with timings, reusing finished ones recorded in ``out/state``."""

    def __init__(self, out: Path, total: int) -> None:
        self.state = out / "state"
        self.state.mkdir(parents=True, exist_ok=True)
        self.total, self.index = total, 0
        self.timings: dict[str, float] = {}

    def run(self, name: str, key: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run ``fn`` unless ``state/<name>.json`` holds a result for the same ``key``; return its result."""
        self.index += 1
        marker = self.state / f"{name}.json"
        if marker.exists():
            saved = json.loads(marker.read_text())
            if saved.get("key") == key:
                print(f"== [{self.index}/{self.total}] {name}: reused (finished earlier; --fresh to redo)", flush=True)
                self.timings[name] = 0.0
                return saved["result"]
        print(f"== [{self.index}/{self.total}] {name} ...", flush=True)
        start = time.time()
        try:
            result = fn()
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # every failure becomes one clear line naming the step
            raise DemoStepError(f"demo step '{name}' failed: {type(exc).__name__}: {exc}") from exc
        self.timings[name] = round(time.time() - start, 1)
        marker.write_text(json.dumps({"key": key, "result": result}, indent=2, default=str))
        print(f"== [{self.index}/{self.total}] {name} done in {self.timings[name]:.0f} s", flush=True)
        return result

    def skip(self, name: str, reason: str) -> None:
        """Count a step that does not apply to this run, saying why."""
        self.index += 1
        print(f"== [{self.index}/{self.total}] {name}: skipped ({reason})", flush=True)


def _start_ray() -> None:
    """An embedded local Ray (pipelines.cluster.connect) that exports metrics every 2 s for the demo's page."""
    os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")
    cluster.connect()


def _digest(config: dict[str, Any], *parts: str) -> str:
    return hashlib.sha1(json.dumps({p: config[p] for p in parts}, sort_keys=True).encode()).hexdigest()[:12]


def _model_config(settings: DemoSettings):
    cfg = get_preset(settings.preset)  # an unknown name is an error that lists the presets
    cfg.train = dataclasses.replace(cfg.train, total_samples=settings.budget_images, seed=settings.seed)
    return cfg


# ---- steps ------------------------------------------------------------------------------------
def step_data(settings: DemoSettings, image_size: int) -> dict[str, Any]:
    from .data import prepare

    dest = Path(settings.out) / "data"
    if dest.exists():
        shutil.rmtree(dest)  # a half-written earlier attempt
    summary = prepare(f"shapes:{settings.images}", str(dest), image_size, seed=settings.seed)
    return {"data": str(dest), **{k: summary[k] for k in ("images", "files", "attributes", "skipped")}}


def step_train(settings: DemoSettings, data: str) -> dict[str, Any]:
    from .export import export_bundle
    from .train_autoencoder import TrainJobConfig, train_autoencoder

    storage = str(Path(settings.out) / "runs")
    name = "autoencoder"
    run_dir = Path(storage) / name
    summary_file = run_dir / "summary.json"
    if summary_file.exists():  # finished earlier (e.g. the demo stopped in a later step)
        summary = json.loads(summary_file.read_text())
        if summary.get("samples_seen") == settings.budget_images:
            bundle = run_dir / "bundle"
            if not (bundle / "manifest.json").exists():  # the run ended before its bundle was written
                export_bundle(str(run_dir), str(bundle))
            return {**summary, "bundle": str(bundle), "run_dir": str(run_dir)}
    cfg = _model_config(settings)
    saved = run_dir / "config.json"
    if saved.exists() and not _same_recipe(json.loads(saved.read_text())["config"]["model"], cfg.to_dict()):
        shutil.rmtree(run_dir)  # an earlier run of another recipe: start over instead of resuming it
    job = TrainJobConfig(
        data=data, storage=storage, name=name, model=cfg, num_workers=settings.num_workers,
        cpus_per_worker=1.0, holdout=settings.holdout, checkpoint_every=max(cfg.train.batch_size, settings.budget_images // 6),
        grid_every=max(cfg.train.batch_size, settings.budget_images // 3), log_every=10,
        resume=(run_dir / "config.json").exists(),  # a stopped run continues from its last checkpoint
    )
    result = train_autoencoder(job)
    return {"bundle": result.bundle, "run_dir": result.run_dir, **result.summary}


def _same_recipe(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Same autoencoder recipe, whatever the budget (a bigger --budget-images continues the run)."""
    def strip(c: dict[str, Any]) -> dict[str, Any]:
        return {k: ({**v, "total_samples": None} if k == "train" else v) for k, v in c.items()
                if k in ("unet", "encoder", "diffusion", "train")}

    return strip(saved) == strip(json.loads(json.dumps(current)))  # tuples read back as lists


def step_latents(settings: DemoSettings, data: str, bundle: str) -> dict[str, Any]:
    from .data import open_images
    from .infer_latents import infer_latents

    size = read_config(bundle).image_size
    images = open_images(data, size, split="train", holdout=settings.holdout, flip=False)
    out = str(Path(settings.out) / "latents")
    stats = infer_latents(images.dataset, bundle, out, batch_size=64, concurrency=1, skips=images.skips)
    return {"latents": out, "count": stats.count, "z_std_mean": float(stats.std.mean())}


def step_latent_dpm(settings: DemoSettings, bundle: str, latents: str) -> dict[str, Any]:
    from .train_latent import LatentTrainJob, train_latent

    cfg = _model_config(settings)
    recipe = dataclasses.replace(cfg.latent_train, total_samples=settings.latent_budget, seed=settings.seed)
    shutil.rmtree(Path(settings.out) / "runs" / "latent", ignore_errors=True)  # never resume another recipe's run
    job = LatentTrainJob(bundle=bundle, latents=latents, storage=str(Path(settings.out) / "runs"), name="latent",
                         train=recipe, num_workers=1, log_every=200)
    result = train_latent(job)
    last = result.history[-1][1] if result.history else None
    return {"bundle": result.bundle, "steps": result.steps, "samples": result.samples, "final_loss": last}


def step_classifier(settings: DemoSettings, bundle: str, latents: str) -> dict[str, Any]:
    from .train_classifier import CLASSIFIER_RECIPE, ClassifierJob, train_classifier

    # The official 300k-sample budget is for 30k CelebA-HQ latents; 4 attributes of a few thousand
    # latents converge long before that (the loss plateaus by ~60k samples).
    recipe = dataclasses.replace(CLASSIFIER_RECIPE, total_samples=settings.classifier_budget, seed=settings.seed)
    shutil.rmtree(Path(settings.out) / "runs" / "classifier", ignore_errors=True)
    job = ClassifierJob(bundle=bundle, latents=latents, storage=str(Path(settings.out) / "runs"), name="classifier",
                        train=recipe)
    result = train_classifier(job)
    return {"bundle": result.bundle, "metrics": result.metrics}


def test_split(settings: DemoSettings, data: str, image_size: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` held-out images [n, 3, S, S] in [-1, 1] and their attributes [n, 4] (sorted by id)."""
    from diffae_core.datasets import SHAPES_ATTRIBUTES

    from .data import load_dataset

    ds = load_dataset(data, image_size, split="heldout", holdout=settings.holdout, flip=False)
    rows = sorted(ds.take_all(), key=lambda r: str(r["id"]))[:n]
    if not rows:
        raise RuntimeError(f"the held-out split of {data} is empty")
    images = torch.stack([torch.tensor(r["image"]) for r in rows]).float()  # a copy: Ray hands out read-only arrays
    attrs = torch.tensor([[int(r[a]) for a in SHAPES_ATTRIBUTES] for r in rows], dtype=torch.int64)
    return images, attrs


def step_evaluate(settings: DemoSettings, data: str, bundle: str, figures: Path) -> dict[str, Any]:
    """Judge ``bundle`` on the held-out split with the oracle; PNG grids go to ``figures``."""
    from diffae_core import quality

    model = DiffAE.load(bundle)
    n = settings.test_images
    images, attrs = test_split(settings, data, model.config.image_size, n)
    steps = settings.steps
    stochastic, z, x_T, rec = quality.stochastic_reconstruction(model, images, steps=steps, progress=True)
    semantic, sem_images = quality.semantic_reconstruction(model, images, attrs, steps=steps, seed=settings.seed,
                                                           z=z, progress=True)
    m = min(settings.manipulation_images, len(images))
    manipulation = quality.manipulation(model, attrs[:m], z[:m], x_T[:m], alphas=settings.alphas, steps=steps,
                                        progress=True)
    samples, sample_images = quality.sample_attributes(model, settings.sample_images, attrs, steps=steps,
                                                       latent_steps=steps, seed=settings.seed, progress=True)
    demo_report.write_figures(figures, model, images, rec, sem_images, sample_images, z, x_T, settings.alphas, steps)
    return {"stochastic_reconstruction": stochastic, "semantic_reconstruction": semantic,
            "manipulation": manipulation, "samples": samples, "test_images": len(images)}


def demo_model_info(path: str, image_size: int) -> dict[str, Any] | None:
    """What is known about the shipped demo model at ``path``, or None when there is none to evaluate.

    Returns {"bundle", "digest" (of its manifest), "about" (provenance.json beside the bundle, if any)}
    or {"skipped": reason} when the bundle exists but cannot be judged on this demo's images.
    """
    if not path:
        return None
    bundle = Path(path)
    manifest = bundle / "manifest.json"
    if not manifest.exists():
        return None
    about_file = bundle.parent / f"{bundle.name}.json"
    about = json.loads(about_file.read_text()) if about_file.exists() else {}
    size = read_config(str(bundle)).image_size  # the config only, not the weights
    if size != image_size:
        return {"skipped": f"the demo model is {size} px, this demo's images are {image_size} px"}
    digest = hashlib.sha1(manifest.read_bytes()).hexdigest()[:12]
    return {"bundle": str(bundle), "digest": digest, "about": about}


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The demo's headline numbers, next to the targets the report checks them against."""
    manip = metrics["manipulation"]
    best = max(manip.values(), key=lambda r: r["success"]) if manip else {"success": 0.0, "kept": 0.0}
    return {
        "stochastic_psnr_db": {"value": metrics["stochastic_reconstruction"]["psnr_db"], "target": 30.0},
        "semantic_agreement_all": {"value": metrics["semantic_reconstruction"]["agreement_all"], "target": 0.9},
        "manipulation_success_mean": {"value": sum(r["success"] for r in manip.values()) / max(len(manip), 1),
                                      "target": 0.7},
        "manipulation_kept_mean": {"value": sum(r["kept"] for r in manip.values()) / max(len(manip), 1),
                                   "target": 0.8},
        "manipulation_best_success": {"value": best["success"], "target": 0.7},
    }


def step_serve(settings: DemoSettings, bundle: str) -> dict[str, Any]:
    from . import demo_serve

    return demo_serve.call_app(bundle, Path(settings.out) / "served", settings.port,
                               keep_serving=os.environ.get("DEMO_KEEP_SERVING") == "1")


# ---- main -------------------------------------------------------------------------------------
def _live_model(runner: StepRunner, settings: DemoSettings, image_size: int) -> dict[str, Any]:
    """Steps 1-6: data, the live model's training stages and its evaluation; each step's result by name."""
    out = Path(settings.out)
    data = runner.run("data", settings.fingerprint("images", "holdout", "seed", "preset"),
                      lambda: step_data(settings, image_size))
    # the resolved recipes, not only the preset's name: a changed recipe must not reuse a model trained with
    # the old one (the autoencoder's and the latent DPM's parts separately)
    cfg = _model_config(settings).to_dict()
    key = _digest(cfg, "unet", "encoder", "diffusion", "train") + settings.fingerprint(
        "images", "holdout", "seed", "preset", "budget_images", "num_workers")
    train = runner.run("train", key, lambda: step_train(settings, data["data"]))
    latents = runner.run("latents", key, lambda: step_latents(settings, data["data"], train["bundle"]))
    key += _digest(cfg, "latent", "latent_diffusion", "latent_train") + settings.fingerprint("latent_budget",
                                                                                             "classifier_budget")
    latent = runner.run("latent-dpm", key, lambda: step_latent_dpm(settings, train["bundle"], latents["latents"]))
    classifier = runner.run("classifier", key, lambda: step_classifier(settings, train["bundle"], latents["latents"]))
    key += settings.fingerprint("test_images", "manipulation_images", "sample_images", "steps", "alphas")
    evaluation = runner.run("evaluate", key, lambda: step_evaluate(settings, data["data"], train["bundle"], out))
    return {"data": data, "train": train, "latents": latents, "latent": latent, "classifier": classifier,
            "evaluation": evaluation}


def _shipped_model(runner: StepRunner, settings: DemoSettings, data: str, image_size: int) -> dict[str, Any] | None:
    """Step 7: the shipped demo model judged on the same held-out images (or why it is not)."""
    shipped = demo_model_info(settings.demo_model, image_size)
    if shipped is None or "skipped" in shipped:
        runner.skip("demo-model", shipped["skipped"] if shipped else "no shipped demo model")
        return shipped
    key = shipped["digest"] + settings.fingerprint("images", "holdout", "seed", "preset", "test_images",
                                                   "manipulation_images", "sample_images", "steps", "alphas")
    evaluation = runner.run("demo-model", key,
                            lambda: step_evaluate(settings, data, shipped["bundle"], Path(settings.out) / "demo-model"))
    return {"bundle": shipped["bundle"], "about": shipped["about"], "headline": _headline(evaluation), **evaluation}


def run_demo(settings: DemoSettings, fresh: bool = False) -> dict[str, Any]:
    """Run every step; returns metrics.json's content. Raises DemoStepError naming the failed step."""
    settings = dataclasses.replace(settings, out=os.path.abspath(settings.out))
    out = Path(settings.out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    image_size = _model_config(settings).image_size
    runner = StepRunner(out, total=9)
    _start_ray()
    live = _live_model(runner, settings, image_size)
    demo_model = _shipped_model(runner, settings, live["data"]["data"], image_size)
    train = live["train"]
    metrics = {
        "headline": _headline(live["evaluation"]), **live["evaluation"],
        "training": {k: train.get(k) for k in ("samples_seen", "steps", "loss", "images_per_second", "seconds",
                                               "num_workers", "skipped_images")},
        "latent_dpm": live["latent"], "classifier": live["classifier"]["metrics"], "data": live["data"],
        "latents": live["latents"], "settings": dataclasses.asdict(settings), "bundle": train["bundle"],
        "demo_model": demo_model,
    }
    served_bundle = demo_model["bundle"] if demo_model and "bundle" in demo_model else train["bundle"]

    def report() -> dict[str, Any]:
        metrics["timings_s"] = {**runner.timings, "total": round(time.time() - started, 1)}
        storage.write_json(str(out / "metrics.json"), metrics)
        demo_report.write_html(out, metrics)
        return {"report": str(out / "report.html")}

    runner.run("report", str(time.time()), report)  # always rewritten: cheap, and shows this run's timings
    metrics["serving"] = runner.run("serve", str(time.time()), lambda: step_serve(settings, served_bundle))
    metrics["serving"]["bundle"] = served_bundle
    report()  # again, now with the served images and URLs
    return metrics


def ship_demo_model(metrics: dict[str, Any], dest: str, command: str) -> Path:
    """Copy this run's final bundle to ``dest`` (replacing it) with ``dest.json`` saying how it was made.

    ``make demo-model`` ships its model this way; ``make demo`` then evaluates and serves it beside the
    live one. The provenance names the command, budgets, machine, commit and this run's own figures.
    """
    import platform
    import subprocess

    from diffae_core.bundle import MANIFEST

    source, target = Path(metrics["bundle"]), Path(dest)
    files = [*json.loads((source / MANIFEST).read_text())["files"], MANIFEST]  # the manifest last
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in files:
        shutil.copy2(source / name, staging / name)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    train, settings = metrics["training"], metrics["settings"]
    about = {
        "command": command, "date": time.strftime("%Y-%m-%d"), "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}",
        "preset": settings["preset"], "data": f"shapes, {settings['images']} images, {settings['holdout']:.0%} held out",
        "samples_seen": train.get("samples_seen"), "train_seconds": train.get("seconds"),
        "images_per_second_end": train.get("images_per_second"), "num_workers": train.get("num_workers"),
        "latent_budget": settings["latent_budget"], "classifier_budget": settings["classifier_budget"],
        "evaluation": {"test_images": metrics["test_images"], "steps": settings["steps"],
                       "headline": {k: v["value"] for k, v in metrics["headline"].items()}},
        "timings_s": metrics.get("timings_s"),
    }
    target.with_name(target.name + ".json").write_text(json.dumps(about, indent=2, default=str) + "\n")
    return target


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    return jobkit.build_parser(DemoSettings, prog)


def _print_headline(metrics: dict[str, Any], out: Path) -> None:
    print(f"\nreport: {(out / 'report.html').resolve()}")
    shipped = metrics.get("demo_model") or {}
    print(f"  {'':28s} {'live':>8s}  {'demo model' if 'headline' in shipped else '':>10s}")
    for name, row in metrics["headline"].items():
        other = f"{shipped['headline'][name]['value']:10.3f}" if "headline" in shipped else ""
        print(f"  {name:28s} {row['value']:8.3f}  {other}  (target {row['target']})")


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    try:
        settings = jobkit.resolve(DemoSettings, build_parser(prog).parse_args(argv))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        metrics = run_demo(settings, fresh=settings.fresh)
    except DemoStepError as exc:
        print(f"\n{exc}", file=sys.stderr)
        print("Fix the cause and run `make demo` again: finished steps are reused.", file=sys.stderr)
        return 1
    out = Path(settings.out)
    if settings.ship:
        command = shlex.join(["python", "-m", "pipelines.demo", *(argv if argv is not None else sys.argv[1:])])
        print(f"shipped the trained bundle to {ship_demo_model(metrics, settings.ship, command)}")
    _print_headline(metrics, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
