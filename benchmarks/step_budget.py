"""Where a training step's time goes, and the most that speeding up its non-arithmetic work could win.

    python benchmarks/step_budget.py [--preset tiny32] [--batch 16] [--threads 1] [--repeats 5]
                                     [--profile-steps 3] [--ratio-now 1.14] [--target 1.3]

The step is benchmarks/train_step.py's ``make_step`` with this tree's defaults for the device
(channels_last and fused Adam where they are on, glibc heap reuse). It is timed without the profiler
(median of ``--repeats``), then profiled for ``--profile-steps`` more. The profile's self CPU time is
split into parts: convolutions forward and backward, attention (SDPA), matmuls, the native GroupNorm +
SiLU kernel, and everything else (elementwise ops, dropout's mask, copies, the optimiser, Python).

The arithmetic parts get their FLOPs and rates from torch's flop counter on one step. Two formulas the
counter lacks are added: the oneDNN convolutions diffae_core calls directly, and the CPU flash-attention
kernels (with torch's formulas for its other attention kernels). A 1024^3 sgemm's rate is printed next
to them. When those parts already run near that rate, only the rest can shrink. The last lines say how
fast the step would be if the rest took no time. With ``--ratio-now`` (this tree's speed-up over an
older one, measured interleaved by benchmarks/compare_core.py) they also say how small the rest must
become for a ``--target`` speed-up over that older tree.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import (
    FlopCounterMode,
    conv_flop_count,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    cpu_matmul_rate,
    machine,
    median,
    reuse_heap_by_default,
    setup_threads,
    time_calls,
)
from benchmarks.train_step import default_variant, make_step  # noqa: E402

CONV_FORWARD = "convolutions, forward"
CONV_BACKWARD = "convolutions, backward"
ATTENTION = "attention (SDPA)"
MATMULS = "matmuls (linear layers)"
GROUP_NORM = "GroupNorm + SiLU (native kernel)"
REST = "everything else"
ARITHMETIC = (CONV_FORWARD, CONV_BACKWARD, ATTENTION, MATMULS)

PART_OF_EVENT = {  # profiler event name -> part; every other event's self time is REST
    "aten::mkldnn_convolution": CONV_FORWARD,
    "aten::_slow_conv2d_forward": CONV_FORWARD,  # ATen's im2col path: 1x1 kernels below batch 16
    "aten::convolution_backward": CONV_BACKWARD,
    "aten::_slow_conv2d_backward": CONV_BACKWARD,  # ATen's im2col path: 1x1 kernels below batch 16
    "aten::_scaled_dot_product_flash_attention_for_cpu": ATTENTION,
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward": ATTENTION,
    "aten::mm": MATMULS,
    "aten::addmm": MATMULS,
    "aten::bmm": MATMULS,
    "GroupNormAct": GROUP_NORM,
    "GroupNormActBackward": GROUP_NORM,
}
PART_OF_COUNTED_OP = {"convolution": CONV_FORWARD, "mkldnn_convolution": CONV_FORWARD,
                      "convolution_backward": CONV_BACKWARD,
                      "mm": MATMULS, "addmm": MATMULS, "bmm": MATMULS,
                      "_scaled_dot_product_flash_attention_for_cpu": ATTENTION,
                      "_scaled_dot_product_flash_attention_for_cpu_backward": ATTENTION}


@dataclass
class Budget:
    """One preset and batch: the unprofiled step and its split into parts.

    The parts other than REST take their profiled self CPU time: they are few calls of long kernels, so the
    profiler's cost per call is small against them. REST is the unprofiled step less those parts, which
    leaves the profiler's own cost (``profiled_s - step_s``, mostly per small op) out of every part."""

    preset: str
    batch: int
    step_s: float  # median wall seconds of an unprofiled step
    profiled_s: float  # self CPU seconds of a profiled step, all events
    part_s: dict[str, float]  # part -> seconds per step
    part_flops: dict[str, float]  # arithmetic part -> FLOPs per step
    sgemm_flops_per_s: float

    @property
    def arithmetic_s(self) -> float:
        return sum(self.part_s[p] for p in ARITHMETIC)

    def flops_per_s(self, part: str) -> float:
        return self.part_flops[part] / self.part_s[part] if self.part_s[part] else 0.0


def flash_forward_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """Torch's attention formula for the CPU flash kernel, which its counter leaves out:
    q [B, H, L, D], k [B, H, S, D], v [B, H, S, Dv] -> 2·B·H·L·S·(D + Dv)."""
    return sdpa_flop_count(q_shape, k_shape, v_shape)


