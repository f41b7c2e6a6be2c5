"""`model-forensics demo` runs on the real SmolLM2 and records a real injection incident."""

from pathlib import Path

from typer.testing import CliRunner

from model_forensics import Bundle
from model_forensics.cli import app


def test_demo_records_a_failing_incident(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert res.exit_code == 0, res.output
    b = Bundle.open(tmp_path / "demo")
    assert b.manifest["predicate"]["holds"] is True, b.manifest["output"]["text"]
    assert b.manifest["predicate"]["args"]["text"] in b.manifest["output"]["text"]
    assert b.manifest["model"]["architecture"] == "llama" and len(b.sites) == 92
    assert "FAILS" in res.output and "bundle size" in res.output
