"""Import of official phizaz/diffae checkpoints: safe unpickling, architecture inference, golden outputs.

Checkpoint files are built here in the layout of the released files (Lightning 1.4: the ``callbacks``
dict is keyed by the ModelCheckpoint class object) from the golden fixtures in ``tests/golden``.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import importlib.abc
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffae_core.config import (
    CELEBAHQ_ATTRIBUTES,
    EncoderConfig,
    LatentConfig,
    ModelConfig,
    UNetConfig,
    get_preset,
)
from diffae_core.latent import LatentMLP
from diffae_core.model import DiffAE
from diffae_core.official import (
    LightningStandIn,
    OfficialFormatError,
    UnsafeCheckpointError,
    convert_official,
    infer_config,
    load_official,
    pickle_globals,
    safe_torch_load,
    to_official_classifier_state_dict,
    to_official_state_dict,
)

GOLDEN = Path(__file__).parent / "golden"
LIGHTNING_MODULE = "pytorch_lightning.callbacks.model_checkpoint"
ATOL = 1e-4


# ---- building official-looking files ----------------------------------------------------------


@contextlib.contextmanager
def fake_lightning(
    module: str = LIGHTNING_MODULE, name: str = "ModelCheckpoint", base: type = object
) -> Iterator[type]:
    """A throwaway Lightning class (default: ModelCheckpoint) that pickle can reference by name."""
    parts = module.split(".")
    names = [".".join(parts[: i + 1]) for i in range(len(parts))]
    modules = {n: types.ModuleType(n) for n in names}
    cls = type(name, (base,), {"__module__": module})
    setattr(modules[module], name, cls)
    sys.modules.update(modules)
    try:
        yield cls
    finally:
        for n in names:
            sys.modules.pop(n, None)


class _BlockLightning(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pytorch_lightning", "lightning"):
            raise ImportError(f"test: {name} must not be imported while loading a checkpoint")
        return None


@pytest.fixture(autouse=True)
def no_lightning(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading must work without Lightning: make any attempt to import it fail."""
    monkeypatch.setattr(sys, "meta_path", [_BlockLightning(), *sys.meta_path])
    assert "pytorch_lightning" not in sys.modules


def save_lightning_ckpt(path: Path, state_dict: dict[str, torch.Tensor], legacy: bool = False) -> Path:
    """A checkpoint with the top-level layout of Lightning 1.4's ``dump_checkpoint``."""
    with fake_lightning() as model_checkpoint:
        ckpt = {
            "epoch": 3,
            "global_step": 1234,
            "pytorch-lightning_version": "1.4.5",
            "state_dict": state_dict,
            "callbacks": {
                model_checkpoint: {
                    "monitor": None,
                    "best_model_score": None,
                    "best_model_path": "",
                    "current_score": None,
                    "dirpath": "checkpoints/x",
                }
            },
            "optimizer_states": [
                {
                    "state": {0: {"step": 10, "exp_avg": torch.zeros(3), "exp_avg_sq": torch.ones(3)}},
                    "param_groups": [
                        {
                            "lr": 1e-4,
                            "betas": (0.9, 0.999),
                            "eps": 1e-8,
                            "weight_decay": 0,
                            "amsgrad": False,
                            "params": [0],
                        }
                    ],
                }
            ],
            "lr_schedulers": [],
            "native_amp_scaling_state": {
                "scale": 65536.0,
                "growth_factor": 2.0,
                "backoff_factor": 0.5,
                "growth_interval": 2000,
                "_growth_tracker": 7,
            },
            "hparams_name": "conf",
            "hyper_parameters": {"name": "tiny", "net_ch": 32, "net_ch_mult": [1, 2], "fp16": True},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    return path


def fixture_weights(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / f"official_{name}.safetensors"))


def fixture_io(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / f"official_{name}_io.safetensors"))


