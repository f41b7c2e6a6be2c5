"""Batched sweeps equal serial runs, in fewer forward passes."""

from __future__ import annotations

import pytest
import torch

from model_forensics import Intervention, SandboxReplayer


def head_sets(session) -> list[list[Intervention]]:
    a = session.adapter
    return [
        [Intervention(f"blocks.{layer}.attn.head.{h}", "zero")] for layer in range(a.n_layers) for h in range(a.n_heads)
    ]


def mixed_sets(session) -> list[list[Intervention]]:
    return [
        *head_sets(session),
        [],
        [Intervention("embed", "noise", value=0.5, seed=3)],
        [Intervention("blocks.1.mlp.post[3]@pos=-1", "scale", value=4.0), Intervention("blocks.0.attn.head.1", "zero")],
        [Intervention("blocks.1.resid_pre", "mean")],
        [Intervention("final", "scale", value=-1.0)],
        [Intervention("blocks.0.mlp", "steer", value=[0.5] * 32)],
    ]


def compare(session, sets, **kwargs) -> tuple[float, bool, object]:
    swept = session.sweep(sets, **kwargs)
    serial = [session.run(s) for s in sets]
    assert len(swept) == len(serial)
    diff = max(float((a.logits - b.logits).abs().max()) for a, b in zip(swept, serial, strict=True))
    identical = all(torch.equal(a.logits, b.logits) for a, b in zip(swept, serial, strict=True))
    for a, b in zip(swept, serial, strict=True):
        assert a.interventions == b.interventions
        assert (a.failed, a.flipped, a.text, a.prediction) == (b.failed, b.flipped, b.text, b.prediction)
    return diff, identical, swept


@pytest.mark.parametrize("name", ["forward", "gpt2"])
def test_forward_sweep_equals_serial_runs(sessions, name):
    s = sessions[name]
    diff, identical, swept = compare(s, mixed_sets(s))
    assert diff < 1e-5
    assert identical, f"max |Δ| {diff}"  # 16-token prompts: same CPU kernels alone and batched
    assert swept.shared_prefix
    assert swept.forward_passes < len(swept) / 2


def test_sweep_micro_batches_to_max_batch_size(bundles, lms):
    s = SandboxReplayer(max_batch_size=3).load_bundle(bundles["forward"], model=lms["llama"])
    sets = head_sets(s)
    swept = s.sweep(sets, share_prefix=False)
    assert swept.batches == 3 and swept.forward_passes == 3 and not swept.shared_prefix
    reference = s.sweep(sets)
    assert all(torch.equal(a.logits, b.logits) for a, b in zip(swept, reference, strict=True))


def test_generation_sweep_equals_serial_runs(sessions):
    s = sessions["generate"]
    sets = [*head_sets(s), [Intervention("embed", "scale", value=-3.0)], []]
    diff, _, swept = compare(s, sets)
    assert diff < 1e-5
    assert len({r.text for r in swept}) > 1  # some interventions change the continuation
    steps = s.generation["max_new_tokens"]
    assert swept.forward_passes == steps and swept.batches == 1


def test_a_verdicts_only_sweep_stops_once_every_verdict_is_settled(sessions):
    # The generate incident fails when its reply contains the clean reply's first two tokens'
    # text, which a reply that keeps them shows after two steps: a batch of such rows stops
    # there, with the full runs' verdicts and the start of their tokens.
    s = sessions["generate"]
    assert s.predicate is not None and s.predicate.settles
    steps = s.generation["max_new_tokens"]
    sets = [*head_sets(s), [Intervention("embed", "scale", value=-3.0)], []]
    full, quick = s.sweep(sets), s.sweep(sets, verdicts_only=True)
    assert [(r.failed, r.flipped) for r in quick] == [(r.failed, r.flipped) for r in full]
    assert len({r.failed for r in full}) == 2  # some rows fail, some do not: the batch runs on
    for a, b in zip(quick, full, strict=True):
        ids, whole = a.outputs["generated_ids"], b.outputs["generated_ids"]
        assert torch.equal(ids, whole[: len(ids)])
    failing = [r.interventions for r in full if r.failed]
    settled, unsettled = s.sweep(failing, verdicts_only=True), s.sweep(failing)
    assert all(r.failed for r in settled)
    assert settled.forward_passes < unsettled.forward_passes == steps
    assert all(len(r.text) < len(u.text) for r, u in zip(settled, unsettled, strict=True) if u.text != r.text)


