"""Root-cause analysis of a multi-turn incident: the planted heads, and the turns the fix needs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model_forensics import CausalCCA, CompressionForensics, SandboxReplayer
from model_forensics.models import zoo
from model_forensics.replay.turns import replay_turns, source_turns, turn_effects, turns_needed

NAME = "multiturn-false-fact"
pytestmark = pytest.mark.skipif(NAME not in zoo.names(), reason="the zoo's trained weights are not shipped")


@pytest.fixture(scope="module")
def incident(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model_forensics.scenarios import get

    run = get(NAME).record(tmp_path_factory.mktemp("multiturn"), limit=1)
    assert run.reproduced, run.to_json()
    return run.incidents[0]


def test_analysis_finds_the_planted_heads_and_the_turns_they_act_in(incident: Path) -> None:
    session = SandboxReplayer().load_bundle(incident)
    assert replay_turns(session).bit_identical
    truth = session.extras["ground_truth"]
    planted_turn = session.extras["planted_turn"]
    fix = CausalCCA().search_fix_set(session, guided_by=CompressionForensics().analyze(session))
    implicated = set(fix.units) | set(fix.implicated_units)
    recall = sum(u in implicated for u in truth["units"]) / len(truth["units"])
    effects = turn_effects(session, fix.interventions)
    needed = turns_needed(effects)
    report = json.dumps(
        {
            "members": fix.units,
            "implicated": sorted(implicated),
            "truth": truth["units"],
            "turns_needed": needed,
            "planted_turn": planted_turn,
            "effects": [e.to_json() for e in effects],
        },
        default=str,
    )
    print(report)
    assert fix.total_flip_rate >= 0.8, report
    assert recall >= 0.5, report
    assert all(m in truth["units"] for m in fix.units), report
    assert needed and set(needed) <= {planted_turn, len(effects) - 1}, report  # never a small-talk turn
    # The turn the failure comes from: patching only its tokens from the clean counterpart flips it.
    assert turns_needed(source_turns(session, str(incident.parent / "baseline-0"))) == [planted_turn], report
