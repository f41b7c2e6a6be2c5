"""Acceptance on ground truth: root-cause analysis on the zoo's planted mechanisms.

For each zoo scenario the fix set must flip ≥ 80 % of the failing variants, cost ≤ 2 %
benign accuracy and ≤ 0.05 nats mean benign KL, hold ≤ 5 % of the candidate units, and
consist of planted units. Recall ≥ 0.8 of the planted units is required of the units the
analysis implicates (fix set ∪ units confirmed by exact patching): a 1-minimal fix set of a
redundantly planted mechanism (neurons that each carry the trigger) needs only some of
them, so the fix set's own recall is reported, not required. The ground truth lists the
planted units that carry the mechanism (the zoo card's ``inert_units`` are planted
neurons that training left unused; ablating the listed units alone removes the failure).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model_forensics import CausalCCA, CompressionForensics, SandboxReplayer
from model_forensics.models import zoo

SCENARIOS = ["gpt2-injection", "bert-sentiment-bypass", "gpt2-toxic"]
pytestmark = pytest.mark.skipif(
    not set(SCENARIOS) <= set(zoo.names()), reason="the zoo's trained weights are not shipped in this checkout"
)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from model_forensics.scenarios import get

    out = {}
    for name in SCENARIOS:
        out[name] = get(name).record(tmp_path_factory.mktemp(name), limit=1).incidents[0]
    return out


@pytest.mark.parametrize("name", SCENARIOS)
def test_fix_set_meets_acceptance_on_ground_truth(recorded: dict[str, Path], name: str) -> None:
    session = SandboxReplayer().load_bundle(recorded[name])
    truth = session.extras["ground_truth"]
    anomalies = CompressionForensics().analyze(session)
    fix = CausalCCA().search_fix_set(session, guided_by=anomalies)
    members = fix.units
    implicated = set(members) | set(fix.implicated_units)
    recall = sum(u in implicated for u in truth["units"]) / len(truth["units"])
    fix_recall = sum(u in members for u in truth["units"]) / len(truth["units"])
    precision = sum(m in truth["units"] for m in members) / max(1, len(members))
    report = json.dumps(
        {
            "members": members,
            "implicated": sorted(implicated),
            "truth": truth["units"],
            "recall_implicated": recall,
            "recall_fix_set": fix_recall,
            "precision": precision,
            "fix": fix.to_json(),
        },
        default=str,
    )[:4000]
    print(report)
    assert fix.total_flip_rate >= 0.8, report
    assert fix.side_effects is not None
    assert fix.side_effects.accuracy_drop <= 0.02, report
    assert fix.side_effects.mean_kl <= 0.05, report
    assert len(members) <= 0.05 * fix.candidates, report
    assert precision >= 0.8, report
    assert recall >= 0.8, report
    # every member is necessary: the set is 1-minimal
    assert all(m.necessity > 0 for m in fix.members) or len(fix.members) == 1, report