def test_classifier_sweep_equals_serial_runs(sessions):
    s = sessions["bert"]
    diff, _, swept = compare(s, [*head_sets(s), [Intervention("blocks.0.resid_post", "scale", value=-1.0)]])
    assert diff < 1e-5
    assert swept.batches == 1 and not swept.shared_prefix


def test_sweep_result_serialises(sessions):
    s = sessions["forward"]
    swept = s.sweep(head_sets(s)[:3])
    data = swept.to_json()
    assert len(data["results"]) == 3 and data["forward_passes"] == swept.forward_passes
    assert 0.0 <= swept.flip_rate <= 1.0


def test_sweep_on_other_inputs_with_relative_positions(sessions):
    s = sessions["forward"]
    other = " ".join(f"w{i}" for i in range(4, 17))  # 13 tokens: positions count from its own end
    sets = [
        [Intervention("blocks.1.mlp.post@pos=-1", "scale", value=-5.0)],
        [Intervention("blocks.0.attn.head.2@pos=-2", "zero")],
        [Intervention("final@pos=-1", "scale", value=-1.0)],
        [],
    ]
    swept = s.sweep(sets, inputs=other)
    assert swept.shared_prefix
    for a, b in zip(swept, [s.run(x, inputs=other) for x in sets], strict=True):
        assert torch.equal(a.logits, b.logits)
        assert (a.failed, a.flipped) == (b.failed, b.flipped)


