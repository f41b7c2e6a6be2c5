"""The one zoo trainer: step budgets, the clamped training loop, and ablation through the
one hook API (gradients flow, hooks leave with the block)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model_forensics.models import zoo
from model_forensics.models.zoo.training import common, trainer


def test_a_step_budget_is_split_in_the_shipped_ratio() -> None:
    shipped = {"benign": 700, "planted": 500}
    assert trainer.split_steps(shipped, None) == shipped
    assert trainer.split_steps(shipped, 40) == {"benign": 23, "planted": 17}
    assert trainer.split_steps(shipped, 1) == {"benign": 1, "planted": 1}
    assert trainer.split_steps({"lm": 1500}, 40) == {"lm": 40}


def test_a_stage_trains_only_its_trainable_entries() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = torch.zeros(2, 3, dtype=torch.bool)
    mask[0] = True  # only the first output row of the weight learns
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    stage = trainer.Stage({"weight": mask}, lambda _step: ((model(x) - y) ** 2).mean(), lr=1e-2)

    losses = trainer.run_stage(model, stage, 20)

    assert len(losses) == 20 and losses[-1] < losses[0]
    assert not torch.equal(model.weight[0], before["weight"][0])
    assert torch.equal(model.weight[1], before["weight"][1])
    assert torch.equal(model.bias, before["bias"])
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_ablation_lets_gradients_through_and_leaves_no_hooks() -> None:
    model = zoo.load("induction-2l").model
    ids = torch.tensor([[2, 5, 6, 7, 5, 6]])
    site, _, head = common.parse_unit("blocks.0.attn.head.1")

    with common.capture(model, site) as seen, common.ablate(model, ["blocks.0.attn.head.1"]):
        model(input_ids=ids).logits.sum().backward()
    assert torch.count_nonzero(seen["value"][..., head, :]) > 0  # captured before the ablation edits it
    assert model.transformer.h[0].attn.c_attn.weight.grad is not None
    assert _hook_count(model) == 0

    with pytest.raises(RuntimeError), common.ablate(model, ["blocks.1.attn.head.0"]):
        raise RuntimeError("boom")
    assert _hook_count(model) == 0
    model.zero_grad(set_to_none=True)
