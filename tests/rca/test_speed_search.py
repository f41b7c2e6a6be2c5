"""The search's and narrowing's shortcuts measure nothing twice and run nothing more than needed.

* set keys are order-free: a set listed in another order is not measured again;
* narrowing tries the fix's own heads first (:mod:`~model_forensics.rca.narrowing`).
"""

from __future__ import annotations

import pytest
import torch

from model_forensics import SandboxReplayer
from model_forensics.core.config import load_config
from model_forensics.core.sites import block_index
from model_forensics.models import zoo
from model_forensics.rca import runs
from model_forensics.rca.attribution import attribution_ranking
from model_forensics.rca.candidates import Ablation
from model_forensics.rca.narrowing import narrow_if_it_helps
from model_forensics.rca.notes import Note
from model_forensics.rca.search import FixChoice, FixSearch, set_key
from model_forensics.replay import Session

pytestmark = pytest.mark.skipif(
    "gpt2-toxic" not in set(zoo.names()), reason="the zoo's trained weights are not shipped in this checkout"
)


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Session:
    from model_forensics.scenarios import get

    bundle = get("gpt2-toxic").record(tmp_path_factory.mktemp("gpt2-toxic"), limit=1).incidents[0]
    return SandboxReplayer().load_bundle(bundle)


def test_a_set_listed_in_another_order_is_not_measured_again(session: Session) -> None:
    search = FixSearch(session, load_config(None).modules.cca)
    ranking = attribution_ranking(session)
    fix = Ablation("mean").all([u for u in ranking.units if u.level == "neuron"][:3])
    assert set_key(fix) == set_key(fix[::-1]) != set_key(fix[:2])
    first = search.flips(search.failing, fix)
    passes = session.forward_passes
    assert search.flips(search.failing, fix[::-1]) == first
    assert session.forward_passes == passes  # nothing ran
    assert search.memo["flip_checks_reused"] >= len(search.failing)
    (fresh,) = runs.flip_table(session, search.failing, [fix[::-1]])
    assert fresh == first  # and the reversed set's own replays agree


def test_narrowing_tries_the_fix_s_own_heads_first(session: Session) -> None:
    search = FixSearch(session, load_config(None).modules.cca)
    ranking = attribution_ranking(session)
    heads = [u for u in ranking.units if u.level == "head"]
    units, ablate = heads[:2], Ablation("mean")
    # a whole-unit fix with a KL any narrowed set beats, flipping nothing: its own heads
    # along their directions win, and nothing else is measured
    notes: list[Note] = []
    got = narrow_if_it_helps(search, heads, FixChoice(units, ablate, 1e9, {}), 0.0, notes)
    assert [note.event for note in notes] == ["narrowed"]
    assert [u.unit for u in got.units] == [u.unit for u in units]
    assert all(iv.direction is not None for iv in got.interventions)
    assert search.memo["flip_checks"] == len(search.failing)  # one set, no search
    assert search.memo["side_effects"] == 1
    (flips,) = runs.flip_table(session, search.failing, [got.interventions])
    assert notes[0].numbers["flip_rate"] == runs.flip_rate(flips)  # by replay
    assert notes[0].numbers["kl"] == got.benign_kl < 1e9


def test_reaching_rates_stop_measuring_a_set_once_it_cannot_reach(session: Session) -> None:
    cfg = load_config(None).modules.cca
    units = attribution_ranking(session).units
    ablate = Ablation("mean")
    sets = [ablate.all(units[:k]) for k in (1, 2, 3)] + [ablate.all([u]) for u in units[3:8]]
    every = FixSearch(session, cfg)
    rates = [runs.flip_rate(f) for f in every.flip_table(every.failing, sets)]
    search = FixSearch(session, cfg)
    got = search.reaching_rates(search.failing, sets)
    assert got == [r if search.reaches(r) else None for r in rates]  # as measuring everything
    assert None in got and any(r is not None for r in got)
    measured = [sum((id(v), set_key(s)) in search._flipped for v in search.failing) for s in sets]
    n = len(search.failing)
    assert all(m == n for m, r in zip(measured, got, strict=True) if r is not None)  # reaching: every variant
    assert all(m < n for m, r in zip(measured, got, strict=True) if r is None)  # the others stopped early
    # what was measured first is used first: a second call measures nothing
    passes = session.forward_passes
    assert search.reaching_rates(search.failing, sets) == got
    assert session.forward_passes == passes


def test_a_capture_runs_no_further_than_the_sites_it_reads(session: Session) -> None:
    sites = ["blocks.0.resid_post"]
    full = runs.capture(session, session.inputs, "layer", sites)
    adapter = session.adapter
    blocks = [adapter.modules[adapter.point(f"blocks.{i}.resid_post").module] for i in range(adapter.n_layers)]
    ran: list[object] = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    unembed = session.model.get_output_embeddings()
    handles.append(unembed.register_forward_hook(lambda m, a, o: ran.append(("unembed", a[0].shape[1]))))
    try:
        cut = runs.capture(session, session.inputs, "layer", sites, only_sites=True)
        assert ran == [0]  # block 0 only: neither the later blocks nor the unembedding ran
        ran.clear()
        again = runs.capture(session, session.inputs, "layer", sites)
        assert ran == [*range(adapter.n_layers), ("unembed", 1)]  # scores at the last position only
    finally:
        for handle in handles:
            handle.remove()
    assert adapter.n_layers > 1 and session.inputs["input_ids"].shape[1] > 1
    assert set(cut) == {s for s in full if block_index(s) in (None, 0)} and "blocks.1.resid_post" in full
    assert all(torch.equal(cut[s], full[s]) for s in cut) and all(torch.equal(again[s], full[s]) for s in full)
    assert runs.last_block(["blocks.2.attn.z", "blocks.0.mlp"]) == 2
    assert runs.last_block(["blocks.*.attn.z"]) is None and runs.last_block(["embed"]) is None
