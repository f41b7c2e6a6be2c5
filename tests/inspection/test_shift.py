"""Distribution shift: an injected shift is found in its layer and nowhere else."""

from __future__ import annotations

import warnings

import pytest
from inspection_models import Branches, branch_data

from model_forensics.inspection import ModelInspector


def test_a_shift_injected_into_one_branch_is_detected_there_and_not_elsewhere():
    model = Branches(head_ignores=(2,))
    insp = ModelInspector(model)
    res = insp.run(branch_data(300, seed=1, shift={2: 1.0}), reference=branch_data(300, seed=2), experiments=["shift"])
    assert res.shift is not None
    assert res.shift.shifted_layers == ["branches.2"]
    shifted = res.shift.layer("branches.2")
    assert shifted.fraction_shifted > 0.5 and shifted.mmd_p is not None and shifted.mmd_p < 0.01
    for site in ("branches.0", "branches.1", "head"):
        assert res.shift.layer(site).fraction_shifted <= 0.2


def test_no_shift_means_no_shifted_layer():
    res = ModelInspector(Branches()).run(
        branch_data(200, seed=3), reference=branch_data(200, seed=4), experiments=["shift"]
    )
    assert res.shift is not None and res.shift.shifted_layers == []


def test_too_few_reference_samples_warn_and_skip_the_test_instead_of_crashing():
    with pytest.warns(UserWarning, match="needs ≥ 20 inputs per side"):
        res = ModelInspector(Branches()).run(
            branch_data(100, seed=5), reference=branch_data(6, seed=6), experiments=["shift"]
        )
    assert res.shift is not None
    layer = res.shift.layer("branches.0")
    assert "per-unit KS/Wasserstein" in layer.skipped and "MMD" in layer.skipped
    assert not layer.shifted


def test_shift_without_reference_is_skipped_with_a_reason():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = ModelInspector(Branches()).run(branch_data(30, seed=7), experiments=["shift", "stats"])
    assert res.shift is None and "reference" in res.skipped["shift"]
    assert any("shift skipped" in str(w.message) for w in caught)
    assert res.stats is not None
