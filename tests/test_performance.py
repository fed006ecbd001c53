"""diffae_core.performance: options keep the weights' names and values, and the math within fp32 rounding."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from diffae_core import DiffAE
from diffae_core.performance import PerformanceOptions, apply, optimizer_kwargs
from pipelines.training import speed_options


def test_channels_last_keeps_keys_outputs_and_bundles(tmp_path):
    torch.manual_seed(0)
    model = DiffAE.from_preset("tiny32")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z, x_T = model.encode(x), torch.randn(2, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model.decode(x_T, z, steps=3)
    apply(model, PerformanceOptions(channels_last=True))
    assert model.unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    torch.testing.assert_close(model.encode(x), z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.decode(x_T, z, steps=3), expected, atol=1e-4, rtol=1e-4)
    model.save(tmp_path / "bundle")
    torch.testing.assert_close(DiffAE.load(tmp_path / "bundle").encode(x), z, atol=1e-5, rtol=1e-5)


def test_defaults_per_device_and_job_overrides():
    cuda = PerformanceOptions.for_device("cuda")
    assert cuda.tf32 and cuda.fused_optimizer and cuda.channels_last and not cuda.compile
    assert not PerformanceOptions.for_device("cpu", 32).channels_last
    assert PerformanceOptions.for_device("cpu", 64).channels_last
    assert optimizer_kwargs(PerformanceOptions(fused_optimizer=True)) == {"fused": True}
    assert optimizer_kwargs(PerformanceOptions()) == {"foreach": True}
    job = SimpleNamespace(channels_last=False, tf32=None, fused_optimizer=False, compile=None)
    options = speed_options(job, torch.device("cpu"), 256)
    assert options == PerformanceOptions(channels_last=False, tf32=False, fused_optimizer=False, compile=False)
