"""The replay environment counts every forward call made inside it, once, with its rows."""

from __future__ import annotations

import pytest
import torch

from model_forensics import Intervention, SandboxReplayer


def _heads(session) -> list[list[Intervention]]:
    a = session.adapter
    return [
        [Intervention(f"blocks.{layer}.attn.head.{h}", "zero")] for layer in range(a.n_layers) for h in range(a.n_heads)
    ]


def test_every_forward_call_inside_the_environment_is_counted_with_its_rows(sessions):
    s = sessions["forward"]
    passes, rows = s.counter.passes, s.counter.rows
    with s.environment():
        s.model(**s.inputs.expand(3))
    assert (s.counter.passes - passes, s.counter.rows - rows) == (1, 3)
    assert s.forward_passes == s.counter.passes


def test_calls_outside_the_environment_are_not_counted(sessions):
    s = sessions["forward"]
    before = s.forward_passes
    with torch.no_grad():
        s.model(**s.inputs)
    assert s.forward_passes == before


def test_nested_environments_count_a_call_once(sessions):
    s = sessions["forward"]
    before = s.forward_passes
    with s.environment(), s.environment():
        s.model(**s.inputs)
    assert s.forward_passes - before == 1


def test_the_environment_leaves_no_hook_behind_even_on_errors(sessions):
    s = sessions["forward"]
    with pytest.raises(ValueError), s.environment():
        raise ValueError("inside")
    assert not s.model._forward_pre_hooks and not s.model._forward_hooks


def test_each_generation_step_is_a_pass(sessions):
    s = sessions["generate"]
    before = s.forward_passes
    r = s.run()
    assert s.forward_passes - before == r.forward_passes == s.generation["max_new_tokens"]


def test_a_prefix_shared_tail_counts_as_one_pass(bundles, lms):
    s = SandboxReplayer().load_bundle(bundles["forward"], model=lms["llama"])
    first = s.sweep(_heads(s))
    assert first.shared_prefix
    # the clean prefix capture, one two-row tail that checks it, then one pass per batch
    assert first.forward_passes == 2 + first.batches
    again = s.sweep(_heads(s))  # the prefix of this input is kept, and checked once per session
    assert again.forward_passes == again.batches == first.batches
    assert all(torch.equal(a.logits, b.logits) for a, b in zip(first, again, strict=True))


def test_forward_passes_cannot_be_added_to_by_hand(sessions):
    s = sessions["forward"]
    with s.environment():
        s.model(**s.inputs)
    counted = s.forward_passes
    with pytest.raises(AttributeError):
        s.forward_passes += 1  # the pass above is counted already; the counter is read-only
    assert s.forward_passes == counted
