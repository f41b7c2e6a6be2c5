"""Robustness: a case-folding model is perfectly invariant to the case family."""

from __future__ import annotations

import numpy as np
from inspection_models import CharTokenizer, sentences, tiny_gpt2

from model_forensics.inspection import ModelInspector
from model_forensics.inspection.robustness import FAMILIES, variants


def test_a_model_made_invariant_to_case_scores_one_on_the_case_family():
    res = ModelInspector(tiny_gpt2(), CharTokenizer(fold_case=True)).run(sentences(24, 3), experiments=["robustness"])
    rob = res.robustness
    assert rob is not None
    case = rob.family("case")
    assert case.rate == 1.0 and (case.low, case.high) == (1.0, 1.0) and case.variants > 0
    assert rob.overall is not None and rob.overall.low <= rob.overall.rate <= rob.overall.high
    assert {f.family for f in rob.families} == set(FAMILIES)


def test_a_case_sensitive_model_is_not_fully_case_invariant():
    rob = ModelInspector(tiny_gpt2(), CharTokenizer()).run(sentences(24, 3), experiments=["robustness"]).robustness
    assert rob is not None and rob.family("case").rate < 1.0


def test_variants_are_deterministic_and_differ_from_the_text():
    text = "The quick brown fox will start a new day"
    for family in FAMILIES:
        first = variants(text, family, 2, seed=0, index=5)
        assert first == variants(text, family, 2, seed=0, index=5)
        assert first and all(v != text for v in first)
    assert variants("abc", "synonyms", 2, 0, 0) == []  # nothing in the table: not counted
    assert np.all([v.lower() == text.lower() for v in variants(text, "case", 2, 0, 0)])
