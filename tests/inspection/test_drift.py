"""Drift along an ordered series: the drifting layer and the order of the steps."""

from __future__ import annotations

import numpy as np
import torch
from inspection_models import Branches, branch_data

from model_forensics.inspection import ModelInspector, Sample
from model_forensics.inspection.drift import series_steps


def test_drift_curve_rises_only_in_the_layer_that_drifts():
    samples = []
    for t, delta in enumerate([0.0, 0.0, 0.6, 1.2]):
        for row in branch_data(120, seed=10 + t, shift={1: delta}):
            samples.append(Sample(tensor=row, time=t))
    res = ModelInspector(Branches(head_ignores=(1,), classes=8)).run(samples, experiments=["drift"])
    d = res.drift
    assert d is not None and d.steps == ["0", "1", "2", "3"] and d.baseline == "0"
    assert d.drifting_layers() == ["branches.1"]
    curve = d.curve("branches.1")
    assert curve[3] > curve[2] > curve[1] + 0.2
    assert max(d.curve("branches.0")) < 0.35


def test_series_steps_order_groups_by_time_and_window_fine_times():
    samples = [Sample(text="x", group=g, time=t) for g, t in [("late", 5), ("early", 1), ("late", 6), ("mid", 3)]]
    assert [name for name, _ in series_steps(samples) or []] == ["early", "mid", "late"]
    timed = [Sample(text="x", time=float(t)) for t in np.random.default_rng(0).permutation(100)]
    steps = series_steps(timed, windows=4) or []
    assert len(steps) == 4 and all(len(idx) == 25 for _, idx in steps)
    assert series_steps([Sample(tensor=torch.zeros(2))]) is None
