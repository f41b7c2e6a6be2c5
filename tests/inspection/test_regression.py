"""Cross-model regression: CKA identities, Procrustes, regressions, tokenizer checks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from inspection_models import Branches, CharTokenizer, branch_data, sentences, tiny_gpt2

from model_forensics import ForensicsError
from model_forensics.inspection import ModelInspector, Sample


def test_cka_of_a_model_with_itself_is_one_on_the_diagonal():
    model = Branches()
    res = ModelInspector(model).run(branch_data(80, seed=1), compare_model=model, experiments=["regression"])
    reg = res.regression
    assert reg is not None
    np.testing.assert_allclose(reg.diagonal(), 1.0, atol=1e-9)
    assert all(d == pytest.approx(0.0, abs=1e-9) for _, _, d in reg.procrustes)
    assert reg.agreement == 1.0 and reg.mean_kl == pytest.approx(0.0, abs=1e-12)


def test_cka_is_invariant_to_rotating_and_scaling_a_candidates_layers():
    base = Branches()
    cand = copy.deepcopy(base)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():
        for branch in cand.branches:  # branch output h → 2.5 · Q h
            branch.weight.copy_(2.5 * q @ branch.weight)
            branch.bias.copy_(2.5 * q @ branch.bias)
    res = ModelInspector(base).run(branch_data(80, seed=2), compare_model=cand, experiments=["regression"])
    reg = res.regression
    assert reg is not None
    np.testing.assert_allclose(reg.diagonal()[:3], 1.0, atol=1e-9)
    assert all(d == pytest.approx(0.0, abs=1e-9) for _, _, d in reg.procrustes[:3])
    assert reg.cka[0, 1] < 0.5  # different branches stay unrelated


def test_inputs_the_candidate_gets_wrong_are_flagged_as_regressions():
    base = Branches()
    x = branch_data(60, seed=4)
    with torch.no_grad():
        labels = base(x).argmax(-1)
    cand = copy.deepcopy(base)
    with torch.no_grad():
        cand.head.bias[1] += 0.5  # pushes some inputs from class 0 to class 1
        flipped = (cand(x).argmax(-1) != labels).nonzero().flatten().tolist()
    assert flipped
    samples = [Sample(tensor=row, label=int(y)) for row, y in zip(x, labels, strict=True)]
    reg = ModelInspector(base).run(samples, compare_model=cand, experiments=["regression"]).regression
    assert reg is not None
    assert reg.baseline_accuracy == 1.0
    assert sorted(r.index for r in reg.regressions) == flipped
    assert reg.improvements == [] and reg.agreement == pytest.approx(1 - len(flipped) / 60)


def test_mismatched_tokenizers_are_an_error_that_says_how_to_align():
    model = tiny_gpt2()
    with pytest.raises(ForensicsError, match="tokenize the data differently.*share a tokenizer"):
        ModelInspector(model, CharTokenizer()).run(
            sentences(8, 0),
            compare_model=model,
            compare_tokenizer=CharTokenizer(fold_case=True, vocab=40),
            experiments=["regression"],
        )
