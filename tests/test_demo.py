"""`make demo`'s own parts: step reuse, the shipped demo model, and a report that names each figure's model.

The whole demo (Ray Train, Serve) is run by `make demo`, not here: these tests check the pieces it is
made of, and that the shipped bundle really carries a semantic code (judged by the pixel oracle).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffae_core import DiffAE, quality
from diffae_core.config import get_preset
from diffae_core.datasets import shapes_array
from pipelines import demo, demo_report
from pipelines.data import is_heldout

SHIPPED = Path(demo.DEFAULT_DEMO_MODEL)


def test_step_runner_reuses_finished_steps_and_names_failures(tmp_path):
    calls = []
    runner = demo.StepRunner(tmp_path, total=3)
    assert runner.run("data", "k1", lambda: calls.append(1) or {"n": 1}) == {"n": 1}
    again = demo.StepRunner(tmp_path, total=3)
    assert again.run("data", "k1", lambda: calls.append(2) or {"n": 2}) == {"n": 1}  # reused
    assert again.run("data", "k2", lambda: calls.append(3) or {"n": 3}) == {"n": 3}  # settings changed
    assert calls == [1, 3]

    def broken() -> dict:
        raise FileNotFoundError("no such file: x.parquet")

    with pytest.raises(demo.DemoStepError, match="demo step 'train' failed: FileNotFoundError: no such file"):
        again.run("train", "k", broken)
    assert not (tmp_path / "state" / "train.json").exists()  # a failed step is not recorded as done


def test_demo_model_info(tmp_path):
    assert demo.demo_model_info("", 16) is None
    assert demo.demo_model_info(str(tmp_path / "absent"), 16) is None
    model = DiffAE(get_preset("demo16"))
    model.save(tmp_path / "m")
    (tmp_path / "m.json").write_text(json.dumps({"command": "make demo-model", "samples_seen": 64}))
    info = demo.demo_model_info(str(tmp_path / "m"), 16)
    assert info["bundle"] == str(tmp_path / "m") and len(info["digest"]) == 12
    assert info["about"]["samples_seen"] == 64
    assert "32 px" in demo.demo_model_info(str(tmp_path / "m"), 32)["skipped"]


def test_ship_copies_the_bundle_and_records_how_it_was_made(tmp_path):
    model = DiffAE(get_preset("demo16"))
    model.save(tmp_path / "run" / "bundle")
    metrics = {**_evaluation(30.5), "bundle": str(tmp_path / "run" / "bundle"),
               "training": {"samples_seen": 640, "seconds": 12.0, "images_per_second": 53.0, "num_workers": 2},
               "settings": {"preset": "demo16", "images": 2000, "holdout": 0.1, "latent_budget": 100,
                            "classifier_budget": 100, "steps": 20}}
    (tmp_path / "assets" / "demo-model").mkdir(parents=True)
    (tmp_path / "assets" / "demo-model" / "stale.bin").write_bytes(b"old")  # replaced, not merged
    shipped = demo.ship_demo_model(metrics, str(tmp_path / "assets" / "demo-model"), "python -m pipelines.demo x")
    assert not (shipped / "stale.bin").exists()
    reloaded = DiffAE.load(str(shipped))  # checksums verified against the manifest
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values(),
                                                 strict=True))
    about = json.loads((tmp_path / "assets" / "demo-model.json").read_text())
    assert about["samples_seen"] == 640 and about["evaluation"]["headline"]["stochastic_psnr_db"] == 30.5
    assert about["command"] == "python -m pipelines.demo x" and about["preset"] == "demo16"


def _evaluation(psnr: float) -> dict:
    manip = {a: {"best_alpha": 0.4, "success": 0.5, "flip_rate": 0.6, "kept": 0.9} for a in ("red", "left")}
    ev = {"stochastic_reconstruction": {"psnr_db": psnr, "ssim": 0.9, "oracle_agreement": 0.9, "steps": 20},
          "semantic_reconstruction": {"agreement": {"red": 0.9, "left": 0.8}, "agreement_all": 0.7,
                                      "chance_all": 0.25},
          "manipulation": manip,
          "samples": {"frequency": {"red": 0.5}, "data_frequency": {"red": 0.5}, "no_foreground": 0, "samples": 8},
          "test_images": 8}
    return {"headline": demo._headline(ev), **ev}


def test_report_says_which_model_made_each_figure(tmp_path):
    from PIL import Image

    for folder in ("", "demo-model/"):
        (tmp_path / folder).mkdir(exist_ok=True)
        for name in ("reconstruction.png", "samples.png", "manipulation-red.png"):
            Image.new("RGB", (4, 4)).save(tmp_path / folder / name)
    live = _evaluation(25.0)
    metrics = {**live, "training": {"num_workers": 2, "samples_seen": 64}, "bundle": "runs/autoencoder/bundle",
               "demo_model": {"bundle": "assets/demo-model", "about": {"command": "make demo-model"},
                              **_evaluation(31.0)}}
    page = demo_report.write_html(tmp_path, metrics).read_text()
    assert 'src="demo-model/reconstruction.png"' in page and 'src="reconstruction.png"' in page
    assert page.count("(demo model)</figcaption>") == 3 and page.count("(live model)</figcaption>") == 3
    assert "31.000" in page and "25.000" in page  # both models' PSNR in the targets table
    metrics["demo_model"] = {"skipped": "the demo model is 16 px, this demo's images are 32 px"}
    page = demo_report.write_html(tmp_path, metrics).read_text()
    assert "Not evaluated: the demo model is 16 px" in page and "(demo model)" not in page


def test_demo_preset_flag_lists_the_presets(capsys):
    with pytest.raises(SystemExit):
        demo.build_parser().parse_args(["--preset", "nope"])
    assert "demo16" in capsys.readouterr().err


@pytest.mark.skipif(not (SHIPPED / "manifest.json").exists(), reason="no shipped demo model in this checkout")
def test_shipped_demo_model_carries_the_attributes_in_z_sem():
    """The committed bundle: z_sem alone (fresh x_T) must bring back each held-out image's attributes."""
    model = DiffAE.load(str(SHIPPED))
    assert model.latent_net is not None and model.classifier is not None and model.attributes
    about = json.loads((SHIPPED.parent / f"{SHIPPED.name}.json").read_text())
    assert about["command"].startswith("python -m pipelines.demo") and "--budget-images" in about["command"]
    # held-out images of the demo's shapes set (ids never trained on), as the demo's test split
    candidates, attrs = shapes_array(400, model.image_size)
    keep = [i for i in range(400) if is_heldout(f"shapes-{i:07d}", 0.1)][:32]
    images = torch.from_numpy(candidates[keep]).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.manual_seed(0)
    metrics, _ = quality.semantic_reconstruction(model, images, torch.from_numpy(attrs[keep]), steps=10)
    per_attribute = metrics["agreement"]
    assert min(per_attribute.values()) >= 0.75, per_attribute  # chance is 0.5


