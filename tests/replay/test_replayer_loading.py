"""Opening bundles: a weight mismatch is a warning of its own category."""

from __future__ import annotations

import pytest
import torch

from model_forensics import SandboxReplayer
from model_forensics.core.errors import WeightMismatchWarning
from model_forensics.models.loading import load


def test_an_allowed_weight_mismatch_warns_with_its_own_category(bundles, lm_dirs):
    other = load(str(lm_dirs["llama"]))
    with torch.no_grad():
        other.model.lm_head.weight.mul_(1.01)
    with pytest.warns(WeightMismatchWarning, match="WEIGHT MISMATCH"):
        session = SandboxReplayer().load_bundle(bundles["forward"], model=other, allow_weight_mismatch=True)
    assert session.weight_mismatch and issubclass(WeightMismatchWarning, UserWarning)
