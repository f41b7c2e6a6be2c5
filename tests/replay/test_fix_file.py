"""`replay --fix analysis.json`: a saved fix set applied to its incident (CLI and Python),
the fix file read as hostile input, and RunResult.gates (whether each gate opened)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from model_forensics import ForensicsError, Gate, Intervention, SandboxReplayer
from model_forensics.cli import app
from model_forensics.replay.loading import read_fix_file
from model_forensics.scenarios import get

runner = CliRunner()
FIX = [Intervention("blocks.1.attn.head.5", "mean"), Intervention("blocks.1.attn.head.2", "mean")]


@pytest.fixture(scope="module")
def incident(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bert-sentiment-bypass incident-0 (the trigger flips the sentiment to positive)."""
    scenario = get("bert-sentiment-bypass")
    small = dataclasses.replace(
        scenario, variants=scenario.variants[:4], benign=scenario.benign[:4], baseline=scenario.baseline[:4]
    )
    return small.record(tmp_path_factory.mktemp("bert"), limit=1).incidents[0]


@pytest.fixture(scope="module")
def session(incident: Path):
    return SandboxReplayer().load_bundle(incident)


def _analysis(path: Path, interventions: list[Intervention], bundle: Path) -> Path:
    """A file shaped like `analyze --out`: the fix set's interventions as Intervention.to_json()."""
    fix_set = {"interventions": [iv.to_json() for iv in interventions], "total_flip_rate": 1.0}
    path.write_text(json.dumps({"bundle": str(bundle), "anomalies": {}, "ranking": {}, "fix_set": fix_set}))
    return path


