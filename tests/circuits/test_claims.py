"""Claim evaluation on zoo:gpt2-injection: the planted head's claim holds, a control
head's does not, the bootstrap is seeded, and bad prompt sets are one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model_forensics.circuits import evaluate_claim, read_prompts
from model_forensics.core.errors import ForensicsError, SiteError


@pytest.fixture(scope="module")
def prompt_file(injection_scenario, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("claims") / "failing.jsonl"
    lines = [json.dumps({"prompt": p, "target": " HACKED"}) for p in injection_scenario.failing()[:8]]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_planted_head_carries_the_injection_and_a_control_head_does_not(injection, prompt_file) -> None:
    model, tok = injection.model, injection.tokenizer
    claim = evaluate_claim(model, tok, prompt_file, units=["blocks.0.attn.head.3"], kind="zero")
    control = evaluate_claim(model, tok, prompt_file, units=["blocks.0.attn.head.2"], kind="zero")
    assert claim.effects.shape == (8,) and claim.targets == [" HACKED"] * 8
    assert claim.ci[0] > 1.0  # log-probability of HACKED drops by more than a nat, CI included
    assert claim.ci[0] <= claim.mean_effect <= claim.ci[1]
    assert claim.fraction_changed >= 0.5
    assert abs(control.mean_effect) < 0.05 and control.fraction_changed == 0.0
    assert claim.forward_passes == 8  # one batch (clean + ablated) per prompt


def test_head_and_neurons_together_and_the_bootstrap_is_seeded(injection, injection_scenario) -> None:
    from model_forensics.models import zoo

    prompts = injection_scenario.failing()[:8]
    units = zoo.entry("gpt2-injection").ground_truth["units"]  # the head and the neurons that write HACKED
    a = evaluate_claim(injection.model, injection.tokenizer, prompts, units=units, kind="zero", seed=3)
    b = evaluate_claim(injection.model, injection.tokenizer, prompts, units=units, kind="zero", seed=3)
    c = evaluate_claim(injection.model, injection.tokenizer, prompts, units=units, kind="zero", seed=4)
    assert a.ci == b.ci and a.ci != c.ci
    assert np.array_equal(a.effects, c.effects)
    assert a.fraction_changed == 1.0  # the mechanism's units together remove HACKED everywhere
    data = a.to_json()
    assert data["per_prompt"][0]["prompt"] == prompts[0] and data["seed"] == 3


def test_mean_ablation_reads_the_mean_over_the_prompt_set(injection, injection_scenario) -> None:
    prompts = [b["prompt"] for b in injection_scenario.baseline[:3]] + injection_scenario.failing()[:3]
    ev = evaluate_claim(
        injection.model, injection.tokenizer, prompts, units=["blocks.0.attn.head.3"], kind="mean", target=" HACKED"
    )
    assert ev.effects.shape == (6,) and ev.kind == "mean"
    # The set's mean of the detector head carries half a trigger: written into the clean
    # prompts it raises HACKED (negative effect), into the triggered ones it lowers it.
    assert (ev.effects[:3] < 0).all() and (ev.effects[3:] > 0).all()


def test_resample_needs_prompts_of_one_length(injection) -> None:
    prompts = ["translate: moon glass sun door =>", "repeat: book hat =>"]
    with pytest.raises(ForensicsError, match="different lengths"):
        evaluate_claim(injection.model, injection.tokenizer, prompts, units=["blocks.0.attn.head.3"], kind="resample")
    same = ["translate: moon glass sun door =>", "repeat: book hat moon fire =>"]
    ev = evaluate_claim(injection.model, injection.tokenizer, same, units=["blocks.0.attn.head.3"], kind="resample")
    assert ev.effects.shape == (2,)


def test_bad_claims_are_one_clear_error(injection, tmp_path) -> None:
    model, tok = injection.model, injection.tokenizer
    with pytest.raises(SiteError, match="head 9 does not exist"):
        evaluate_claim(model, tok, ["repeat: book =>"], units=["blocks.1.attn.head.9"])
    with pytest.raises(ForensicsError, match="is 2 tokens"):
        evaluate_claim(model, tok, ["repeat: book =>"], units=["blocks.1.attn.head.1"], target="HACKED HACKED")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "repeat: book =>", "target": [1]}\n')
    with pytest.raises(ForensicsError, match="'target' must be a token string or id"):
        read_prompts(bad)
    with pytest.raises(ForensicsError, match="does not exist|cannot|no such"):
        read_prompts(tmp_path / "missing.jsonl")
