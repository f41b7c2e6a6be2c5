"""Attribution's gradient pass reads input-side sites however the module is called."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch
from torch import nn

from model_forensics.models.adapters import GenericAdapter, HookPoint
from model_forensics.rca.attribution import _grad_pass


class _Out(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(4, 3)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense(hidden_states)


class _KeywordModel(nn.Module):
    """Embeddings → an output projection that is called with ``hidden_states=``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.out = _Out()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.out(hidden_states=self.embed(input_ids))  # (B, T, 3)


def test_input_side_site_passed_by_keyword_gets_its_gradient() -> None:
    torch.manual_seed(0)
    model = _KeywordModel()
    adapter = GenericAdapter(model)
    adapter.points["blocks.0.attn.z"] = HookPoint("out", "input", heads=2)  # (B, T, 2 heads, 2)
    session = SimpleNamespace(model=model, adapter=adapter, environment=contextlib.nullcontext)
    ids = torch.tensor([[1, 2, 3]])

    grads, acts = _grad_pass(session, ids, ["blocks.0.attn.z"], lambda logits: logits[0, -1, 0])  # type: ignore[arg-type]

    assert torch.equal(acts["blocks.0.attn.z"], model.embed(ids)[0].detach().unflatten(-1, (2, 2)))
    expected = torch.zeros(3, 2, 2)
    expected[-1] = model.out.dense.weight[0].detach().unflatten(-1, (2, 2))  # ∂ logits[-1, 0] / ∂ input
    grad = grads["blocks.0.attn.z"]
    assert grad is not None and torch.allclose(grad, expected)
