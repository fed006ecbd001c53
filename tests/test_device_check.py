"""benchmarks/device_check.py --device cpu --quick: its tables, its JSON and its agreement numbers."""

from __future__ import annotations

import json
import math

from benchmarks import device_check


def test_quick_cpu_run_writes_tables_and_small_agreement(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert device_check.main(["--device", "cpu", "--quick", "--threads", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    for header in ("| op | variant | max abs error vs CPU fp32 |", "| preset | precision | batch | images/s |",
                   "| preset | dtype | batch | DDIM steps | images/s |"):
        assert header in table
    report = json.loads(out.read_text())
    assert report["skipped"] == []
    assert {(r["op"], r["variant"]) for r in report["agreement"]} == {
        (op, v) for op in ("encode", "invert", "decode") for v in ("fp32", "defaults", "bf16")}
    for row in report["agreement"]:
        assert math.isfinite(row["max_abs_error"]) and row["reference_max_abs"] > 0.01  # a non-trivial output
        # fp32 and channels_last only reorder the sums; bf16 keeps 8 mantissa bits; decoding multiplies eps
        # errors by up to sqrt(1/a_t - 1) ~ 14 (measured: 3e-7/2e-6/2e-4 channels_last, 4e-3/2e-3/6e-2 bf16)
        limits = {"encode": (1e-5, 0.02), "invert": (1e-4, 0.02), "decode": (1e-3, 0.2)}[row["op"]]
        limit = limits[1] if row["variant"] == "bf16" else limits[0]
        assert row["max_abs_error"] < limit, row
    assert {r["precision"] for r in report["training"]} == {"fp32", "bf16"}
    for row in report["training"]:
        assert row["batch"] == 4 and row["images_per_s"] > 0 and 0 < row["fraction_of_bound"] < 1
    assert {(r["dtype"], r["batch"]) for r in report["decoding"]} == {(d, b) for d in ("fp32", "bf16") for b in (1, 2)}
