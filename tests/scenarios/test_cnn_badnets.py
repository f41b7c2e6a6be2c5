"""The cnn-badnets scenario: patched digits recorded as incidents whose extras carry the
failing variants, clean counterparts and benign images as checked ``pixel_values``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from model_forensics.cli import app
from model_forensics.core.bundle import Bundle
from model_forensics.core.config import BundleConfig
from model_forensics.core.errors import BundleError
from model_forensics.core.manifest import check_manifest
from model_forensics.rca.attribution import Ranking, UnitScore
from model_forensics.rca.candidates import fine_candidates, forward_order, search_order, unit_count
from model_forensics.rca.pipeline import analyze_bundle
from model_forensics.replay import SandboxReplayer
from model_forensics.scenarios import get
from model_forensics.scenarios.images import ImageScenario


@pytest.fixture(scope="module")
def run(tmp_path_factory: Any) -> Any:
    return get("cnn-badnets").record(tmp_path_factory.mktemp("badnets"), limit=1)


def test_scenario_names_its_images_and_ground_truth() -> None:
    scenario = get("cnn-badnets")
    assert isinstance(scenario, ImageScenario)
    assert scenario.model == "zoo:cnn-digits-badnets" and scenario.kind == "classification"
    assert len(scenario.incidents) == 3 and len(scenario.variants) >= 20 and len(scenario.benign) >= 20
    assert all(name in scenario.images for name in scenario.failing())
    assert scenario.ground_truth is not None
    assert scenario.ground_truth["units"] == ["features.2[4]", "features.2[13]", "features.2[22]"]


def test_incident_fails_and_its_clean_counterpart_passes(run: Any) -> None:
    assert run.incident_failed == [True] and run.baseline_failed == [False]
    assert run.outputs == ["class 0"]


def test_incident_extras_carry_images_that_replay_as_inputs(run: Any) -> None:
    extras = Bundle.open(run.incidents[0]).manifest["extras"]
    assert extras["image"].startswith("patched-")
    assert all(set(e) >= {"pixel_values", "image"} for e in extras["variants"])
    assert all("expected" in e for e in extras["benign"])
    session = SandboxReplayer().load_bundle(run.incidents[0])
    variants = session.variants()
    assert len(variants) == 1 + len(extras["variants"])
    assert all(session.run(inputs=v).failed for v in variants[:8])  # patched digits: class 0
    assert not any(session.run(inputs=b).failed for b in session.baselines[:8])  # their clean twins: not


def test_hostile_pixel_values_are_refused_when_the_manifest_is_read(run: Any) -> None:
    manifest = Bundle.open(run.incidents[0]).manifest
    for bad in ([[["0.5"]]], [], [[[1e30]]], [[[0.0] * 2000]]):
        tampered = copy.deepcopy(manifest)
        tampered["extras"]["variants"] = [{"pixel_values": bad}]
        with pytest.raises(BundleError):
            check_manifest(tampered, BundleConfig())


def test_rca_candidates_are_the_convolution_channels(run: Any) -> None:
    session = SandboxReplayer().load_bundle(run.incidents[0])
    units = forward_order(session)
    assert [u.unit for u in units if u.level == "site"] == ["features.2", "features.0"]  # nearest the output first
    channels = [u.unit for u in units if u.level == "neuron"]
    assert channels[:2] == ["features.2[0]", "features.2[1]"] and len(channels) == 32 + 16 == unit_count(session)


def test_cli_records_the_scenario(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["scenarios", "run", "cnn-badnets", "--out", str(tmp_path), "--incidents", "1"])
    assert result.exit_code == 0, result.output
    assert "FAILS (predicate holds)" in result.output
    assert (tmp_path / "incident-0" / "manifest.json").is_file() and (tmp_path / "baseline-0").is_dir()


def test_guided_search_groups_the_blamed_channels_of_a_convolution(run: Any) -> None:
    session = SandboxReplayer().load_bundle(run.incidents[0])
    scores = {
        "features.2[22]": 9.0,
        "features.2[4]": 5.0,
        "features.2[13]": 4.0,
        "features.2[7]": -1.0,
        "features.0[3]": 2.0,
    }
    ranking = Ranking([UnitScore(u, "neuron", v) for u, v in scores.items()], 1, 0, 0)
    order = search_order(session, ranking, None, unguided=False)
    coarse = [u.unit for u in order if u.level == "site"]
    assert coarse == ["features.2[22,4,13]", "features.0[3]"]  # positive channels only, best site first
    fine = fine_candidates(order, ["features.2[22,4,13]"], per_site=48)
    assert [u.unit for u in fine] == ["features.2[22]", "features.2[4]", "features.2[13]"]
    assert session.run([coarse[0] + ":zero"]).failed is False  # the coarse unit is one intervention


def test_analysis_finds_the_planted_channels_and_keeps_clean_accuracy(run: Any) -> None:
    result = analyze_bundle(run.incidents[0]).to_json()
    fix = result["fix_set"]
    planted = set(get("cnn-badnets").ground_truth["units"])
    found = {m["unit"] for m in fix["members"]}
    assert fix["total_flip_rate"] >= 0.8  # the acceptance: ≥ 80% of triggered images flipped
    assert fix["side_effects"]["accuracy_drop"] <= 0.02  # ≤ 2% clean accuracy drop
    assert len(found & planted) / len(planted) >= 0.8  # recall of the planted channels
