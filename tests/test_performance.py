"""diffae_core.performance: options keep the weights' names and values, and the math within fp32 rounding."""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace

import pytest
import torch

from diffae_core import DiffAE, native
from diffae_core.blocks import AttentionBlock
from diffae_core.nn import Dropout, adaptive_group_norm, group_norm_nhwc, group_norm_rows
from diffae_core.performance import PerformanceOptions, apply, optimizer_kwargs
from pipelines.training import speed_options


@pytest.fixture
def native_off(monkeypatch):
    """The PyTorch GroupNorm paths for one test: the native kernel switched off (DIFFAE_NATIVE_KERNELS=0)."""
    monkeypatch.setenv("DIFFAE_NATIVE_KERNELS", "0")
    native.library.cache_clear()
    yield
    native.library.cache_clear()  # the next caller loads the kernel again, with the environment restored


@pytest.fixture(params=["native", "GroupNormNHWC"])
def group_norm_kernel(request, monkeypatch):
    """Each channels_last CPU training GroupNorm in turn: the native kernel, then GroupNormNHWC (the native
    kernel switched off). Yields the kernel's name."""
    if request.param == "native" and not native.available():
        pytest.skip("no C compiler here: the native GroupNorm kernel cannot build")
    if request.param != "native":
        monkeypatch.setenv("DIFFAE_NATIVE_KERNELS", "0")
    native.library.cache_clear()
    yield request.param
    native.library.cache_clear()


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
    assert cuda.tf32 and cuda.fused_optimizer and cuda.channels_last and not cuda.compile and not cuda.heap_reuse
    assert not PerformanceOptions.for_device("cpu", 16).channels_last
    assert PerformanceOptions.for_device("cpu", 32).channels_last
    assert optimizer_kwargs(PerformanceOptions(fused_optimizer=True)) == {"fused": True}
    assert optimizer_kwargs(PerformanceOptions()) == {"foreach": True}
    job = SimpleNamespace(channels_last=False, tf32=None, fused_optimizer=False, compile=None)
    options = speed_options(job, torch.device("cpu"), 256)
    assert options == PerformanceOptions(channels_last=False, tf32=False, fused_optimizer=False, compile=False,
                                         heap_reuse=True)


def test_cpu_dropout_drops_at_rate_p_scales_and_follows_the_seed():
    drop = Dropout(0.25).train()
    x = torch.ones(32, 64, 16, 16)
    y = drop(x)
    assert torch.equal(y.unique(), torch.tensor([0.0, 4.0 / 3.0]))
    assert abs((y == 0).float().mean().item() - 0.25) < 0.005  # 262k draws: 5 sigma is about 0.0042
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    assert torch.equal(drop(x), a) and not torch.equal(drop(x), a)
    xc = torch.randn(4, 8, 6, 5).to(memory_format=torch.channels_last)
    yc = drop(xc)
    assert yc.is_contiguous(memory_format=torch.channels_last)
    assert bool(((yc == 0) | torch.isclose(yc, xc * 4.0 / 3.0)).all())
    leaf = torch.randn(7, 9, requires_grad=True)
    out = drop(leaf)
    out.sum().backward()
    assert torch.equal(leaf.grad, (out != 0).float() * 4.0 / 3.0)
    assert torch.equal(drop.eval()(xc), xc)