def autoencoder_ckpt(tmp_path: Path, name: str, with_x_T: bool = True, legacy: bool = False) -> Path:
    """last.ckpt from a fixture: ``ema_model.*`` = fixture, ``model.*`` = its negation (must be ignored)."""
    fx = fixture_weights(name)
    ema = {k: v for k, v in fx.items() if not k.startswith(("cls.", "conds_", "x_T"))}
    state = {f"model.{k}": -v for k, v in ema.items()}
    state.update({f"ema_model.{k}": v for k, v in ema.items()})
    state.update({k: fx[k] for k in ("conds_mean", "conds_std") if k in fx})
    if with_x_T:
        state["x_T"] = fx["x_T_buffer"]
    return save_lightning_ckpt(tmp_path / f"{name}_autoenc" / "last.ckpt", state, legacy)


def classifier_ckpt(tmp_path: Path, name: str = "A") -> Path:
    fx = fixture_weights(name)
    state = {k[len("cls.") :]: v for k, v in fx.items() if k.startswith("cls.")}
    return save_lightning_ckpt(tmp_path / "cls.ckpt", state)


# ---- safety -------------------------------------------------------------------------------------


class _Reduce:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize(
    "global_name, make",
    [
        ("system", lambda marker: _Reduce(os.system, f"touch {marker}")),
        ("eval", lambda marker: _Reduce(builtins.eval, f"open({str(marker)!r}, 'w').close()")),
        ("Popen", lambda marker: _Reduce(subprocess.Popen, ["touch", str(marker)])),
    ],
)
def test_malicious_pickle_is_refused(tmp_path, global_name, make, legacy, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"ema_model.out.2.bias": torch.zeros(3)}, "global_step": 1, "x": make(marker)}
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy, pickle_protocol=protocol)
    with pytest.raises(UnsafeCheckpointError, match=global_name) as info:
        load_official(path)
    assert "Nothing was executed" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4])
def test_torch_allowlist_still_refuses_when_the_scan_misses(tmp_path, monkeypatch, protocol):
    """Second line of defence: even if our static scan saw nothing, torch's weights-only unpickler refuses."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"x": _Reduce(os.system, f"touch {marker}")}, path, pickle_protocol=protocol)
    monkeypatch.setattr("diffae_core.official.pickle_globals", lambda _: [])
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        safe_torch_load(path)
    assert not marker.exists()


def test_lightning_class_key_loads_as_inert_stand_in(tmp_path):
    path = save_lightning_ckpt(tmp_path / "last.ckpt", {"w": torch.ones(2)})
    assert f"{LIGHTNING_MODULE}.ModelCheckpoint" in pickle_globals(path)
    ckpt = safe_torch_load(path)
    (key,) = ckpt["callbacks"]
    assert issubclass(key, LightningStandIn) and key.official_path == f"{LIGHTNING_MODULE}.ModelCheckpoint"
    assert ckpt["global_step"] == 1234 and torch.equal(ckpt["state_dict"]["w"], torch.ones(2))
    assert "pytorch_lightning" not in sys.modules


def test_lightning_attribute_dict_loads_as_plain_dict(tmp_path):
    path = tmp_path / "x.ckpt"
    with fake_lightning("pytorch_lightning.utilities.parsing", "AttributeDict", dict) as attribute_dict:
        torch.save({"hyper_parameters": attribute_dict(net_ch=32, name="x")}, path)
    hparams = safe_torch_load(path)["hyper_parameters"]
    assert type(hparams) is dict and hparams == {"net_ch": 32, "name": "x"}


def test_other_lightning_globals_are_refused(tmp_path):
    path = tmp_path / "x.ckpt"
    with fake_lightning("pytorch_lightning.core.lightning", "LightningModule") as module_class:
        torch.save({"state_dict": {}, "cls": module_class}, path)
    with pytest.raises(UnsafeCheckpointError, match="pytorch_lightning.core.lightning.LightningModule"):
        safe_torch_load(path)


# ---- architecture inference ---------------------------------------------------------------------


def _ema_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("ema_model.") :]: v for k, v in state.items() if k.startswith("ema_model.")}


def test_infer_config_fixture_a():
    weights = {k: v for k, v in fixture_weights("A").items() if not k.startswith(("cls.", "conds_", "x_T"))}
    cfg = infer_config(weights, image_size=32)
    assert cfg.unet == UNetConfig(
        image_size=32,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=2,
        attention_resolutions=(16,),
        embed_channels=512,
        cond_channels=512,
    )
    assert cfg.encoder == EncoderConfig(
        channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=None, out_channels=512
    )
    assert cfg.latent == LatentConfig(
        num_channels=512, num_hid_channels=256, num_layers=4, num_time_emb_channels=64, skip_layers=None
    )


def test_infer_config_fixture_b():
    weights = {k: v for k, v in fixture_weights("B").items() if not k.startswith("x_T")}
    cfg = infer_config(weights, image_size=32)
    assert cfg.unet == UNetConfig(
        image_size=32,
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(16,),
    )
    assert cfg.encoder == EncoderConfig(channel_mult=(1, 2, 2, 2), num_res_blocks=1)
    assert cfg.latent is None


@pytest.mark.parametrize("preset", ["ffhq64", "ffhq128", "horse128", "ffhq256", "tiny32"])
def test_infer_config_full_size_presets(preset):
    """Export a preset's (meta-device, shapes-only) model in the official layout and infer it back."""
    cfg = get_preset(preset)
    with torch.device("meta"):
        model = DiffAE(cfg)
        model.attach_latent(LatentMLP(cfg.latent), torch.zeros(cfg.z_dim), torch.ones(cfg.z_dim))
    state = to_official_state_dict(model)
    inferred = infer_config(_ema_copy(state), image_size=state["x_T"].shape[-1])
    assert (inferred.unet, inferred.encoder, inferred.latent) == (cfg.unet, cfg.encoder, cfg.latent)