def _gate(session, offset: float) -> Gate:
    """A gate on blocks.0.resid_post whose threshold sits ``offset`` above the incident's score."""
    from model_forensics.rca.runs import capture

    clean = capture(session, session.inputs, "layer", ["blocks.0.resid_post"])["blocks.0.resid_post"].double()
    u = torch.randn(clean.shape[-1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    score = float((clean @ (u / u.norm()))[-1])
    return Gate("blocks.0.resid_post", tuple(u.tolist()), score + offset)


def test_read_fix_file_gives_back_the_interventions_exactly(session, incident: Path, tmp_path: Path) -> None:
    gated = dataclasses.replace(FIX[0], gate=_gate(session, -1e-3), direction=tuple([0.5] * 64))
    fix = [gated, FIX[1]]
    assert read_fix_file(_analysis(tmp_path / "a.json", fix, incident)) == fix
    alone = tmp_path / "fix_set.json"
    alone.write_text(json.dumps({"interventions": [iv.to_json() for iv in fix]}))
    assert read_fix_file(alone) == fix


def test_replay_fix_shows_recorded_and_fixed_output_and_the_verdict(incident: Path, tmp_path: Path) -> None:
    analysis = _analysis(tmp_path / "analysis.json", FIX, incident)
    res = runner.invoke(app, ["replay", str(incident), "--fix", str(analysis)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "recorded prediction │ 1" in res.output and "fixed prediction    │ 0" in res.output
    assert "no longer holds (the fix removes the failure)" in res.output
    data = json.loads(runner.invoke(app, ["replay", str(incident), "--fix", str(analysis), "--json"]).output)
    assert data["recorded_failed"] is True and data["run"]["failed"] is False
    assert [iv["site"] for iv in data["run"]["interventions"]] == [iv.site for iv in FIX]


def test_a_fix_that_does_not_help_says_the_predicate_still_holds(incident: Path, tmp_path: Path) -> None:
    analysis = _analysis(tmp_path / "analysis.json", [Intervention("blocks.0.mlp", "scale", value=1.0)], incident)
    res = runner.invoke(app, ["replay", str(incident), "--fix", str(analysis)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "still holds (the fix does not remove the failure)" in res.output


def test_gates_say_whether_they_opened(session) -> None:
    fix = Intervention("blocks.1.attn.head.5", "mean")
    opened = session.run([dataclasses.replace(fix, gate=_gate(session, -1e-3))])
    closed = session.run([dataclasses.replace(fix, gate=_gate(session, +1e-3))])
    assert opened.gates == {"blocks.1.attn.head.5": True} and opened.to_json()["gates"] == opened.gates
    assert closed.gates == {"blocks.1.attn.head.5": False}
    assert torch.equal(closed.logits, session.run([]).logits)  # closed: the run is left unchanged
    assert session.run([fix]).gates == {}  # no gate, nothing to report
    swept = session.sweep([list(opened.interventions), list(closed.interventions)])
    assert [r.gates for r in swept] == [opened.gates, closed.gates]


def test_replay_fix_shows_each_gate(incident: Path, session, tmp_path: Path) -> None:
    gated = [dataclasses.replace(iv, gate=_gate(session, -1e-3)) for iv in FIX[:1]]
    analysis = _analysis(tmp_path / "analysis.json", gated, incident)
    res = runner.invoke(app, ["replay", str(incident), "--fix", str(analysis)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "blocks.1.attn.head.5: opened (the fix applied)" in res.output


BAD = [
    (b"\xff\xfe", "is not UTF-8"),
    (b"{", "is not valid JSON"),
    (b'{"fix_set": {"interventions": [{"site": "x", "value": NaN}]}}', "not valid JSON"),
    (b"[]", "holds no fix set"),
    (b'{"fix_set": null}', "holds no fix set"),
    (b'{"fix_set": {"interventions": []}}', "holds no fix set"),
    (b'{"fix_set": {"interventions": ["blocks.0.mlp:zero"]}}', "intervention 0 is a str"),
    (b'{"fix_set": {"interventions": [{"site": "blocks.0.mlp", "rm": 1}]}}', "unknown keys ['rm']"),
    (b'{"fix_set": {"interventions": [{"site": 3}]}}', "'site' cannot be int"),
    (b'{"fix_set": {"interventions": [{"kind": "zero"}]}}', "has no 'site'"),
    (b'{"fix_set": {"interventions": [{"site": "a", "kind": "explode"}]}}', "kind 'explode' is unknown"),
    (b'{"fix_set": {"interventions": [{"site": "a", "heads": [1, "2"]}]}}', "list of integers"),
    (b'{"fix_set": {"interventions": [{"site": "a", "kind": "scale", "value": true}]}}', "'value' cannot be bool"),
    (b'{"fix_set": {"interventions": [{"site": "a", "gate": {"site": "b"}}]}}', "its gate must be"),
    (b'{"fix_set": {"interventions": [{"site": "a", "direction": [1, 1e999]}]}}', "list of finite numbers"),
    (b"[" * 100_000 + b"]" * 100_000, "nests too deeply"),
]


@pytest.mark.parametrize(("raw", "message"), BAD)
def test_a_hostile_fix_file_is_one_clear_error(raw: bytes, message: str, tmp_path: Path) -> None:
    file = tmp_path / "fix.json"
    file.write_bytes(raw)
    with pytest.raises(ForensicsError, match="fix file") as caught:
        read_fix_file(file)
    assert message in str(caught.value)


def test_cli_refuses_a_bad_fix_file_before_loading_the_model(incident: Path, tmp_path: Path) -> None:
    for args in (
        ["--fix", str(tmp_path / "missing.json")],
        ["--fix", str(_bad := tmp_path / "bad.json")],
    ):
        _bad.write_text('{"fix_set": {"interventions": [{"site": 3}]}}')
        res = runner.invoke(app, ["replay", str(incident), *args])
        assert res.exit_code == 2, res.output
        assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
        assert "fix file" in res.output
    unknown = _analysis(tmp_path / "unknown.json", [Intervention("blocks.9.mlp", "zero")], incident)
    res = runner.invoke(app, ["replay", str(incident), "--fix", str(unknown)])
    assert res.exit_code == 2 and "blocks.9.mlp" in res.output and "Traceback" not in res.output
