"""analyze on a conversation bundle says which turn the failure and the fix belong to; every
analysis says which CF ranker ran and why, and shows the whole units found before narrowing."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

import pytest

from model_forensics.models import zoo
from model_forensics.rca.explain import conversation_rows, explain
from model_forensics.rca.pipeline import analyze_bundle
from model_forensics.report.analysis import analysis_body

NAME = "multiturn-false-fact"
pytestmark = pytest.mark.skipif(NAME not in zoo.names(), reason="the zoo's trained weights are not shipped")


@pytest.fixture(scope="module")
def incident(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model_forensics.scenarios import get

    run = get(NAME).record(tmp_path_factory.mktemp("turns"), limit=1)
    assert run.reproduced, run.to_json()
    return run.incidents[0]


@pytest.fixture(scope="module")
def analysis(incident: Path) -> dict[str, Any]:
    return json.loads(json.dumps(analyze_bundle(incident).to_json()))  # as analyze --out writes it


def test_analysis_names_the_failing_turn_and_the_turns_the_fix_needs(incident: Path, analysis: dict[str, Any]) -> None:
    from model_forensics.core.bundle import Bundle

    manifest = Bundle.open(incident).manifest
    turns = manifest["extras"]["conversation"]["turns"]
    planted = manifest["extras"]["planted_turn"]
    found = analysis["conversation"]
    assert found["turns"] == len(turns) and found["failing_turn"] == len(turns) - 1
    assert found["fix_turns"] and set(found["fix_turns"]) <= {planted, len(turns) - 1}, found
    assert [e["index"] for e in found["fix_effects"]] == list(range(len(turns)))
    assert [e["index"] for e in found["fix_effects"] if e["flipped"]] == found["fix_turns"]
    for top in found["top_positions"]:  # each position lies in the turn named: its message or its reply
        turn = turns[top["turn"]]
        assert (
            turn["span"][0] <= top["position"] < turn["reply_span"][1] and top["unit"] == f"embed@pos={top['position']}"
        )
    assert abs(sum(found["turn_shares"].values()) - 1.0) < 1e-6
    assert found["source_turns"] == [planted]  # the clean counterpart's embeddings at that turn alone fix it


def test_the_report_says_it_by_turn(analysis: dict[str, Any]) -> None:
    sections = {s.key: s for s in explain(analysis)}
    found = analysis["conversation"]
    conclusion = sections["conclusion"].paragraphs[0]
    assert f"the reply of turn {found['failing_turn']} (of {found['turns']})" in conclusion
    assert f"it comes from turn {found['source_turns'][0]}" in conclusion
    assert sections["conversation"].items == conversation_rows(found)
    assert any(
        f"turn {t}'s positions: flips the failure" in row
        for row in sections["conversation"].items
        for t in found["fix_turns"]
    )
    body = analysis_body(analysis)  # the HTML report shows the turns too
    assert "<h2>Conversation turns</h2>" in body and escape(sections["conversation"].items[0]) in body


def test_cf_ranker_and_units_before_narrowing_are_reported(analysis: dict[str, Any]) -> None:
    ranker = analysis["cf_ranker"]
    assert ranker["used"] == analysis["anomalies"]["ranker"] and ranker["configured"] in (
        "features",
        "relative",
        "auto",
    )
    tried = " ".join(next(s for s in explain(analysis) if s.key == "tried").paragraphs)
    assert f"CF ranked units with the {ranker['used']} ranker" in tried and ranker["why"] in tried
    assert "Before narrowing" not in tried  # this fix was not narrowed
    members = [m["unit"] for m in analysis["fix_set"]["members"]]
    whole = ["blocks.0.attn.head.1", "blocks.1.attn.head.2"]
    narrowed = {**analysis, "fix_set": {**analysis["fix_set"], "units_before_narrowing": whole}}
    tried = " ".join(next(s for s in explain(narrowed) if s.key == "tried").paragraphs)
    assert f"Before narrowing, the search's fix was 2 whole units ({', '.join(whole)})" in tried
    assert f"replaced them by {', '.join(members)}" in tried


def test_a_single_prompt_analysis_has_no_conversation(tmp_path: Path) -> None:
    from model_forensics.core.predicates import contains
    from model_forensics.recorder.session import record_incident

    loaded = zoo.load(NAME)
    prompt = "user: sky is purple . bot: ok <eos> user: what is sky ? bot:"
    benign = ["user: what is sky ? bot:", "user: what is grass ? bot:"]
    path = record_incident(
        loaded, prompt, tmp_path / "one", predicate=contains("purple"), max_new_tokens=2, benign=benign
    ).path
    config = tmp_path / "c.yaml"
    config.write_text("modules:\n  cca:\n    held_out_fraction: 0\n")
    result = analyze_bundle(path, config=config).to_json()
    assert result["conversation"] is None
    assert all(s.key != "conversation" for s in explain(result))
