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


def test_worker_setup_hook_drops_only_the_two_noisy_train_lines(caplog):
    import logging

    from pipelines import ray_logs

    ray_logs.quiet_train_logs()
    from ray.train.v2._internal.execution import context  # the module whose per-report line is dropped

    cleaner, report = logging.getLogger(ray_logs._CLEANER_LOGGER), context.logger
    with caplog.at_level(logging.INFO):
        cleaner.warning("Failed to query Ray Train Controller actor state. State API may be temporarily unavailable.")
        report.info("Reporting training result 7: TrainingReport(checkpoint=None)")
        cleaner.warning("Failed to remove placement group abc")
        report.error("worker 1 died")
    assert [r.getMessage() for r in caplog.records] == ["Failed to remove placement group abc", "worker 1 died"]


def test_a_replayed_close_does_not_reopen_a_progress_bar():
    from ray.experimental import tqdm_ray

    from pipelines.ray_logs import tolerate_replayed_bar_updates

    tolerate_replayed_bar_updates()
    tolerate_replayed_bar_updates()  # idempotent
    manager = tqdm_ray._BarManager()
    state = {"__magic_token__": tqdm_ray.RAY_TQDM_MAGIC, "x": 0, "pos": 0, "desc": "train", "total": 10,
             "unit": "img", "ip": "10.0.0.9", "pid": 4242, "uuid": "bar-1", "closed": False}
    manager.process_state_update(dict(state))
    group = manager.bar_groups[("10.0.0.9", 4242)]
    assert group.has_bar("bar-1")
    manager.process_state_update({**state, "x": 10, "closed": True})
    assert not group.has_bar("bar-1")
    manager.process_state_update({**state, "x": 10, "closed": True})  # the worker's last lines, replayed
    manager.process_state_update({**state, "x": 10})
    assert not group.has_bar("bar-1")


def test_a_changed_recipe_is_not_resumed_but_a_bigger_budget_is():
    base = demo._model_config(demo.DemoSettings(budget_images=14_080)).to_dict()
    saved = json.loads(json.dumps(base))  # as read back from the run's config.json
    assert demo._same_recipe(saved, demo._model_config(demo.DemoSettings(budget_images=28_160)).to_dict())
    assert not demo._same_recipe(saved, demo._model_config(demo.DemoSettings(preset="tiny32")).to_dict())
    changed = get_preset("demo16")
    changed.diffusion.prediction = "eps"
    assert not demo._same_recipe(saved, changed.to_dict())
