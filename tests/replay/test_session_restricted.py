"""Session.restricted: a session that sees part of its bundle's prompt sets, restored after."""

from __future__ import annotations

import pytest
import torch
from replay_models import BASELINES


def _ids(inputs: list) -> list[list[int]]:
    return [x["input_ids"][0].tolist() for x in inputs]


def test_restricted_swaps_prompt_sets_and_baselines_and_restores_them(sessions) -> None:
    s = sessions["gpt2"]
    extras, baselines, benign = s.extras, s.baselines, _ids(s.benign())
    assert len(s.variants()) == 2 and len(baselines) == 2
    with s.restricted({"variants": [], "baseline": BASELINES[1:]}):
        assert _ids(s.variants()) == _ids([s.inputs])  # the incident only
        assert _ids(s.benign()) == benign  # kinds not given stay the bundle's
        assert _ids(s.baselines) == _ids([s.encode(BASELINES[1])])
    assert s.extras == extras and s.baselines is baselines


def test_restricted_restores_on_an_exception(sessions) -> None:
    s = sessions["gpt2"]
    extras, baselines = s.extras, s.baselines
    with pytest.raises(RuntimeError), s.restricted({"benign": [], "baseline": []}):
        assert s.benign() == [] and s.baselines == []
        raise RuntimeError("boom")
    assert s.extras == extras and s.baselines is baselines
    assert torch.equal(s.baselines[0]["input_ids"], s.encode(BASELINES[0])["input_ids"])
