"""Prompt-set evaluation on a local Ray cluster equals the local run, per prompt."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from model_forensics.circuits import evaluate_claim
from model_forensics.core.errors import ForensicsError

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster(ray_cluster: Any) -> Any:
    """The session's local cluster (tests/conftest.py), two CPUs."""
    return ray_cluster


@pytest.mark.slow  # Ray workers import torch and transformers: ~20 s on a shared machine
@pytest.mark.parametrize("kind", ["mean", "zero"])
def test_claim_on_ray_equals_the_local_run(cluster: Any, injection, injection_scenario, kind: str) -> None:
    prompts = [b["prompt"] for b in injection_scenario.baseline[:3]] + injection_scenario.failing()[:5]
    args = (injection.model, injection.tokenizer, prompts)
    options: dict[str, Any] = {"units": ["blocks.0.attn.head.3"], "kind": kind, "target": " HACKED", "seed": 2}
    local = evaluate_claim(*args, **options)
    done: list[tuple[int, int]] = []
    remote = evaluate_claim(*args, **options, ray="local", progress=lambda i, n: done.append((i, n)))
    assert np.array_equal(remote.effects, local.effects)  # bit-identical, prompt by prompt
    assert np.array_equal(remote.changed, local.changed)
    assert remote.ci == local.ci and remote.targets == local.targets
    assert remote.forward_passes == local.forward_passes
    assert remote.to_json() == local.to_json()
    assert done[-1] == (8, 8)


def test_ray_with_a_replay_session_is_one_clear_error(injection) -> None:
    from model_forensics.replay.session import Session

    fake = Session.__new__(Session)  # the check comes before the session is used
    with pytest.raises(ForensicsError, match="without ray"):
        evaluate_claim(fake, None, ["a b c"], units=["blocks.0.attn.head.3"], ray="local")