def test_infer_config_unusual_layout():
    """Different input/output res blocks, an encoder without attention, explicit skip layers, no norm."""
    cfg = ModelConfig(
        unet=UNetConfig(
            image_size=16,
            model_channels=32,
            channel_mult=(1, 3),
            num_res_blocks=2,
            num_input_res_blocks=1,
            attention_resolutions=(8,),
            cond_channels=64,
            embed_channels=128,
        ),
        encoder=EncoderConfig(
            channel_mult=(2, 2, 1), num_res_blocks=3, attention_resolutions=(16,), out_channels=64
        ),
        latent=LatentConfig(
            num_channels=64,
            num_hid_channels=96,
            num_layers=3,
            num_time_emb_channels=32,
            skip_layers=(2,),
            use_norm=False,
        ),
    )
    with torch.device("meta"):
        model = DiffAE(cfg)
        model.attach_latent(LatentMLP(cfg.latent), torch.zeros(64), torch.ones(64))
    inferred = infer_config(_ema_copy(to_official_state_dict(model)), image_size=16)
    assert (inferred.unet, inferred.encoder, inferred.latent) == (cfg.unet, cfg.encoder, cfg.latent)


# ---- golden outputs of the official code --------------------------------------------------------


@pytest.fixture(scope="module")
def model_a(tmp_path_factory) -> DiffAE:
    tmp = tmp_path_factory.mktemp("official_a")
    return load_official(autoencoder_ckpt(tmp, "A"), classifier_ckpt=classifier_ckpt(tmp))


def test_golden_a_config_and_names(model_a):
    assert model_a.config.name == "A_autoenc"
    assert model_a.attributes == ["attr_0", "attr_1", "attr_2"]
    fx = fixture_weights("A")
    assert torch.equal(model_a.latent_mean, fx["conds_mean"].flatten())
    assert torch.equal(model_a.classifier.z_mean, fx["cls.conds_mean"].flatten())
    assert torch.equal(model_a.classifier.linear.weight, fx["cls.classifier.weight"])  # online, not EMA


