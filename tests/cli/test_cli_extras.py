"""The CLI's smaller pieces: --version, --device/--dtype, and batch results written as they
finish (--results) and resumed after an interruption (--resume)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import model_forensics
from model_forensics import Bundle
from model_forensics.cli import app
from model_forensics.models.loading import load

runner = CliRunner()


def _one_line_exit_2(res) -> None:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output


def test_version_prints_the_package_version() -> None:
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0
    assert res.output.strip() == f"model-forensics {model_forensics.__version__}" == "model-forensics 0.2.0"


# -- --device / --dtype ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toxic_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("toxic") / "b"
    res = runner.invoke(app, ["record", "-m", "zoo:gpt2-toxic", "-p", "you are", "-o", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    return out


def test_record_in_float16_records_the_dtype(tmp_path: Path) -> None:
    out = tmp_path / "b16"
    res = runner.invoke(app, ["record", "-m", "zoo:gpt2-toxic", "-p", "you are", "-o", str(out), "--dtype", "float16"])
    assert res.exit_code == 0, res.output
    manifest = Bundle.open(out).manifest
    assert manifest["model"]["dtype"] == "float16"
    assert {info["dtype"] for info in manifest["sites"].values()} == {"float16"}


def test_load_casts_zoo_models_to_the_dtype_asked_for() -> None:
    loaded = load("zoo:gpt2-toxic", dtype="bfloat16", device="cpu")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}


def test_replay_in_another_dtype_says_bit_identity_is_not_expected(toxic_bundle: Path) -> None:
    res = runner.invoke(app, ["replay", str(toxic_bundle), "--dtype", "float16", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "replaying in float16, recorded in float32: bit-identity with the recording is not expected" in res.output
    assert "verification" not in res.output  # not run: it could only report a divergence
    same = runner.invoke(app, ["replay", str(toxic_bundle), "--dtype", "float32"])
    assert same.exit_code == 0 and "bit-identical" in same.output and "not expected" not in same.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("command", ["record", "replay", "analyze"])
def test_cuda_without_a_gpu_is_one_clear_line(command: str, toxic_bundle: Path, tmp_path: Path) -> None:
    args = {
        "record": ["record", "-m", "zoo:gpt2-toxic", "-p", "hi", "-o", str(tmp_path / "b")],
        "replay": ["replay", str(toxic_bundle)],
        "analyze": ["analyze", str(toxic_bundle)],
    }[command]
    res = runner.invoke(app, [*args, "--device", "cuda"])
    _one_line_exit_2(res)
    assert "no CUDA device is available here" in res.output and "--device cpu" in res.output
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("command", ["record", "replay"])
def test_unknown_dtype_is_one_clear_line(command: str, toxic_bundle: Path, tmp_path: Path) -> None:
    args = {
        "record": ["record", "-m", "zoo:gpt2-toxic", "-p", "hi", "-o", str(tmp_path / "b")],
        "replay": ["replay", str(toxic_bundle)],
    }[command]
    res = runner.invoke(app, [*args, "--dtype", "int8"])
    _one_line_exit_2(res)
    assert "dtype 'int8' is unknown" in res.output


# -- batch --results / --resume ------------------------------------------------------------------
@pytest.fixture()
def incidents(tiny, argmax_incidents, tmp_path: Path) -> Path:
    """Three incidents on the tiny Llama (predicate: its own next-token argmax)."""
    return argmax_incidents(tiny["llama"], tmp_path / "bundles", n_benign=6)


def test_batch_writes_each_result_and_resume_recomputes_only_the_missing_one(incidents: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    first = runner.invoke(app, ["batch", str(incidents), "--workers", "1", "--results", str(results)])
    assert first.exit_code == 0, first.output
    assert "3 computed, 0 resumed" in first.output
    files = {p.name: p for p in results.glob("*.json")}
    assert sorted(files) == ["incident-0.json", "incident-1.json", "incident-2.json"]
    assert all(json.loads(p.read_text())["ok"] for p in files.values())
    assert not list(results.glob(".*"))  # no temporaries left behind
    kept = {name: p.stat().st_mtime_ns for name, p in files.items() if name != "incident-1.json"}
    files["incident-1.json"].unlink()  # as if the run was killed before incident-1 finished

    again = runner.invoke(app, ["batch", str(incidents), "--workers", "1", "--results", str(results), "--resume"])
    assert again.exit_code == 0, again.output
    assert "1 computed, 2 resumed" in again.output
    assert (results / "incident-1.json").is_file()
    assert {name: (results / name).stat().st_mtime_ns for name in kept} == kept  # untouched
    summary = tmp_path / "summary.json"
    args = ["batch", str(incidents), "--workers", "1", "--results", str(results), "--resume", "--out", str(summary)]
    assert runner.invoke(app, args).exit_code == 0
    report = json.loads(summary.read_text())
    assert report["computed"] == [] and len(report["resumed"]) == 3 and len(report["results"]) == 3


def test_resume_recomputes_a_half_written_result(incidents: Path, tmp_path: Path) -> None:
    from model_forensics.rca.pipeline import find_bundles, run_many

    results = tmp_path / "results"
    run_many(find_bundles(incidents)[:2], search=False, results_dir=results)
    (results / "incident-0.json").write_text('{"format": "model-forensics-batch-result", "ok": tr')
    report = run_many(find_bundles(incidents)[:2], search=False, results_dir=results, resume=True)
    assert [Path(p).name for p in report.computed] == ["incident-0"]
    assert [Path(p).name for p in report.resumed] == ["incident-1"]
    assert json.loads((results / "incident-0.json").read_text())["ok"] is True


def test_resume_needs_results(incidents: Path) -> None:
    _one_line_exit_2(runner.invoke(app, ["batch", str(incidents), "--resume"]))


# -- the tool-misuse agent: would the fixed agent still issue the destructive call? -------------
HEAD_FIX = [{"site": "blocks.0.attn.head.3", "kind": "mean"}]  # the planted head of gpt2-injection


@pytest.fixture(scope="module")
def agent_run(tmp_path_factory: pytest.TempPathFactory):
    from model_forensics.scenarios import get

    return get("tool-misuse").record(tmp_path_factory.mktemp("agent"))


def test_replay_with_a_fix_says_what_the_agent_would_issue_and_never_touches_the_database(
    agent_run, tmp_path: Path
) -> None:
    database = Path(agent_run.artifacts["database"])
    before = (database.read_bytes(), database.stat().st_mtime_ns)
    fix = tmp_path / "analysis.json"
    fix.write_text(json.dumps({"fix_set": {"interventions": HEAD_FIX}}))
    incident = str(agent_run.incidents[0])
    plain = runner.invoke(app, ["replay", incident], env={"COLUMNS": "250"})
    assert plain.exit_code == 0, plain.output
    assert "the replayed agent would issue: DELETE FROM users (destructive)" in plain.output
    fixed = runner.invoke(app, ["replay", incident, "--fix", str(fix)], env={"COLUMNS": "250"})
    assert fixed.exit_code == 0, fixed.output
    assert "with the fix the agent would issue: INSERT INTO summaries" in fixed.output
    assert "(not destructive)" in fixed.output
    assert (database.read_bytes(), database.stat().st_mtime_ns) == before


def test_analyze_on_the_agent_incident_answers_with_the_fixed_agents_call(agent_run, tmp_path: Path) -> None:
    from unittest import mock

    from model_forensics.rca.pipeline import Analysis
    from model_forensics.scenarios.agent import fixed_agent_call

    call = fixed_agent_call(agent_run.incidents[0], HEAD_FIX)
    assert call is not None and not call.destructive and call.statement.startswith("INSERT INTO summaries")
    # analyze's search itself is tested in tests/rca; here only what it adds for an agent step.
    found = Analysis(str(agent_run.incidents[0]), {}, {}, {"interventions": HEAD_FIX}, 0, 0.0)
    out = tmp_path / "analysis.json"
    with mock.patch("model_forensics.rca.pipeline.analyze_bundle", return_value=found):
        res = runner.invoke(app, ["analyze", str(agent_run.incidents[0]), "--json", "--out", str(out)])
    assert res.exit_code == 0, res.output
    agent = json.loads(out.read_text())["agent_with_fix"]
    assert agent["destructive"] is False and agent["statement"] == call.statement
    assert agent["call"] == str(call) and str(call).endswith("(not destructive)")
