"""Sparsity: exact zeros, near-zeros and dormant units with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from inspection_models import CharTokenizer, sentences, tiny_gpt2

from model_forensics.inspection import ModelInspector
from model_forensics.inspection.collect import Recorded
from model_forensics.inspection.sparsity import SparsityCollector


def _recorded(x: torch.Tensor) -> Recorded:
    b, t, _ = x.shape
    mask = torch.ones((b, t), dtype=torch.bool)
    return Recorded({"s": x}, {"s": mask}, torch.zeros((b, 2)), np.arange(b))


def test_counts_match_a_hand_made_layer():
    x = torch.ones((2, 5, 4))
    x[..., 0] = 0.0  # a dead unit: exact zeros
    x[..., 1] = 1e-5  # near-zero, and dormant relative to the others
    x[0, 0, 2] = 0.0
    acc = SparsityCollector(["s"], epsilon=1e-3, tau=0.025)
    acc.update(_recorded(x))
    layer = acc.result().layer("s")
    assert layer.zero_fraction == pytest.approx(11 / 40)
    assert layer.near_zero_fraction == pytest.approx(21 / 40)
    assert layer.dormant_units == [0, 1]


def test_dormant_neurons_planted_in_a_gpt2_are_found():
    planted = (3, 17, 64, 100)
    model = tiny_gpt2(dormant=planted)
    res = ModelInspector(model, CharTokenizer()).run(sentences(24, 1), experiments=["sparsity"])
    assert res.sparsity is not None
    assert res.sparsity.layer("blocks.0.mlp.post").dormant_units == list(planted)
    assert {f"blocks.0.mlp.post[{u}]" for u in planted} <= set(res.sparsity.dormant)
    assert res.sparsity.layer("blocks.0.mlp.post").unit_zero_fraction[list(planted)].tolist() == [1.0] * 4


def test_dormant_units_of_the_zoo_injection_model_are_found():
    zoo = pytest.importorskip("model_forensics.models.zoo")
    if "gpt2-injection" not in getattr(zoo, "names", lambda: [])():
        pytest.skip("the zoo model gpt2-injection is not built yet")
    from model_forensics.models import load

    loaded = load("zoo:gpt2-injection")
    truth = set(zoo.entry("gpt2-injection").ground_truth["extra"]["dormant_units"])
    prompts = ["translate: hello world", "summarize: the cat sat on the mat", "hello there", "what is the time"] * 4
    res = ModelInspector(loaded.model, loaded.tokenizer).run(prompts, experiments=["sparsity"])
    assert res.sparsity is not None and truth <= set(res.sparsity.dormant)
