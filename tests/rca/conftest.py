"""RCA fixtures: seeded random prompts and argmax incidents recorded from them on a tiny model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch


def _prompts(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50, (1, 8), generator=g) for _ in range(n)]


def _record(loaded, ids: torch.Tensor, path: Path, benign: list[torch.Tensor]) -> Path:
    from model_forensics import RecorderHooks, token_is

    with torch.no_grad():
        pred = int(loaded.model(input_ids=ids).logits[0, -1].argmax())
    with RecorderHooks().install_hooks(loaded.model) as rec, torch.no_grad():
        loaded.model(input_ids=ids)
        rec.create_bundle(
            path, predicate=token_is(pred), extras={"benign": [{"input_ids": b.tolist()} for b in benign]}
        )
    return path


@pytest.fixture(scope="session")
def prompts() -> Callable[..., list[torch.Tensor]]:
    """``prompts(n, seed)``: ``n`` seeded random prompts of 8 ids below 50, each (1, 8)."""
    return _prompts


@pytest.fixture(scope="session")
def record_incident() -> Callable[..., Path]:
    """``record_incident(loaded, ids, path, benign)``: records ``ids`` as an incident that
    fails by its own next-token argmax, with ``benign`` (prompts) as its benign set."""
    return _record