def test_attention_linear_sdpa_path_matches_the_conv_einsum_formulation():
    """AttentionBlock.attend (linears over positions + SDPA) against the official formulation: 1x1 Conv1d
    qkv, per-head legacy split, einsum logits scaled by 1/sqrt(ch) on both sides, float32 softmax —
    forward and backward, one and two heads."""
    torch.manual_seed(0)
    for heads in (1, 2):
        block = AttentionBlock(64, num_heads=heads)
        torch.nn.init.normal_(block.proj_out.weight, std=0.1)
        x = torch.randn(3, 64, 6, 5, requires_grad=True)
        h = block.norm(x.reshape(3, 64, -1))
        fast = block.attend(h)
        ch = 64 // heads
        q, k, v = block.qkv(h).reshape(3 * heads, 3 * ch, 30).split(ch, dim=1)
        scale = 1 / ch**0.25
        weights = torch.einsum("bct,bcs->bts", q * scale, k * scale).float().softmax(dim=-1)
        ref = block.proj_out(torch.einsum("bts,bcs->bct", weights, v).reshape(3, 64, 30))
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
        g = torch.randn_like(ref)
        grads = torch.autograd.grad(fast, [x, block.qkv.weight, block.proj_out.weight], g, retain_graph=True)
        ref_grads = torch.autograd.grad(ref, [x, block.qkv.weight, block.proj_out.weight], g)
        for got, want in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_position_major_group_norm_matches_aten_forward_and_backward():
    """group_norm_rows (the channels_last CPU inference GroupNorm) against F.group_norm with a per-example
    affine, at 1, 2 and 4 channels per group; its autograd gradient by gradcheck in float64."""
    torch.manual_seed(0)
    for b, c, groups in ((3, 32, 32), (2, 64, 32), (2, 16, 4)):
        x = (torch.randn(b, c, 5, 6, dtype=torch.float64) * 3 + 2).contiguous(memory_format=torch.channels_last)
        scale, shift = torch.randn(b, c, dtype=torch.float64), torch.randn(b, c, dtype=torch.float64)
        want = torch.nn.functional.group_norm(x, groups, eps=1e-5) * scale[..., None, None] + shift[..., None, None]
        got = group_norm_nhwc(x, groups, scale, shift, 1e-5)
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
        rows = x.permute(0, 2, 3, 1).reshape(b, 30, c).detach().requires_grad_()
        args = (rows, scale.requires_grad_(), shift.requires_grad_())
        assert torch.autograd.gradcheck(lambda r, s, t, g=groups: group_norm_rows(r, g, s, t, 1e-5), args)


def test_adaptive_group_norm_matches_group_norm_then_affine_on_every_branch(native_off):
    """adaptive_group_norm against F.group_norm then ``* scale + shift``, values and gradients within float32
    rounding (it computes in float32, as GroupNorm32), on each of its branches: one image (GroupNorm's own
    affine), a contiguous batch (one image of B * C channels), channels_last batches (rows, and ATen +
    addcmul above 16x16), under autograd, and a [1, C] scale and shift broadcast over the batch."""
    torch.manual_seed(0)
    cases = [(1, 16, 4, 5, 6, False), (1, 16, 4, 5, 6, True), (3, 32, 8, 5, 6, False), (3, 32, 8, 5, 6, True),
             (2, 16, 4, 17, 17, True)]
    for b, c, groups, h, w, channels_last in cases:
        for scale_rows in (b, 1):
            x = torch.randn(b, c, h, w) * 3 + 2
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            scale, shift = torch.randn(scale_rows, c), torch.randn(scale_rows, c)
            want = torch.nn.functional.group_norm(x, groups, eps=1e-5) * scale[..., None, None] + shift[..., None, None]
            with torch.no_grad():
                torch.testing.assert_close(adaptive_group_norm(x, groups, scale, shift, 1e-5), want,
                                           atol=1e-5, rtol=1e-5)
            leaves = [t.clone().requires_grad_() for t in (x, scale, shift)]
            got = adaptive_group_norm(leaves[0], groups, leaves[1], leaves[2], 1e-5)
            ref = [t.clone().requires_grad_() for t in (x, scale, shift)]
            want = torch.nn.functional.group_norm(ref[0], groups, eps=1e-5) * ref[1][..., None, None] + ref[2][..., None, None]
            grad = torch.randn_like(want)
            for got_grad, want_grad in zip(torch.autograd.grad(got, leaves, grad), torch.autograd.grad(want, ref, grad),
                                           strict=True):
                torch.testing.assert_close(got_grad, want_grad, atol=1e-4, rtol=1e-4)


