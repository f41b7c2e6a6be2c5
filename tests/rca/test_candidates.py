"""Candidates: token positions join the search, a saturated ranking is reported, and the
whole-unit set survives narrowing beside the narrowed one."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_forensics import CausalCCA, SandboxReplayer
from model_forensics.models import zoo
from model_forensics.rca.attribution import Ranking, UnitScore, attribution_ranking
from model_forensics.rca.candidates import Ablation, fine_candidates, saturation_note, search_order

pytestmark = pytest.mark.skipif(
    not {"gpt2-injection", "bert-sentiment-bypass"} <= set(zoo.names()),
    reason="the zoo's trained weights are not shipped in this checkout",
)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from model_forensics.scenarios import get

    return {
        name: get(name).record(tmp_path_factory.mktemp(name), limit=1).incidents[0]
        for name in ("gpt2-injection", "bert-sentiment-bypass")
    }


def test_embedding_and_residual_positions_are_ranked_searched_and_ablatable(recorded: dict[str, Path]) -> None:
    session = SandboxReplayer().load_bundle(recorded["gpt2-injection"])
    ranking = attribution_ranking(session, max_variants=2, positions=True)
    positions = {u.unit for u in ranking.level("position")}
    length = session.prompt_len
    assert {f"embed@pos={t}" for t in range(length)} <= positions
    assert {f"blocks.1.resid_post@pos={t}" for t in range(length)} <= positions
    assert not attribution_ranking(session, max_variants=1).level("position")  # opt-in
    order = search_order(session, ranking, None, unguided=False)
    assert positions <= {u.unit for u in order}
    unit = next(u for u in order if u.unit == f"embed@pos={length - 1}")
    assert fine_candidates(order, [unit.unit], per_site=4) == [unit]
    clean, ablated = session.sweep([[], Ablation("mean").all([unit])])
    assert not clean.logits.equal(ablated.logits)  # the position's mean ablation changes the answer's logits


def test_saturation_note_fires_on_an_all_zero_ranking_only() -> None:
    flat = Ranking([UnitScore(f"blocks.0.attn.head.{h}", "head", 0.0) for h in range(4)], 1, 1, 1)
    note = saturation_note(flat, 1e-6)
    assert note is not None and note.event == "attribution_saturated"
    assert "uninformative" in str(note) and note.numbers["units"] == 4
    informative = Ranking([*flat.units, UnitScore("blocks.0.mlp", "site", 0.3)], 1, 1, 1)
    assert saturation_note(informative, 1e-6) is None


def test_a_saturated_ranking_is_reported_in_the_fix_set(recorded: dict[str, Path]) -> None:
    session = SandboxReplayer().load_bundle(recorded["gpt2-injection"])
    ranking = attribution_ranking(session, max_variants=1)
    flat = Ranking([UnitScore(u.unit, u.level, 0.0) for u in ranking.units], 1, 0, 0)
    cheap = {"refine_rounds": 0, "search_variants": 2, "confirm_top": 1, "confirm_variants": 1}
    fix = CausalCCA(sweep_smallest=False, directions="never", gating="never", **cheap).search_fix_set(
        session, ranking=flat
    )
    assert any(n.event == "attribution_saturated" for n in fix.note_records)
    assert "attribution_saturated" in [n["event"] for n in fix.to_json()["note_records"]]


@pytest.mark.slow
def test_whole_unit_set_is_kept_beside_the_narrowed_one(recorded: dict[str, Path]) -> None:
    session = SandboxReplayer().load_bundle(recorded["bert-sentiment-bypass"])
    fix = CausalCCA({"modules": {"cca": {"positions": True}}}).search_fix_set(session)
    truth = set(session.extras["ground_truth"]["units"])
    # the [CLS] residual alone flips every variant but breaks benign answers; narrowing
    # finds the planted heads, and the position it replaced stays on record
    assert set(fix.units) == truth
    assert fix.units_before_narrowing == ["blocks.1.resid_post@pos=0"]
    assert fix.to_json()["units_before_narrowing"] == ["blocks.1.resid_post@pos=0"]
