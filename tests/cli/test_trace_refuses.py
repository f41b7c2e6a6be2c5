"""`trace` refuses an existing output, as the README says, unless --overwrite is given."""

import json
from pathlib import Path

from typer.testing import CliRunner

from model_forensics.cli import app

runner = CliRunner()
TRACE = ["trace", "--model", "zoo:gpt2-injection", "--prompt", "translate: moon glass =>"]


def test_trace_refuses_an_existing_output(tmp_path: Path) -> None:
    out = tmp_path / "cube.json"
    out.write_text("my notes")
    res = runner.invoke(app, [*TRACE, "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert "already exists" in res.output and "--overwrite" in res.output
    assert "Traceback" not in res.output
    assert out.read_text() == "my notes"


def test_trace_overwrite_replaces_the_output(tmp_path: Path) -> None:
    out = tmp_path / "cube.json"
    assert runner.invoke(app, [*TRACE, "--out", str(out)]).exit_code == 0
    first = json.loads(out.read_text())
    res = runner.invoke(app, [*TRACE, "--out", str(out), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["tokens"] == first["tokens"]
    assert runner.invoke(app, [*TRACE, "--out", str(out)]).exit_code == 2