def test_ddim_runs_compute_the_conditioning_once_and_match_the_unet_step_by_step():
    """DiffAE.decode and encode_stochastic run the time MLP and every ResBlock's emb_layers and
    cond_emb_layers once per DDIM run (AdaGNSchedule), not once per step, and give the result of calling the
    UNet step by step, within fp32 rounding, with and without z_sem."""
    from diffae_core.blocks import ResBlock
    from diffae_core.unet import AdaGNSchedule

    torch.manual_seed(0)
    model = DiffAE.from_preset("tiny32").eval()
    for p in model.parameters():  # zero-initialised convs would hide the conditioning
        p.data.add_(torch.randn_like(p) * 0.02)
    unet = model.unet
    x, x_T = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 3, 32, 32)
    z = model.encode(x)
    with torch.no_grad():
        want_x0 = model.diffusion.ddim_sample(lambda x_t, t: unet(x_t, t, z), x_T, steps=4)
        want_xT = model.diffusion.ddim_invert(lambda x_t, t: unet(x_t, t, z), x, steps=4)
    calls: list[str] = []
    hooks = [layer.register_forward_hook(lambda *_, name=name: calls.append(name))
             for name, layer in unet.named_modules() if name == "time_embed" or name.endswith("emb_layers")]
    try:
        got_x0 = model.decode(x_T, z, steps=4)
        got_xT = model.encode_stochastic(x, z, steps=4)
    finally:
        for hook in hooks:
            hook.remove()
    blocks = unet.res_blocks()
    assert len(blocks) == sum(isinstance(m, ResBlock) for m in unet.modules()) > 0
    assert len(calls) == 2 * (2 * len(blocks) + 1) and len(set(calls)) == 2 * len(blocks) + 1  # once each per run
    torch.testing.assert_close(got_x0, want_x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_xT, want_xT, atol=1e-5, rtol=1e-5)
    timesteps = model.diffusion.tables(4, "cpu").timesteps
    with torch.no_grad():
        for cond in (z, None):
            affines = AdaGNSchedule(unet, timesteps, cond).at(2)
            assert [a[0].shape[0] for a in affines] == [2 if cond is not None else 1] * len(blocks)
            t = timesteps[2].expand(2)
            torch.testing.assert_close(unet(x, t, cond, affines), unet(x, t, cond), atol=1e-5, rtol=1e-5)


def _codes_nchw_then_channels_last(monkeypatch, module, name: str):
    """A tiny32's (z, 2-step decoding) of two images as an NCHW model, then as the same model made
    channels_last, with ``module.name`` counting its calls from there on. Returns the model, the images
    and the results: (model, x, want_z, want, got_z, got, calls)."""
    torch.manual_seed(0)
    model = DiffAE.from_preset("tiny32").eval()
    x, x_T = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want_z = model.encode(x)
        want = model.decode(x_T, want_z, steps=2)
    calls: list[int] = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: calls.append(1) or original(*a))
    apply(model, PerformanceOptions(channels_last=True))
    with torch.no_grad():
        got_z = model.encode(x)
        got = model.decode(x_T, got_z, steps=2)
    return model, x, want_z, want, got_z, got, calls


