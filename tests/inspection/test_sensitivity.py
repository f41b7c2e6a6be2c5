"""Layer sensitivity: a layer that ignores its input is the least sensitive, and an
output that ignores the input does not move."""

from __future__ import annotations

import pytest
import torch
from inspection_models import CharTokenizer, sentences, tiny_gpt2
from torch import nn

from model_forensics.inspection import ModelInspector


class Frozen(nn.Module):
    """first = Linear(x); second = constant (zero weights); output = head(second)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.second = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)
        with torch.no_grad():
            self.second.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.second(self.first(x)))


def test_a_layer_that_ignores_its_input_ranks_last_and_the_output_does_not_move():
    x = torch.randn((16, 6), generator=torch.Generator().manual_seed(0))
    res = ModelInspector(Frozen()).run(x, experiments=["sensitivity"])
    sens = res.sensitivity
    assert sens is not None and [f.family for f in sens.families] == ["embedding_noise"]
    assert "token_substitution" in sens.skipped  # float inputs have no tokens
    assert sens.ranking()[0][0] == "first"
    noise = sens.families[0]
    assert noise.layer_change["second"] == 0.0 and noise.layer_change["head"] == 0.0
    assert noise.kl == pytest.approx(0.0, abs=1e-12)
    assert noise.layer_change["first"] > 0.1


def test_token_substitution_and_embedding_noise_move_a_gpt2():
    res = ModelInspector(tiny_gpt2(), CharTokenizer()).run(sentences(12, 2), experiments=["sensitivity"])
    sens = res.sensitivity
    assert sens is not None and {f.family for f in sens.families} == {"token_substitution", "embedding_noise"}
    for family in sens.families:
        assert family.kl > 0 and all(v > 0 for v in family.layer_change.values())
    assert [s for s, _ in sens.ranking()] == sorted(sens.sites, key=lambda s: -dict(sens.ranking())[s])
