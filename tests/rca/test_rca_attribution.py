"""Attribution ranking (activation difference × gradient) against exact activation patching.

On the zoo's gpt2-injection incident (a planted head and planted MLP neurons), the
first-order estimates must rank units the way mean-ablating each unit alone does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from scipy.stats import spearmanr

from model_forensics import ForensicsError, RecorderHooks, SandboxReplayer
from model_forensics.rca import attribution_ranking
from model_forensics.rca.attribution import exact_effects
from model_forensics.scenarios import get

VARIANTS = 4  # failing variants both methods average over


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory):
    """gpt2-injection cut to 8 failing prompts, 4 benign and 8 clean baselines."""
    scenario = get("gpt2-injection")
    small = dataclasses.replace(
        scenario, variants=scenario.variants[:5], benign=scenario.benign[:4], baseline=scenario.baseline[:8]
    )
    run = small.record(tmp_path_factory.mktemp("gpt2-injection"), limit=1)
    assert run.reproduced
    return run


@pytest.fixture(scope="module")
def session(recorded):
    return SandboxReplayer().load_bundle(recorded.incidents[0])


@pytest.fixture(scope="module")
def ranking(session):
    return attribution_ranking(session, inputs=session.variants()[:VARIANTS])


def test_heads_rank_like_exact_patching(session, ranking) -> None:
    heads = ranking.level("head")
    exact = exact_effects(session, [u.unit for u in heads], "mean", max_variants=VARIANTS)
    rho = spearmanr([u.score for u in heads], [exact[u.unit] for u in heads]).statistic
    assert rho > 0.5, f"Spearman {rho:.2f}"
    strongest = max(exact, key=lambda u: exact[u])
    assert strongest in [u.unit for u in heads[:2]]


def test_neurons_rank_like_exact_patching(session, ranking) -> None:
    neurons = ranking.level("neuron")
    exact = exact_effects(session, [u.unit for u in neurons], "mean", max_variants=VARIANTS)
    order = [u.unit for u in neurons]
    strongest = max(exact, key=lambda u: exact[u])
    assert order.index(strongest) < 0.02 * len(order), f"{strongest} ranked {order.index(strongest)}"
    top = neurons[:20]
    rho = spearmanr([u.score for u in top], [exact[u.unit] for u in top]).statistic
    assert rho > 0.5, f"Spearman over the top 20 neurons {rho:.2f}"


def test_site_scores_sum_their_heads_and_neurons(session, ranking) -> None:
    # attn = W_O z + b and mlp = W_out post + b are linear, so first-order effects add up.
    for layer in range(session.adapter.n_layers):
        attn = f"blocks.{layer}.attn"
        heads = sum(u.score for u in ranking.level("head") if u.unit.startswith(attn + ".head."))
        assert ranking.score(attn) == pytest.approx(heads, rel=1e-3, abs=1e-7)
        mlp = f"blocks.{layer}.mlp"
        neurons = sum(u.score for u in ranking.level("neuron") if u.unit.startswith(mlp + ".post["))
        assert ranking.score(mlp) == pytest.approx(neurons, rel=1e-3, abs=1e-7)


def test_inputs_that_do_not_fail_are_skipped(recorded, session) -> None:
    clean = SandboxReplayer().load_bundle(recorded.baselines[0]).inputs
    mixed = attribution_ranking(session, inputs=[clean, session.inputs])
    alone = attribution_ranking(session, inputs=[session.inputs])
    assert mixed.variants_used == 1 and mixed.backward_passes == 1
    assert [(u.unit, u.score) for u in mixed.units[:20]] == [(u.unit, u.score) for u in alone.units[:20]]


def test_nothing_to_attribute_without_a_failure(recorded, tiny, tmp_path: Path) -> None:
    clean = SandboxReplayer().load_bundle(recorded.baselines[0])
    assert clean.recorded_failed is False
    with pytest.raises(ForensicsError, match="does not fail"):
        attribution_ranking(clean)

    loaded = tiny["gpt2"]
    with RecorderHooks().install_hooks(loaded.model) as rec, torch.no_grad():
        loaded.model(input_ids=torch.tensor([[1, 5, 9, 3]]))
        path = rec.create_bundle(tmp_path / "no-predicate")
    with pytest.raises(ForensicsError, match="no failure predicate"):
        attribution_ranking(SandboxReplayer().load_bundle(path))


def test_exact_effects_entering_at_each_unit_s_block_equal_whole_passes(session, ranking) -> None:
    # the zoo's GPT-2 is below the size where rows entering at their blocks pay; force it
    units = [u.unit for u in [*ranking.level("head"), *ranking.level("neuron")[:8]]]
    assert len({u.split(".")[1] for u in units}) > 1  # rows enter at several blocks
    first = session.adapter.modules[session.adapter.points["blocks.0.resid_pre"].module]
    rows: list[int] = []  # rows block 0 ran, per call
    handle = first.register_forward_pre_hook(lambda m, a, k: rows.append(_rows(a, k)), with_kwargs=True)
    try:
        whole = exact_effects(session, units, "mean", max_variants=VARIANTS)  # the size rule: whole passes
        whole_rows, rows[:] = sum(rows), []
        shared = exact_effects(session, units, "mean", max_variants=VARIANTS, share_prefix=True)
    finally:
        handle.remove()
    assert shared.keys() == whole.keys()
    scale = max(abs(v) for v in whole.values())
    assert all(abs(shared[u] - whole[u]) <= 1e-4 * scale for u in units)
    assert sorted(units, key=lambda u: -shared[u]) == sorted(units, key=lambda u: -whole[u])
    # block 0 runs every unit's row on the whole path, and on the shared one only the rows
    # that change it, beside each variant's clean pass and prefix capture (and one check)
    at_zero = sum(u.startswith("blocks.0.") for u in units)
    assert whole_rows == VARIANTS * (1 + len(units))
    assert sum(rows) <= VARIANTS * (2 + at_zero) + 1 < whole_rows


def _rows(args: tuple, kwargs: dict) -> int:
    hidden = args[0] if args else kwargs["hidden_states"]
    return int(hidden.shape[0])