def test_channels_last_inference_takes_the_rows_path_and_matches_nchw(native_off, monkeypatch):
    """Under no_grad a channels_last tiny32 encodes and decodes through group_norm_rows and the
    position-major attention, within fp32 rounding of the NCHW model; training does not (its GroupNorm is
    GroupNormNHWC, tested below)."""
    from diffae_core import nn as core_nn

    model, x, z, want, got_z, got, calls = _codes_nchw_then_channels_last(monkeypatch, core_nn, "group_norm_rows")
    inference_calls = len(calls)
    model.train()
    model.training_loss(x).backward()
    assert inference_calls > 0 and len(calls) == inference_calls
    torch.testing.assert_close(got_z, z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_training_group_norm_nhwc_backward_matches_aten_and_gradcheck():
    """group_norm_nhwc under autograd (GroupNormNHWC, the hand-written backward) against F.group_norm with
    a per-example affine: values and gradients, both forward branches (rows statistics up to 16x16
    positions, ATen's above), 1 to 4 channels per group, and gradcheck (fast mode) in float64."""
    torch.manual_seed(0)
    for b, c, groups, h, w in ((3, 32, 32, 5, 6), (2, 16, 4, 5, 6), (2, 16, 4, 17, 17), (2, 8, 8, 16, 17)):
        x = (torch.randn(b, c, h, w, dtype=torch.float64) * 3 + 2).contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        scale = torch.randn(b, c, dtype=torch.float64, requires_grad=True)
        shift = torch.randn(b, c, dtype=torch.float64, requires_grad=True)
        got = group_norm_nhwc(x, groups, scale, shift, 1e-5)
        assert type(got.grad_fn).__name__ == "GroupNormNHWCBackward"
        want = torch.nn.functional.group_norm(x, groups, eps=1e-5) * scale[..., None, None] + shift[..., None, None]
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
        grad = torch.randn_like(want)
        got_grads = torch.autograd.grad(got, (x, scale, shift), grad)
        want_grads = torch.autograd.grad(want, (x, scale, shift), grad)
        for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(got_grad, want_grad, atol=1e-10, rtol=1e-10)
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert got_grads[0].is_contiguous(memory_format=torch.channels_last)
        # fast_mode: random projections of the Jacobian (full gradcheck of the 17x17 maps takes ~30 s)
        assert torch.autograd.gradcheck(lambda x, s, t, g=groups: group_norm_nhwc(x, g, s, t, 1e-5), (x, scale, shift),
                                        fast_mode=True)


def _act_reference(x: torch.Tensor, groups: int, scale: torch.Tensor, shift: torch.Tensor,
                   silu: bool) -> torch.Tensor:
    """``act(F.group_norm(x) * scale + shift)`` in float64: what the native kernel computes in float32."""
    out = torch.nn.functional.group_norm(x.double(), groups, eps=1e-5) * scale.double()[..., None, None]
    out = out + shift.double()[..., None, None]
    return torch.nn.functional.silu(out) if silu else out


def test_native_group_norm_act_matches_a_float64_reference_in_values_and_gradients():
    """native.group_norm_act with and without the SiLU against float64 GroupNorm + affine (+ SiLU): values
    and x/scale/shift gradients within float32 rounding, for 1 to 4 channels per group, maps longer than
    the kernel's 64-row summation chunks, a mean far from zero (two-pass statistics), and a group count
    that is not a power of two; under no_grad the same values without an autograd node."""
    if not native.available():
        pytest.skip("no C compiler here: the native GroupNorm kernel cannot build")
    torch.manual_seed(0)
    for b, c, groups, h, w in ((3, 32, 32, 5, 6), (2, 64, 32, 17, 17), (2, 6, 3, 5, 7), (1, 128, 32, 4, 4),
                               (2, 32, 8, 70, 3)):
        for silu in (False, True):
            x = (torch.randn(b, c, h, w) * 3 + 20).contiguous(memory_format=torch.channels_last).requires_grad_()
            scale = (torch.randn(b, c) + 1).requires_grad_()
            shift = torch.randn(b, c).requires_grad_()
            assert native.takes_native(x, groups)
            got = native.group_norm_act(x, groups, scale, shift, 1e-5, silu)
            assert type(got.grad_fn).__name__ == "GroupNormActBackward"
            assert got.is_contiguous(memory_format=torch.channels_last)
            want = _act_reference(x, groups, scale, shift, silu)
            torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
            grad = torch.randn_like(got)
            got_grads = torch.autograd.grad(got, (x, scale, shift), grad)
            want_grads = torch.autograd.grad(want, (x, scale, shift), grad.double())
            for name, got_grad, want_grad in zip("x scale shift".split(), got_grads, want_grads, strict=True):
                torch.testing.assert_close(got_grad.double(), want_grad.double(), atol=1e-4, rtol=1e-4,
                                           msg=lambda m, n=name: f"{n}: {m}")
            assert got_grads[0].is_contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                assert torch.equal(native.group_norm_act(x, groups, scale, shift, 1e-5, silu), got)


def test_native_kernel_is_taken_only_where_it_runs():
    """takes_native refuses NCHW maps, other dtypes, channel counts the groups do not divide and more than
    one intra-op thread (the kernel is single-threaded: ATen's parallel kernels stay)."""
    if not native.available():
        pytest.skip("no C compiler here: the native GroupNorm kernel cannot build")
    x = torch.randn(2, 32, 6, 6).contiguous(memory_format=torch.channels_last)
    assert native.takes_native(x, 8)
    assert not native.takes_native(x.contiguous(), 8)
    assert not native.takes_native(x.double(), 8)
    assert not native.takes_native(x, 5)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert not native.takes_native(x, 8)
    finally:
        torch.set_num_threads(threads)


def test_native_kernel_switched_off_keeps_the_pytorch_paths(native_off):
    """With DIFFAE_NATIVE_KERNELS=0 nothing takes the kernel, and GroupNorm32 (+ SiLU) of a channels_last
    map still matches ATen through the PyTorch paths."""
    from diffae_core.nn import GroupNorm32, norm_silu

    x = torch.randn(2, 32, 6, 6).contiguous(memory_format=torch.channels_last)
    assert not native.available() and not native.takes_native(x, 8)
    norm = GroupNorm32(8, 32)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
        want = torch.nn.functional.group_norm(x, 8, norm.weight, norm.bias, norm.eps)
        torch.testing.assert_close(norm(x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(norm_silu(norm, x), torch.nn.functional.silu(want), atol=1e-5, rtol=1e-5)


def test_native_kernel_builds_once_per_cache_and_falls_back_without_a_compiler(tmp_path):
    """In fresh processes: the first import builds one library into DIFFAE_KERNEL_DIR, the next reuses it
    untouched; a compiler that does not exist leaves the kernel off with a warning, and the model runs."""
    import subprocess
    import sys

    probe = ("import logging, torch; logging.basicConfig(); torch.set_num_threads(1); "
             "from diffae_core import native; from diffae_core.nn import GroupNorm32; "
             "x = torch.randn(1, 8, 4, 4).contiguous(memory_format=torch.channels_last); "
             "GroupNorm32(4, 8)(x); print(native.available())")
    env = {**os.environ, "DIFFAE_KERNEL_DIR": str(tmp_path)}
    env.pop("DIFFAE_NATIVE_KERNELS", None)
    first = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=180)
    if first.stdout.strip() == "False" and "no C compiler" in first.stderr:
        pytest.skip("no C compiler here: the native GroupNorm kernel cannot build")
    assert first.returncode == 0 and first.stdout.strip() == "True", first.stderr
    built = list(tmp_path.glob("*.so"))
    assert len(built) == 1 and not list(tmp_path.glob("*.tmp"))
    stamp = built[0].stat().st_mtime_ns
    second = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=180)
    assert second.stdout.strip() == "True" and list(tmp_path.glob("*.so")) == built
    assert built[0].stat().st_mtime_ns == stamp
    broken = subprocess.run([sys.executable, "-c", probe], env={**env, "CC": str(tmp_path / "no-such-cc"),
                                                                 "DIFFAE_KERNEL_DIR": str(tmp_path / "other")},
                            capture_output=True, text=True, timeout=180)
    assert broken.returncode == 0 and broken.stdout.strip() == "False"
    assert "did not build" in broken.stderr


def test_loading_the_native_kernel_leaves_the_process_ieee_subnormals(tmp_path):
    """A fresh build, loaded in a fresh process, keeps subnormal floats in Python and in torch: -ffast-math
    on the link line would pull in crtfastmath.o and flush them to zero for every library of the process
    (hypothesis, for one, then refuses to generate floats)."""
    import subprocess
    import sys

    probe = ("import sys, torch; from diffae_core import native; "
             "tiny = float(sys.argv[1]); assert tiny * 1.0 > 0, 'subnormals work before the load'; "
             "print(native.available(), tiny * 1.0 > 0, (torch.tensor(tiny * 1e283) * 1.0).item() > 0)")
    env = {**os.environ, "DIFFAE_KERNEL_DIR": str(tmp_path)}
    env.pop("DIFFAE_NATIVE_KERNELS", None)
    # The subnormals come in on the command line so that no constant folding stands in for the arithmetic.
    run = subprocess.run([sys.executable, "-c", probe, "5e-324"], env=env, capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0, run.stderr
    built, python_ok, torch_ok = run.stdout.split()
    if built == "False":
        pytest.skip("no C compiler here: the native GroupNorm kernel cannot build")
    assert (python_ok, torch_ok) == ("True", "True"), "loading the kernel flushed subnormals to zero"


def test_channels_last_inference_takes_the_native_kernel_and_matches_nchw(monkeypatch):
    """Under no_grad a channels_last tiny32 encodes and decodes through the native kernel (every GroupNorm of
    the encoder and the UNet), within fp32 rounding of the NCHW model."""
    if not native.available():
        pytest.skip("no C compiler here: the native GroupNorm kernel cannot build")
    model, _, z, want, got_z, got, calls = _codes_nchw_then_channels_last(monkeypatch, native, "_forward")
    norms = sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    assert len(calls) >= norms  # the encoder once, the UNet's once per step
    torch.testing.assert_close(got_z, z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_channels_last_training_takes_its_group_norm_and_matches_nchw_gradients(group_norm_kernel):
    """A channels_last tiny32's training loss backpropagates through the native kernel (GroupNormAct) or,
    with it switched off, GroupNormNHWC, instead of ATen's GroupNorm backward, with the NCHW model's loss
    and gradients (fp32 rounding)."""
    expected_op = "GroupNormActBackward" if group_norm_kernel == "native" else "GroupNormNHWCBackward"
    torch.manual_seed(0)
    nchw = DiffAE.from_preset("tiny32").eval()  # eval: no dropout, whose mask follows the memory order
    for p in nchw.parameters():  # zero-initialised convs would give the decoder's inner layers no gradient
        p.data.add_(torch.randn_like(p) * 0.02)
    nhwc = apply(copy.deepcopy(nchw), PerformanceOptions(channels_last=True))
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    losses = {}
    for name, model in (("nchw", nchw), ("nhwc", nhwc)):
        torch.manual_seed(1)
        loss = model.training_loss(x)  # NCHW for both: the noise follows x's memory order
        ops = _profiled_ops(loss.backward)
        losses[name] = loss.item()
        if name == "nhwc":
            assert expected_op in ops and "aten::native_group_norm_backward" not in ops
        else:
            assert "aten::native_group_norm_backward" in ops
    assert abs(losses["nchw"] - losses["nhwc"]) < 1e-5 * max(1.0, losses["nchw"])
    for (name, want), got in zip(nchw.named_parameters(), nhwc.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, atol=2e-5, rtol=1e-3, msg=name)


def _profiled_ops(fn) -> set[str]:
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return {event.key for event in prof.key_averages()}


def test_conv2d_takes_onednn_for_channels_last_inference_and_matches_aten():
    """The shapes ATen sends to its im2col path at one thread (1x1 below batch 16, small batch-1 maps) go
    to oneDNN under no_grad, within fp32 summation-order rounding; under autograd and under bf16 autocast
    nn.Conv2d's own path."""
    from diffae_core.nn import Conv2d

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for batch, c_in, c_out, size, kernel in ((8, 64, 32, 16, 1), (1, 64, 64, 16, 3), (1, 32, 64, 8, 3)):
            conv = Conv2d(c_in, c_out, kernel, padding=kernel // 2).to(memory_format=torch.channels_last)
            x = torch.randn(batch, c_in, size, size).contiguous(memory_format=torch.channels_last)
            want = torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=kernel // 2)
            with torch.no_grad():
                ops = _profiled_ops(lambda c=conv, x=x: c(x))
                got = conv(x)
            assert "aten::mkldnn_convolution" in ops and "aten::_slow_conv2d_forward" not in ops, ops
            assert got.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                assert conv(x).dtype == torch.bfloat16  # bf16 inference: autocast still casts the convolution
            x.requires_grad_()
            assert "aten::_slow_conv2d_forward" in _profiled_ops(lambda c=conv, x=x: c(x))  # ATen's own choice
    finally:
        torch.set_num_threads(threads)


def test_reuse_heap_keeps_freed_feature_maps_from_faulting_again():
    """In a fresh process (the setting is process-wide): a channels_last tiny32 decoding a batch of 8
    page-faults thousands of times on every call with glibc's defaults (freed maps go back to the
    kernel), and hardly at all once reuse_heap() has let the heap grow to its peak."""
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        import pytest

        pytest.skip("reuse_heap tunes glibc's malloc; this C library is not glibc")
    script = (
        "import resource, torch\n"
        "from diffae_core import DiffAE\n"
        "from diffae_core.performance import reuse_heap\n"
        "torch.manual_seed(0)\n"
        "model = DiffAE.from_preset('tiny32').eval().to(memory_format=torch.channels_last)\n"
        "x_T, z = torch.randn(8, 3, 32, 32), torch.randn(8, 512)\n"
        "def faults():  # the fewest of 3 calls after a warm-up: the steady state, not the heap's growth\n"
        "    model.decode(x_T, z, steps=2)\n"
        "    counts = []\n"
        "    for _ in range(3):\n"
        "        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "        model.decode(x_T, z, steps=2)\n"
        "        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)\n"
        "    return min(counts)\n"
        "before = faults()\n"
        "ok = reuse_heap()\n"
        "print(before, faults(), ok)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)
    before, after, ok = out.stdout.split()
    assert ok == "True"
    assert int(before) >= 1000 and int(after) < int(before) / 20, out.stdout


def test_frozen_convolutions_prepack_weights_and_follow_weight_changes():
    """tune_for_inference / freeze(): channels_last inference convolves with the weight prepacked for oneDNN, gives the
    unfrozen model's outputs, deep-copies, and notices new weights (load_state_dict, in-place updates)."""
    import copy

    from diffae_core.nn import PREPACKED, Conv2d
    from diffae_core.performance import freeze, tune_for_inference

    if not PREPACKED:
        import pytest

        pytest.skip("this torch build lacks the oneDNN prepacked-convolution ops that freeze() uses")
    torch.manual_seed(0)
    model = apply(DiffAE.from_preset("tiny32").eval(), PerformanceOptions(channels_last=True))
    other = apply(DiffAE.from_preset("tiny32").eval(), PerformanceOptions(channels_last=True))
    for p in other.parameters():  # non-zero everywhere, so every conv's weights matter
        p.data.normal_(0, 0.05)
    x, x_T = torch.rand(1, 3, 32, 32) * 2 - 1, torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        z, want = model.encode(x), model.decode(x_T, model.encode(x), steps=2)
        other_z = other.encode(x)
        tune_for_inference(model, "cpu", 32)  # channels_last (already) and frozen
        assert all(m.frozen for m in model.modules() if isinstance(m, Conv2d))
        ops = _profiled_ops(lambda: model.encode(x))
        assert "mkldnn::_convolution_pointwise" in ops, ops
        torch.testing.assert_close(model.encode(x), z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.decode(x_T, z, steps=2), want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(copy.deepcopy(model).encode(x), z, atol=1e-5, rtol=1e-5)
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(model.encode(x), other_z, atol=1e-5, rtol=1e-5)
        for p in model.parameters():
            p.mul_(0.5)
        for p in other.parameters():
            p.mul_(0.5)
        torch.testing.assert_close(model.encode(x), other.encode(x), atol=1e-5, rtol=1e-5)
        freeze(model, frozen=False)
        assert "mkldnn::_convolution_pointwise" not in _profiled_ops(lambda: model.encode(x))
