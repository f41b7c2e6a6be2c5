"""Ablating and perturbing a site goes through the one hook mechanism (models.hooks)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model_forensics.inspection.collect import patched
from model_forensics.models.adapters import GenericAdapter, HookPoint


class Inner(nn.Module):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return 2 * hidden_states


class ByKeyword(nn.Module):
    """Calls its submodule with ``hidden_states=`` as Hugging Face layers often do."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Inner()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(hidden_states=x)


class InputSide(GenericAdapter):
    """The generic adapter plus an input-side site ``inner.in``."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.points["inner.in"] = HookPoint("inner", "input")


def test_an_input_side_site_passed_as_hidden_states_is_patched():
    model = ByKeyword()
    x = torch.ones(2, 3)
    with patched(InputSide(model), "inner.in", lambda t, batch: t + 1):
        out = model(x)
    assert torch.equal(out, torch.full((2, 3), 4.0))
    assert torch.equal(model(x), 2 * x)


def test_an_output_site_is_patched_and_the_hook_removed_even_on_errors():
    model = ByKeyword()
    with pytest.raises(RuntimeError), patched(InputSide(model), "inner", lambda t, batch: torch.zeros_like(t)):
        assert torch.equal(model(torch.ones(1, 2)), torch.zeros(1, 2))
        raise RuntimeError("boom")
    assert not model.inner._forward_hooks and not model.inner._forward_pre_hooks
