"""Scenarios: the registry, and recordings whose incident fails and whose baseline does not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from model_forensics.cli import app
from model_forensics.core.bundle import Bundle
from model_forensics.core.errors import BundleError, ForensicsError
from model_forensics.replay import SandboxReplayer
from model_forensics.scenarios import Scenario, get, names
from model_forensics.scenarios.scenario import prompt_of

ZOO = ["gpt2-injection", "bert-sentiment-bypass", "gpt2-toxic"]
REAL = ["smollm2-injection", "minilm-suffix"]


def _zoo_ready() -> bool:
    from model_forensics.models import zoo

    return {"gpt2-injection", "bert-sentiment-bypass", "gpt2-toxic"} <= set(zoo.names())


needs_zoo = pytest.mark.skipif(not _zoo_ready(), reason="the zoo's trained entries have not been shipped yet")


def _extras(path: Path) -> dict[str, Any]:
    return dict(Bundle.open(path).manifest["extras"])


def test_registry_names_every_scenario() -> None:
    # cnn-badnets: tests/scenarios/test_cnn_badnets.py; multiturn-false-fact: tests/rca/test_multiturn.py
    assert names() == [*ZOO, *REAL, "tool-misuse", "cnn-badnets", "multiturn-false-fact"]


def test_unknown_scenario_error_lists_the_names() -> None:
    with pytest.raises(ForensicsError, match="unknown scenario 'nope'; available: gpt2-injection, .*tool-misuse"):
        get("nope")


@pytest.mark.parametrize("name", REAL)
def test_real_weight_scenarios_say_they_have_no_ground_truth(name: str) -> None:
    scenario = get(name)
    assert scenario.ground_truth is None
    assert scenario.ground_truth_note == "real weights: no known ground truth"
    assert scenario.ground_truth_level == "none (real weights)"
    assert scenario.source == "real weights"


@needs_zoo
@pytest.mark.parametrize("name", [*ZOO, "tool-misuse"])
def test_zoo_scenarios_carry_the_zoo_ground_truth(name: str) -> None:
    from model_forensics.models import zoo

    scenario = get(name)
    truth = zoo.entry("gpt2-injection" if name == "tool-misuse" else name).ground_truth
    assert scenario.ground_truth == dict(truth)
    assert scenario.ground_truth_level == truth["level"]
    assert scenario.variants and scenario.benign


def test_smollm2_scenario_uses_every_stored_case() -> None:
    import json
    from importlib import resources

    data = json.loads(resources.files("model_forensics.scenarios").joinpath("data/smollm2_injection.json").read_text())
    scenario = get("smollm2-injection")
    assert scenario.incidents == [data["failing"][0]["prompt"]]
    assert scenario.failing() == [case["prompt"] for case in data["failing"]]
    assert len(scenario.baseline) == len(data["failing"])  # one clean counterpart per failing prompt
    assert [prompt_of(b) for b in scenario.benign] == [case["prompt"] for case in data["benign"]]
    assert all(scenario.predicate.evaluate(text=case["output"]) for case in data["failing"])
    assert not any(scenario.predicate.evaluate(text=case["output"]) for case in data["benign"])


def test_minilm_scenario_reports_its_success_rate() -> None:
    scenario = get("minilm-suffix")
    assert scenario.kind == "classification"
    assert "% of" in scenario.description and "held-out" in scenario.description


def test_scenario_needs_a_counterpart_for_each_incident() -> None:
    from model_forensics.core.predicates import contains

    with pytest.raises(ForensicsError, match="every incident needs one"):
        Scenario("s", "d", "m", incidents=["a", "b"], variants=[], baseline=["a'"], benign=[], predicate=contains("x"))


@needs_zoo
@pytest.mark.parametrize("name", ZOO)
def test_zoo_scenario_records_failing_incident_and_clean_baseline(name: str, tmp_path: Path) -> None:
    scenario = get(name)
    run = scenario.record(tmp_path, limit=1)
    assert run.incidents == [tmp_path / "incident-0"] and run.baselines == [tmp_path / "baseline-0"]
    assert run.incident_failed == [True]
    assert run.baseline_failed == [False]
    extras = _extras(run.incidents[0])
    assert extras["scenario"] == name
    assert extras["ground_truth"] == scenario.ground_truth
    assert extras["variants"] == scenario.failing()[1:]
    assert extras["benign"] == scenario.benign
    assert extras["baseline"][0] == scenario.baseline[0]
    assert _extras(run.baselines[0])["prompt"] == prompt_of(scenario.baseline[0])


@needs_zoo
def test_incident_bundle_replays_with_its_variants_and_benign_set(tmp_path: Path) -> None:
    scenario = get("gpt2-injection")
    run = scenario.record(tmp_path, limit=1)
    session = SandboxReplayer().load_bundle(run.incidents[0])
    assert session.verify().bit_identical
    assert session.run([]).failed is True
    assert len(session.variants()) == len(scenario.failing())  # the incident, then every other failing prompt
    assert len(session.benign()) == len(scenario.benign)
    assert len(session.baselines) == len(scenario.baseline)


@needs_zoo
def test_existing_bundles_are_kept_unless_overwrite(tmp_path: Path) -> None:
    scenario = get("bert-sentiment-bypass")
    scenario.record(tmp_path, limit=1)
    with pytest.raises(BundleError, match="already exist.*--overwrite"):
        scenario.record(tmp_path, limit=1)
    assert scenario.record(tmp_path, limit=1, overwrite=True).reproduced


def test_smollm2_incident_still_fails_when_recorded(smollm2: Any, tmp_path: Path) -> None:
    run = get("smollm2-injection").record(tmp_path, limit=1, loaded=smollm2)
    assert run.incident_failed == [True], run.outputs
    assert run.baseline_failed == [False], run.baseline_outputs


def test_minilm_incident_is_classified_positive_and_replays(tmp_path: Path) -> None:
    scenario = get("minilm-suffix")
    loaded = scenario.load()
    run = scenario.record(tmp_path, limit=1, loaded=loaded)
    assert run.incident_failed == [True] and run.outputs == ["class 1"]
    assert run.baseline_failed == [False] and run.baseline_outputs == ["class 0"]
    assert _extras(run.incidents[0])["loader"] == "model_forensics.models.minilm_probe:load_minilm_sentiment"
    session = SandboxReplayer().load_bundle(run.incidents[0], model=loaded)
    assert session.verify().bit_identical
    assert len(session.variants()) == len(scenario.failing())  # the incident, then every other failing prompt


def test_cli_lists_scenarios(monkeypatch: pytest.MonkeyPatch) -> None:
    from model_forensics import cli

    monkeypatch.setattr(cli.console, "width", 250)
    result = CliRunner().invoke(app, ["scenarios", "list"])
    assert result.exit_code == 0, result.output
    for name in names():
        assert name in result.output
    assert "none (real weights)" in result.output


@needs_zoo
def test_cli_runs_a_scenario(tmp_path: Path) -> None:
    args = ["scenarios", "run", "gpt2-injection", "--out", str(tmp_path), "--incidents", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "incident-0" / "manifest.json").is_file()
    assert (tmp_path / "baseline-0" / "manifest.json").is_file()


def test_cli_unknown_scenario_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["scenarios", "run", "nope", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown scenario 'nope'" in result.output
    assert "Traceback" not in result.output