def test_driver_draws_rank_zeros_progress_and_events_in_order(ray_cluster, capsys):
    """Progress travels from a worker to the driver through the board actor, not through Ray's log forwarding:
    every update and event posted before the block ends is printed, in order, as the product's own lines."""
    import ray

    from pipelines.progress import ConsoleProgress, driver_progress

    @ray.remote(num_cpus=0)
    def rank_zero(progress) -> None:
        progress.event("resumed from step 2")
        for step in (3, 4):
            progress.update({"step": step, "samples_seen": 8 * step, "loss": 1.0 / step, "samples_per_second": 50.0},
                            final=step == 4)

    with driver_progress(ConsoleProgress("train", 32, 8, "img", bar=False), interval_s=0.1) as progress:
        ray.get(rank_zero.remote(progress))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[train]")]
    assert lines == ["[train] resumed from step 2",
                     "[train] step 3/4 samples 24/32 (75.0%) loss 0.3333 50.0 img/s",
                     "[train] step 4/4 samples 32/32 (100.0%) loss 0.2500 50.0 img/s"], lines


def test_a_changed_recipe_is_not_resumed_but_a_bigger_budget_is():
    base = demo._model_config(demo.DemoSettings(budget_images=14_080)).to_dict()
    saved = json.loads(json.dumps(base))  # as read back from the run's config.json
    assert demo._same_recipe(saved, demo._model_config(demo.DemoSettings(budget_images=28_160)).to_dict())
    assert not demo._same_recipe(saved, demo._model_config(demo.DemoSettings(preset="tiny32")).to_dict())
    changed = get_preset("demo16")
    changed.diffusion.prediction = "eps"
    assert not demo._same_recipe(saved, changed.to_dict())
