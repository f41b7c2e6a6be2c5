"""Pruning: planted dormant neurons are recommended, and harmful sets are never reported."""

from __future__ import annotations

import numpy as np
from inspection_models import CharTokenizer, sentences, tiny_gpt2

from model_forensics.inspection import ModelInspector
from model_forensics.inspection.pruning import PruningSettings, propose, verify


def test_planted_dormant_neurons_are_recommended_and_verified_on_held_out_inputs():
    planted = (5, 40, 90)
    res = ModelInspector(tiny_gpt2(dormant=planted), CharTokenizer()).run(sentences(40, 4), experiments=["pruning"])
    pr = res.pruning
    assert pr is not None and pr.heldout_inputs == 8
    assert {f"blocks.0.mlp.post[{u}]" for u in planted} <= set(pr.units)
    assert pr.combined_kl is not None and pr.combined_kl <= pr.settings.max_kl


def test_only_sets_that_pass_verification_are_reported():
    candidates = propose(
        {"a": np.array([0.0, 0.01, 1.0, 1.2]), "b": np.array([0.05, 2.0, 2.0, 2.0])},
        {},
        PruningSettings(max_fraction=0.5),
    )
    assert candidates == {"a": [0, 1], "b": [0]}

    def evaluate(ablations: dict[str, list[int]]) -> tuple[float, float]:
        harmful = 1 in ablations.get("a", []) or "b" in ablations
        return (0.5, 0.5) if harmful else (0.0, 1.0)

    result = verify(candidates, evaluate, PruningSettings(), heldout=8)
    assert [(r.site, r.units) for r in result.verified] == [("a", [0])]
    assert result.units == ["a[0]"] and result.combined_kl == 0.0
