"""Failure attribution: the layer that carries the failure cause is found and the
ablation cross-check confirms it; random labels are not confirmed."""

from __future__ import annotations

import numpy as np
import torch
from inspection_models import Branches, branch_data

from model_forensics.inspection import InspectorSettings, ModelInspector, Sample
from model_forensics.inspection.attribution import AttributionSettings


def _settings() -> InspectorSettings:
    return InspectorSettings(attribution=AttributionSettings(top_units=2))


def test_the_branch_that_reads_the_failure_feature_separates_and_is_confirmed_by_ablation():
    x = branch_data(160, seed=1)
    failing = np.arange(160) % 2 == 1
    x[failing, 8 + 3] += 3.0  # failing inputs carry a feature that only branch 1 reads
    samples = [Sample(tensor=row, passed=not bool(f)) for row, f in zip(x, failing, strict=True)]
    model = Branches()
    with torch.no_grad():  # …and, in branch 1, only units 2 and 5 read it
        model.branches[1].weight[:, 3] = 0.0
        model.branches[1].weight[[2, 5], 3] = 2.0
    res = ModelInspector(model, settings=_settings()).run(samples, experiments=["attribution"])
    att = res.attribution
    assert att is not None and (att.passing, att.failing) == (80, 80)
    aurocs = {la.site: la.auroc for la in att.layers}
    assert aurocs["branches.1"] > 0.95 and aurocs["branches.0"] < 0.7 and aurocs["branches.2"] < 0.7
    assert att.ablation is not None and att.ablation.site == "branches.1" and att.ablation.confirmed
    assert sorted(att.ablation.units) == [2, 5]
    assert att.ablation.gap_closed_top > 0.8 and abs(att.ablation.gap_closed_random) < 0.3


def test_random_labels_are_not_confirmed():
    x = branch_data(120, seed=2)
    labels = np.random.default_rng(0).random(120) < 0.5
    samples = [Sample(tensor=row, passed=bool(p)) for row, p in zip(x, labels, strict=True)]
    att = ModelInspector(Branches(), settings=_settings()).run(samples, experiments=["attribution"]).attribution
    assert att is not None and att.ablation is not None and not att.ablation.confirmed
    assert max(la.auroc for la in att.layers) < 0.75


def test_too_few_labelled_inputs_are_skipped_with_a_reason():
    samples = [Sample(tensor=row, passed=i != 0) for i, row in enumerate(branch_data(30, seed=3))]
    att = ModelInspector(Branches()).run(samples, experiments=["attribution"]).attribution
    assert att is not None and att.layers == [] and "needs ≥ 5 passing and failing" in att.skipped["attribution"]