def test_sweep_micro_batches_to_the_memory_budget(bundles, lms):
    from model_forensics.replay.sweep import rows_per_batch

    s = SandboxReplayer(memory_budget_mb=0.2).load_bundle(bundles["forward"], model=lms["llama"])
    per_batch = rows_per_batch(s, s.inputs)
    assert 1 <= per_batch < 8
    swept = s.sweep(head_sets(s), share_prefix=False)
    assert swept.batches == -(-8 // per_batch)


def test_batch_sizes_shrink_with_the_budget_and_tails_fit_more_rows(bundles, lms):
    from model_forensics.replay.sweep import rows_per_batch

    sizes = []
    for budget in (0.1, 0.4, 1.6):
        s = SandboxReplayer(memory_budget_mb=budget, max_batch_size=1000).load_bundle(
            bundles["forward"], model=lms["llama"]
        )
        full, tail = rows_per_batch(s, s.inputs), rows_per_batch(s, s.inputs, last_position=True)
        assert tail >= full  # a prefix-shared tail scores the last position only
        sizes.append(full)
        swept = s.sweep(head_sets(s), share_prefix=False)
        assert swept.batches == -(-len(head_sets(s)) // full)
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


def test_a_generation_sweep_shares_its_prompt_pass_bit_for_bit(sessions):
    # Rows that change only the last block compute the same blocks before it on the prompt:
    # the prompt pass runs those on one row and hands its output and cache to every row.
    # Every step's scores and every token equal those of the unshared batch.
    from model_forensics.models.hooks import hooks

    s = sessions["generate"]
    a = s.adapter
    last = a.n_layers - 1
    sets = [[Intervention(f"blocks.{last}.attn.head.{h}", "zero")] for h in range(a.n_heads)]
    sets += [[Intervention(f"blocks.{last}.mlp", "scale", value=-2.0)], []]
    rows: list[int] = []

    def spy(module, args, kwargs, output):  # runs before the sharing hook expands the output
        hidden = output[0] if isinstance(output, tuple) else output
        rows.append(int(hidden.shape[0]))

    block0 = a.points["blocks.0.resid_pre"].module
    with hooks(a, after={block0: spy}):
        shared = s.sweep(sets)
        first_shared, rows[:] = rows[0], []
        unshared = s.sweep(sets, share_prefix=False)
    assert first_shared == 1 and rows[0] == len(sets)  # the prompt pass of block 0: one row, or all
    assert all(r == len(sets) for r in rows[1:])  # decoding steps run every row
    assert len({r.text for r in shared}) > 1  # the rows differ where they intervene
    for x, y in zip(shared, unshared, strict=True):
        assert torch.equal(x.outputs["generated_ids"], y.outputs["generated_ids"])
        assert all(torch.equal(p, q) for p, q in zip(x.outputs["logits"], y.outputs["logits"], strict=True))
        assert (x.text, x.failed, x.flipped) == (y.text, y.failed, y.flipped)


def test_sweep_each_batches_prompts_of_one_length_where_padding_would_change_the_run(bundles, lms):
    # A generation of max_length tokens in all would count left padding, so prompts of
    # different lengths may not share a batch: three 16-token prompts and a 13-token one, two
    # sets each; the 16-token prompts share one generation of six rows, the other runs alone;
    # every result equals its own sweep.
    from replay_models import BASELINES, PROMPT

    from model_forensics.replay.sweep import mixed_lengths

    s = SandboxReplayer().load_bundle(bundles["generate"], model=lms["llama"])
    s.generation = {k: v for k, v in s.generation.items() if k != "max_new_tokens"} | {"max_length": 22}
    assert not mixed_lengths(s)
    prompts = [PROMPT, BASELINES[0], " ".join(f"w{i}" for i in range(4, 17)), BASELINES[1]]
    sets = [[], [Intervention("blocks.1.attn.head.2", "zero"), Intervention("blocks.0.mlp", "scale", value=3.0)]]
    before = s.forward_passes
    together = dict(s.sweep_each(prompts, sets))
    passes = s.forward_passes - before
    assert sorted(together) == [0, 1, 2, 3]
    before = s.forward_passes
    alone = [s.sweep(sets, inputs=p, share_prefix=False) for p in prompts]
    assert passes < s.forward_passes - before  # 2 generations instead of 4
    assert together[0].batches == 1 and together[0].forward_passes == together[1].forward_passes
    assert together[2].forward_passes + together[0].forward_passes == passes  # the 13-token prompt alone
    for i, swept in enumerate(alone):
        for x, y in zip(together[i], swept, strict=True):
            assert (x.text, x.failed, x.flipped) == (y.text, y.failed, y.flipped)
            assert torch.equal(x.outputs["generated_ids"], y.outputs["generated_ids"])
            assert float((x.outputs["logits"] - y.outputs["logits"]).abs().max()) < 1e-5


def test_sweep_each_per_prompt_sets_batches_the_sweeps_and_keeps_each_prompts_sets(bundles, lms):
    # Per-prompt sets: three 16-token prompts with one, two and four sets share a generation
    # of seven rows; a prompt with no sets runs nothing. Each result holds its own prompt's
    # sets, as its own sweep gives them.
    from replay_models import BASELINES, PROMPT

    s = SandboxReplayer().load_bundle(bundles["generate"], model=lms["llama"])  # no clean run held yet
    head = Intervention("blocks.1.attn.head.2", "zero")
    mlp = Intervention("blocks.0.mlp", "scale", value=3.0)
    prompts = [PROMPT, BASELINES[0], BASELINES[1], " ".join(f"w{i}" for i in range(4, 17))]
    own = [
        [[head]],
        [[], [head, mlp]],
        [[]] + [[Intervention(f"blocks.1.attn.head.{h}", "zero")] for h in range(3)],
        [],
    ]
    assert [len(s.encode(p)["input_ids"][0]) for p in prompts[:3]] == [16, 16, 16]  # and a 13-token one
    before = s.forward_passes
    got = dict(s.sweep_each(prompts, own, per_prompt=True))
    passes = s.forward_passes - before
    assert sorted(got) == [0, 1, 2, 3] and [len(got[i]) for i in range(4)] == [1, 2, 4, 0]
    assert got[0].batches == got[1].batches == got[2].batches == 1
    assert got[0].forward_passes == got[1].forward_passes == got[2].forward_passes
    assert passes == 2 * got[0].forward_passes  # and prompt 0's clean run (it has no clean set), for its flips
    assert got[3].forward_passes == 0 and got[3].batches == 0
    before = s.forward_passes
    alone = {i: s.sweep(own[i], inputs=prompts[i]) for i in range(3)}
    assert passes < s.forward_passes - before  # 1 generation instead of 3
    for i, swept in alone.items():
        for x, y in zip(got[i], swept, strict=True):
            assert x.interventions == y.interventions
            assert (x.text, x.failed, x.flipped) == (y.text, y.failed, y.flipped)
            assert torch.equal(x.outputs["generated_ids"], y.outputs["generated_ids"])
            assert float((x.outputs["logits"] - y.outputs["logits"]).abs().max()) < 1e-5
    with pytest.raises(ValueError, match="one list of sets per prompt"):
        list(s.sweep_each(prompts, own[:2], per_prompt=True))


def test_sweep_each_left_pads_prompts_of_different_lengths_and_each_row_keeps_its_own_positions(sessions):
    # Prompts of 16, 13 and 9 tokens share one left-padded generation. Every row's
    # interventions land on its own positions: a position counted from the prompt's end, a
    # seeded noise (keyed by position), a gate reading the prompt's largest projection and one
    # deciding per position. Each result equals its prompt's own sweep (same tokens, scores to
    # float tolerance, same gate decisions); a pad-blind placement moves the last-position edit.
    from replay_models import PROMPT

    from model_forensics.replay.interventions import Gate
    from model_forensics.replay.sweep import mixed_lengths

    s = sessions["generate"]
    assert mixed_lengths(s)
    d = s.adapter.d_model
    u = torch.randn(d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    direction = tuple((u / u.norm()).tolist())
    prompts = [PROMPT, " ".join(f"w{i}" for i in range(4, 17)), " ".join(f"w{i}" for i in range(30, 39))]
    assert [s.encode(p).length for p in prompts] == [16, 13, 9]
    sets = [
        [],
        [Intervention("blocks.1.resid_pre@pos=-1", "scale", value=-3.0)],
        [
            Intervention("blocks.0.mlp", "noise", value=2.0, seed=7),
            Intervention("blocks.1.mlp", "scale", value=0.0, gate=Gate("blocks.1.resid_pre", direction, 0.0, "max")),
            Intervention("blocks.1.attn", "scale", value=2.0, gate=Gate("blocks.0.resid_post", direction, 0.0, "each")),
        ],
    ]
    before = s.forward_passes
    together = dict(s.sweep_each(prompts, sets))
    passes = s.forward_passes - before
    assert {r.batches for r in together.values()} == {1}  # one generation of nine rows
    assert passes == together[0].forward_passes == together[2].forward_passes
    for i, prompt in enumerate(prompts):
        alone = s.sweep(sets, inputs=prompt, share_prefix=False)
        for x, y in zip(together[i], alone, strict=True):
            assert (x.text, x.failed, x.flipped, x.gates) == (y.text, y.failed, y.flipped, y.gates)
            assert torch.equal(x.outputs["generated_ids"], y.outputs["generated_ids"])
            assert float((x.outputs["logits"] - y.outputs["logits"]).abs().max()) < 1e-4
        assert float((together[i][1].logits - together[i][0].logits).abs().max()) > 1e-3  # the edit matters