def flash_backward_flops(grad_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """The backward's: recomputed scores and four products, 2.5 times the forward."""
    return sdpa_backward_flop_count(grad_shape, q_shape, k_shape, v_shape)


def onednn_conv_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """The counter's formula for ``aten.mkldnn_convolution``, which diffae_core's ``nn.Conv2d`` calls
    directly for channels_last maps outside autograd (the input convolutions of a training step)."""
    return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


def counted_flops(step) -> dict[str, float]:
    """FLOPs of one call of ``step`` per part, from torch's flop counter with the formulas it lacks added."""
    aten = torch.ops.aten
    missing = {aten.mkldnn_convolution: onednn_conv_flops,
               aten._scaled_dot_product_flash_attention_for_cpu: flash_forward_flops,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: flash_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=missing) as counter:
        step()
    flops = dict.fromkeys(ARITHMETIC, 0.0)
    for op, count in counter.get_flop_counts().get("Global", {}).items():
        part = PART_OF_COUNTED_OP.get(str(op).split(".")[-1])
        if part is not None:
            flops[part] += count
    return flops


def measure(preset: str, batch: int, repeats: int = 5, profile_steps: int = 3) -> Budget:
    """Time, count and profile the default training step of ``preset`` at ``batch`` on the CPU."""
    device = torch.device("cpu")
    channels_last, optim_impl = default_variant(device, preset)
    step = make_step(preset, batch, device, channels_last, optim_impl, None)
    step_s = median(time_calls(step, device, repeats=repeats, warmup=2))
    part_flops = counted_flops(step)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(profile_steps):
            step()
    part_s = dict.fromkeys((*ARITHMETIC, GROUP_NORM, REST), 0.0)
    for row in prof.key_averages():
        part_s[PART_OF_EVENT.get(row.key, REST)] += row.self_cpu_time_total / 1e6 / profile_steps
    profiled_s = sum(part_s.values())
    part_s[REST] = max(step_s - sum(part_s[p] for p in part_s if p != REST), 0.0)
    return Budget(preset, batch, step_s, profiled_s, part_s, part_flops, cpu_matmul_rate(1024, repeats=20, warmup=3))


def markdown(budget: Budget, ratio_now: float | None = None, target: float = 1.3) -> str:
    """The budget as a markdown table and the bound lines under it."""
    lines = [f"# step budget: {budget.preset} b{budget.batch}, {machine()}",
             f"unprofiled step {budget.step_s:.3f} s; profiled {budget.profiled_s:.3f} s per step; "
             f"1024^3 sgemm {budget.sgemm_flops_per_s / 1e9:.0f} GFLOP/s", "",
             "| part | ms / step | share | GFLOP / step | GFLOP/s |", "|---|---|---|---|---|"]
    for part, seconds in budget.part_s.items():
        flops = budget.part_flops.get(part)
        counted = (f"{flops / 1e9:.2f} | {budget.flops_per_s(part) / 1e9:.0f}" if flops is not None
                   else "- | -")
        lines.append(f"| {part} | {seconds * 1e3:.1f} | {seconds / budget.step_s:.1%} | {counted} |")
    arithmetic, rest = budget.arithmetic_s, budget.step_s - budget.arithmetic_s
    most = budget.step_s / arithmetic
    lines += ["", f"arithmetic parts {arithmetic * 1e3:.0f} ms, the rest (the GroupNorm kernel and everything else) "
              f"{rest * 1e3:.0f} ms; with the rest at no cost the step would be {most:.2f}x this tree's"]
    if ratio_now:
        allowed = budget.step_s * ratio_now / target - arithmetic  # the step that target asks for, less arithmetic
        reach = (f"{target}x needs the rest at {allowed * 1e3:.0f} ms ({allowed / rest:.0%} of today's) with the "
                 "arithmetic parts as they are" if allowed > 0 else
                 f"{target}x is out of reach: at today's rates the arithmetic parts alone exceed the step it asks "
                 f"for by {-allowed * 1e3:.0f} ms")
        lines.append(f"this tree at {ratio_now:.2f}x the older one: at most {ratio_now * most:.2f}x it; {reach}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny32")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--ratio-now", type=float, help="this tree's step speed-up over an older tree's (compare_core.py)")
    p.add_argument("--target", type=float, default=1.3)
    args = p.parse_args(argv)
    setup_threads(args.threads)
    reuse_heap_by_default(torch.device("cpu"))
    started = time.perf_counter()
    budget = measure(args.preset, args.batch, args.repeats, args.profile_steps)
    print(markdown(budget, args.ratio_now, args.target))
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
