"""A batched generation's prompt pass shares the blocks before each row's first change.

Rows join the prompt pass at the first block they change (a gate's site counts), beside one
clean row whose output and cache the later rows copy. Every token and every step's scores
equal the unshared batch, bit for bit, on a 4-block Llama (cache passed by keyword) and a
4-block GPT-2 (cache passed positionally).
"""

from __future__ import annotations

import random

import pytest
import torch
from replay_models import record, save_tokenizer, tiny_gpt2, tiny_llama

from model_forensics import Intervention, SandboxReplayer
from model_forensics.models.hooks import hooks
from model_forensics.replay.interventions import Gate

LAYERS = 4


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    from model_forensics.models.loading import load

    torch.manual_seed(1)
    models = {"llama": tiny_llama(LAYERS), "gpt2": tiny_gpt2(LAYERS)}
    root = tmp_path_factory.mktemp("shared-prompt")
    out = {}
    for name, model in models.items():
        model.eval().save_pretrained(root / name)
        save_tokenizer(root / name)
        bundle = record(load(str(root / name)), root / f"{name}-bundle", max_new_tokens=6, granularity="layer")
        out[name] = SandboxReplayer().load_bundle(bundle)
    return out


def mixed_sets(session) -> list[list[Intervention]]:
    """Rows that first change blocks 3, 1, 2, the final norm, nothing; shuffled."""
    d = session.adapter.d_model
    gate = Gate("blocks.1.resid_pre", tuple([1.0] * d), -1e9)  # always open; read at block 1
    sets = [[Intervention(f"blocks.{LAYERS - 1}.attn.head.{h}", "zero")] for h in range(4)] + [
        [Intervention("blocks.1.mlp", "scale", value=-2.0)],
        [Intervention("blocks.2.attn.head.1@pos=-1", "zero"), Intervention("blocks.3.mlp", "scale", value=3.0)],
        [Intervention("blocks.3.mlp", "scale", value=-3.0, gate=gate)],
        [Intervention("final", "scale", value=-1.0)],
        [],
    ]
    random.Random(0).shuffle(sets)
    return sets


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_the_prompt_pass_runs_each_block_on_the_rows_that_change_it(sessions, name):
    s = sessions[name]
    sets = mixed_sets(s)
    seen: dict[int, list[int]] = {m: [] for m in range(LAYERS)}

    def spy(m):
        def hook(module, args, kwargs, output):  # before the sharing hook hands the rows on
            hidden = output[0] if isinstance(output, tuple) else output
            seen[m].append(int(hidden.shape[0]))

        return hook

    blocks = {s.adapter.points[f"blocks.{m}.resid_pre"].module: spy(m) for m in range(LAYERS)}
    with hooks(s.adapter, after=blocks):
        shared = s.sweep(sets)
        prompt_rows = {m: rows[0] for m, rows in seen.items()}
        for rows in seen.values():
            rows.clear()
        unshared = s.sweep(sets, share_prefix=False)
    # First changed blocks, sorted: 1 1 2 3 3 3 3 4 4 (the gated row counts its gate's block 1;
    # the final-norm and clean rows count 4). Block m runs the rows changing block ≤ m plus
    # one clean row: 0 + 1, 2 + 1, 3 + 1, 7 + 1.
    assert prompt_rows == {0: 1, 1: 3, 2: 4, 3: 8}, prompt_rows
    assert all(rows[0] == len(sets) for rows in seen.values())  # unshared: every row everywhere
    assert len({r.text for r in shared}) > 1
    for x, y in zip(shared, unshared, strict=True):
        assert x.interventions == y.interventions  # the results come back in the order given
        assert torch.equal(x.outputs["generated_ids"], y.outputs["generated_ids"])
        assert torch.equal(x.outputs["logits"], y.outputs["logits"])
        assert (x.text, x.failed, x.flipped, x.gates) == (y.text, y.failed, y.flipped, y.gates)


def test_a_row_that_changes_the_embedding_runs_the_whole_batch_unshared(sessions):
    s = sessions["llama"]
    sets = [[Intervention("embed", "scale", value=-2.0)], *mixed_sets(s)]
    rows: list[int] = []
    block0 = s.adapter.points["blocks.0.resid_pre"].module
    with hooks(s.adapter, after={block0: lambda m, a, k, out: rows.append(int(out.shape[0]))}):
        swept = s.sweep(sets)
    assert rows[0] == len(sets)
    for x, y in zip(swept, [s.run(x) for x in sets], strict=True):
        assert x.text == y.text and x.failed == y.failed


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_batch_of_several_prompts_shares_each_prompts_blocks_bit_for_bit(sessions, name):
    # Three prompts (16, 16 and 13 tokens: one of them left-padded) with the mixed sets each,
    # in one batch: block m of the prompt pass runs the rows changing a block ≤ m plus one
    # clean row per prompt, and every token and step's scores equal the same batch unshared.
    from model_forensics.models.inputs import ModelInputs
    from model_forensics.replay.sweep import pad_id

    s = sessions[name]
    sets = mixed_sets(s)
    prompts = [
        s.inputs,
        s.encode(" ".join(f"w{i}" for i in range(20, 36))),
        s.encode(" ".join(f"w{i}" for i in range(4, 17))),
    ]
    assert [p.length for p in prompts] == [16, 16, 13]
    rows = [(p, j) for p in range(3) for j in range(len(sets))]
    stacked, pads = ModelInputs.left_padded([prompts[p] for p, _ in rows], pad_id(s))
    prepared = [s.prepare_sets(sets, prompts[p]) for p in range(3)]
    seen: dict[int, list[int]] = {m: [] for m in range(LAYERS)}

    def spy(m):
        def hook(module, args, kwargs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            seen[m].append(int(hidden.shape[0]))

        return hook

    blocks = {s.adapter.points[f"blocks.{m}.resid_pre"].module: spy(m) for m in range(LAYERS)}
    run = [prepared[p][j] for p, j in rows]
    with hooks(s.adapter, after=blocks):
        shared = s.execute(stacked, run, pads=pads, prompts=[p for p, _ in rows])
        prompt_rows = {m: r[0] for m, r in seen.items()}
    unshared = s.execute(stacked, run, pads=pads, prompts=[p for p, _ in rows], share_prefix=False)
    # per prompt, rows changing block ≤ m: 0, 2, 3, 7 (of 9), plus a clean row each
    assert prompt_rows == {0: 3, 1: 9, 2: 12, 3: 24}, prompt_rows
    assert torch.equal(shared[0], unshared[0]) and torch.equal(shared[1], unshared[1])
    alone = [s.sweep(sets, inputs=p) for p in prompts]  # each prompt's own sweep: same tokens
    for (p, j), seq in zip(rows, shared[1], strict=True):
        own = alone[p][j].outputs["generated_ids"]
        assert torch.equal(seq[pads[rows.index((p, j))] :][: len(own)], own)