def test_golden_a_outputs(model_a):
    io = fixture_io("A")
    torch.testing.assert_close(model_a.encode(io["x"]), io["z"], atol=ATOL, rtol=0)
    torch.testing.assert_close(
        model_a.predict_noise(io["x_t"], io["t"], io["z"]), io["eps"], atol=ATOL, rtol=0
    )
    torch.testing.assert_close(
        model_a.predict_latent_noise(io["z_t"], io["t_lat"]), io["lat_eps"], atol=ATOL, rtol=0
    )
    torch.testing.assert_close(model_a.classify(io["z"]), io["logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(model_a.manipulate(io["z"], "attr_1", 0.3), io["z_manip"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("legacy", [False, True])
def test_golden_b_outputs(tmp_path, legacy):
    model = load_official(autoencoder_ckpt(tmp_path, "B", legacy=legacy))
    assert model.latent_net is None and model.classifier is None
    io = fixture_io("B")
    torch.testing.assert_close(model.encode(io["x"]), io["z"], atol=ATOL, rtol=0)
    torch.testing.assert_close(model.predict_noise(io["x_t"], io["t"], io["z"]), io["eps"], atol=ATOL, rtol=0)


def test_latent_pkl_overrides_checkpoint_stats(tmp_path):
    stats = {"conds": torch.randn(8, 512), "conds_mean": torch.randn(512), "conds_std": torch.rand(512) + 0.5}
    torch.save(stats, tmp_path / "latent.pkl")
    model = DiffAE.from_official(autoencoder_ckpt(tmp_path, "A"), latent_stats=tmp_path / "latent.pkl")
    assert torch.equal(model.latent_mean, stats["conds_mean"]) and torch.equal(
        model.latent_std, stats["conds_std"]
    )


def test_forty_outputs_get_celebahq_names(tmp_path):
    state = {
        "conds_mean": torch.zeros(1, 512),
        "conds_std": torch.ones(1, 512),
        "classifier.weight": torch.randn(40, 512),
        "classifier.bias": torch.randn(40),
        "ema_classifier.weight": torch.randn(40, 512),
        "ema_classifier.bias": torch.randn(40),
    }
    cls_path = save_lightning_ckpt(tmp_path / "cls40.ckpt", state)
    model = load_official(autoencoder_ckpt(tmp_path, "B"), classifier_ckpt=cls_path)
    assert model.attributes == list(CELEBAHQ_ATTRIBUTES)
    assert model.manipulate(torch.zeros(1, 512), "Smiling", 0.2).shape == (1, 512)


# ---- errors that say what to do -----------------------------------------------------------------


def test_missing_x_T_needs_image_size(tmp_path):
    path = autoencoder_ckpt(tmp_path, "B", with_x_T=False)
    with pytest.raises(OfficialFormatError, match="image_size="):
        load_official(path)
    assert load_official(path, image_size=32).image_size == 32


def test_architecture_mismatch_lists_keys(tmp_path):
    fx = fixture_weights("B")
    state = {f"ema_model.{k}": v for k, v in fx.items() if k != "x_T_buffer"}
    state["x_T"] = fx["x_T_buffer"]
    del state["ema_model.input_blocks.1.0.emb_layers.1.bias"]
    state["ema_model.middle_block.1.extra.weight"] = torch.zeros(2)
    with pytest.raises(OfficialFormatError) as info:
        load_official(save_lightning_ckpt(tmp_path / "bad.ckpt", state))
    message = str(info.value)
    assert "missing in file: input_blocks.1.0.emb_layers.1.bias" in message
    assert "unexpected in file: middle_block.1.extra.weight" in message


def test_classifier_checkpoint_passed_as_autoencoder(tmp_path):
    with pytest.raises(OfficialFormatError, match="classifier_ckpt="):
        load_official(classifier_ckpt(tmp_path))


# ---- round trip ---------------------------------------------------------------------------------


def _tiny_model() -> DiffAE:
    cfg = ModelConfig(
        name="roundtrip",
        unet=UNetConfig(
            image_size=16,
            model_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(8,),
            embed_channels=64,
            cond_channels=64,
        ),
        encoder=EncoderConfig(channel_mult=(1, 2, 2), num_res_blocks=1, out_channels=64),
        latent=LatentConfig(num_channels=64, num_hid_channels=64, num_layers=3, num_time_emb_channels=16),
    )
    torch.manual_seed(0)
    model = DiffAE(cfg)
    model.attach_latent(LatentMLP(cfg.latent), torch.randn(64), torch.rand(64) + 0.5)
    model.attach_classifier(
        torch.randn(3, 64), torch.randn(3), torch.randn(64), torch.rand(64) + 0.5, ["a", "b", "c"]
    )
    with torch.no_grad():  # leave no zero-initialised layer: every weight must matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_round_trip_through_official_layout(tmp_path):
    model = _tiny_model()
    ae = save_lightning_ckpt(tmp_path / "roundtrip" / "last.ckpt", to_official_state_dict(model))
    cls = save_lightning_ckpt(tmp_path / "cls.ckpt", to_official_classifier_state_dict(model))
    loaded = load_official(ae, classifier_ckpt=cls)
    assert dataclasses.replace(loaded.config, attributes=None) == dataclasses.replace(
        model.config, attributes=None
    )
    assert loaded.attributes == ["attr_0", "attr_1", "attr_2"]
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    t = torch.tensor([5, 700])
    z = model.encode(x)
    torch.testing.assert_close(loaded.encode(x), z, atol=0, rtol=0)
    torch.testing.assert_close(loaded.predict_noise(x, t, z), model.predict_noise(x, t, z), atol=0, rtol=0)
    torch.testing.assert_close(
        loaded.predict_latent_noise(z, t), model.predict_latent_noise(z, t), atol=0, rtol=0
    )
    torch.testing.assert_close(loaded.classify(z), model.classify(z), atol=0, rtol=0)


def test_official_state_dict_restores_latent_aliases():
    state = to_official_state_dict(_tiny_model())
    assert torch.equal(
        state["ema_model.latent_net.layers.0.cond_layers.1.weight"],
        state["ema_model.latent_net.layers.0.linear_emb.weight"],
    )
    assert state["conds_mean"].shape == (1, 64) and state["x_T"].shape == (1, 3, 16, 16)
    assert {k.split(".", 1)[1] for k in state if k.startswith("model.")} == {
        k.split(".", 1)[1] for k in state if k.startswith("ema_model.")
    }


def test_convert_official_writes_a_bundle(tmp_path):
    out = tmp_path / "bundle"
    model = convert_official(autoencoder_ckpt(tmp_path, "A"), out, classifier=classifier_ckpt(tmp_path))
    reloaded = DiffAE.load(out)
    io = fixture_io("A")
    torch.testing.assert_close(reloaded.encode(io["x"]), model.encode(io["x"]), atol=0, rtol=0)
    torch.testing.assert_close(reloaded.classify(io["z"]), io["logits"], atol=ATOL, rtol=0)


def test_cli_convert_official(tmp_path):
    """`diffae convert-official` (the console script's entry point) writes a loadable bundle."""
    from pipelines.cli import main

    ckpt = autoencoder_ckpt(tmp_path, "A")
    cls = classifier_ckpt(tmp_path, "A")
    assert main(["convert-official", str(ckpt), str(tmp_path / "bundle"), "--classifier", str(cls)]) == 0
    loaded = DiffAE.load(tmp_path / "bundle")
    io = fixture_io("A")
    torch.testing.assert_close(loaded.encode(io["x"]), io["z"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loaded.classify(io["z"]), io["logits"], atol=1e-4, rtol=1e-4)
