"""The scaling model of docs/scaling.md: training and serving throughput on 1 to 64 H200 GPUs, projected from
the quantities benchmarks/scaling_inputs.py measures on this machine.

    python benchmarks/scaling_inputs.py --json inputs.json && python benchmarks/scaling_model.py inputs.json

Every assumption that is not measured here is a named constant below, so the tables can be redone with a
GPU's own numbers (benchmarks/device_check.py measures the achieved FLOP rate and images/s on one GPU).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

PEAK_BF16 = 790e12  # FLOP/s an H200 sustains on large bf16 matmuls (dense)
MFU = 0.40  # fraction of it a conv UNet with attention reaches in training (assumed; device_check measures it)
SERVE_MFU = 0.30  # the same for batched DDIM inference at batch 8-16 (smaller matmuls)
NVLINK_BUS = 350e9  # bytes/s of NCCL all-reduce bus bandwidth inside an 8-GPU NVLink node
NET_BUS = 40e9  # bytes/s per GPU between nodes (8 x 400 Gb/s InfiniBand NICs per node, one per GPU)
GPUS_PER_NODE = 8
BACKWARD_SHARE = 2 / 3  # of a step's compute; DDP overlaps the all-reduce of gradient buckets with it
OFFICIAL_BATCH = {"ffhq64": 128, "ffhq128": 128, "ffhq256": 64}  # global batches of the official recipes
WEAK_BATCH = {"ffhq64": 64, "ffhq128": 32, "ffhq256": 16}  # per-GPU batch when the global batch grows with N


@dataclass
class Preset:
    name: str
    train_flops: float  # per image, forward + backward
    decoder_flops: float  # per image, one UNet call
    encoder_flops: float
    allreduce_bytes: float  # fp32 gradients per step

    def step_seconds(self, gpus: int, local_batch: float) -> float:
        """One data-parallel step: compute, plus whatever of the ring all-reduce the backward cannot hide."""
        compute = local_batch * self.train_flops / (MFU * PEAK_BF16)
        if gpus == 1:
            return compute
        bus = NVLINK_BUS if gpus <= GPUS_PER_NODE else NET_BUS
        allreduce = 2 * (gpus - 1) / gpus * self.allreduce_bytes / bus
        return compute + max(0.0, allreduce - BACKWARD_SHARE * compute)

    def images_per_second(self, gpus: int, global_batch: float) -> float:
        return global_batch / self.step_seconds(gpus, global_batch / gpus)

    def request_seconds(self, steps: int) -> float:
        """GPU seconds of one /v1/reconstruct (encode, ``steps``-step inversion and decoding) in a full batch."""
        return (self.encoder_flops + 2 * steps * self.decoder_flops) / (SERVE_MFU * PEAK_BF16)


def training_table(presets: list[Preset], gpu_counts: tuple[int, ...]) -> list[str]:
    lines = ["| preset | global batch | " + " | ".join(f"{n} GPU" for n in gpu_counts) + " |",
             "|---|---|" + "---|" * len(gpu_counts)]
    for p in presets:
        official = [p.images_per_second(n, OFFICIAL_BATCH[p.name]) for n in gpu_counts]
        weak = [p.images_per_second(n, WEAK_BATCH[p.name] * n) for n in gpu_counts]
        lines.append(f"| {p.name} | {OFFICIAL_BATCH[p.name]} (official) | " + " | ".join(f"{v:,.0f}" for v in official) + " |")
        lines.append(f"| {p.name} | {WEAK_BATCH[p.name]} x GPUs | " + " | ".join(f"{v:,.0f}" for v in weak) + " |")
    return lines


def data_table(presets: list[Preset], decode: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| preset | img/s per GPU | CPU cores per GPU, 1024 px JPEG | from 256 px PNG | prepared parquet |",
             "|---|---|---|---|---|"]
    for p in presets:
        rate = p.images_per_second(1, WEAK_BATCH[p.name])
        size = p.name[4:]
        d = decode[size]
        lines.append(f"| {p.name} | {rate:,.0f} | {rate / d['jpeg1024']:.0f} | {rate / d['png256']:.1f} | "
                     f"{rate / d['prepared']:.1f} |")
    return lines


def serving_table(presets: list[Preset], steps: int, target_rps: float) -> list[str]:
    lines = [f"| preset | GPU ms per reconstruct ({steps}+{steps} steps) | req/s per GPU | GPUs for {target_rps:.0f} req/s |",
             "|---|---|---|---|"]
    for p in presets:
        seconds = p.request_seconds(steps)
        lines.append(f"| {p.name} | {1000 * seconds:.1f} | {1 / seconds:.1f} | {target_rps * seconds:.1f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    inputs = json.loads(Path(argv[0]).read_text())
    presets = [Preset(name, v["train_flops"], v["decoder_flops"], v["encoder_flops"], v["allreduce_bytes"])
               for name, v in inputs["presets"].items() if name in OFFICIAL_BATCH]
    decode = {str(k): v for k, v in inputs["decode"].items()}
    print("Training images/s (whole cluster):\n")
    print("\n".join(training_table(presets, (1, 2, 4, 8, 16, 32, 64))))
    print("\nRay Data CPU cores per GPU to keep up (one core each, pipelines.data's decode + resize):\n")
    print("\n".join(data_table(presets, decode)))
    print("\nServing (batched, one replica per GPU):\n")
    print("\n".join(serving_table(presets, 20, 100)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
