"""benchmarks/step_budget.py: its split of a real training step's profile and its FLOP counts."""

from __future__ import annotations

import pytest

from benchmarks import step_budget
from benchmarks.flops import training_flops_per_image


def test_budget_covers_the_profile_and_counts_the_flops_of_the_whole_step():
    batch = 2
    budget = step_budget.measure("tiny32", batch, repeats=1, profile_steps=1)

    assert set(budget.part_s) == {*step_budget.ARITHMETIC, step_budget.GROUP_NORM, step_budget.REST}
    assert all(seconds >= 0 for seconds in budget.part_s.values())
    for part in step_budget.ARITHMETIC:  # tiny32 has every kind of arithmetic, attention at 16 px
        assert budget.part_s[part] > 0 and budget.part_flops[part] > 0, part
    assert 0 < budget.arithmetic_s < budget.step_s

    # The same step counted on the meta device, where attention runs as its math formulation: two bmm
    # forward and four backward. The CPU flash kernel recomputes the scores too, so 7/6 of those bmm.
    meta = training_flops_per_image("tiny32") * batch
    attention_bmm = budget.part_flops[step_budget.ATTENTION] * 6 / 7
    assert sum(budget.part_flops.values()) - budget.part_flops[step_budget.ATTENTION] + attention_bmm \
        == pytest.approx(meta, rel=1e-9)

    text = step_budget.markdown(budget, ratio_now=1.1, target=1.3)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "ms / step" not in line]
    assert [row.split(" | ")[0][2:] for row in rows] == list(budget.part_s)
    shares = [float(row.split(" | ")[2].rstrip("%")) for row in rows]
    assert sum(shares) == pytest.approx(100, abs=0.5)
    most = budget.step_s / budget.arithmetic_s
    assert f"would be {most:.2f}x this tree's" in text
    reachable = 1.1 * most > 1.3
    assert f"at most {1.1 * most:.2f}x it; 1.3x {'needs the rest' if reachable else 'is out of reach'}" in text
