"""docs/security.md section 2 and the README's "Bundles from someone else" run as written:
keygen, a signed record, info, verify with the trusted key, an isolated replay, and the
Python snippet."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from model_forensics.cli import app

ROOT = Path(__file__).parents[2]
DOC = ROOT / "docs" / "security.md"


def _section(title: str, doc: Path = DOC) -> str:
    text = doc.read_text()
    start = text.index(title)
    return text[start : text.index("\n## ", start + 1)]


def _blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def _commands(block: str) -> list[list[str]]:
    joined = block.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("doc", "title"),
    [(DOC, "## 2. Checking a bundle someone sent you"), (ROOT / "README.md", "## Bundles from someone else")],
)
def test_checking_a_bundle_runs_as_written(
    doc: Path, title: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from model_forensics.replay.isolation import isolation_problem

    section = _section(title, doc)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    commands = [c for block in _blocks(section, "bash") for c in _commands(block)]
    assert [c[:3] for c in commands][:2] == [
        ["model-forensics", "bundle", "keygen"],
        ["model-forensics", "record", "--model"],
    ]
    for command in commands:
        args = command[1:]
        if "--isolate" in args and isolation_problem() is not None:
            args.remove("--isolate")  # the doc's isolated step, minus what this machine cannot do
        result = runner.invoke(app, args)
        assert result.exit_code == 0, f"{shlex.join(command)}\n{result.output}"
    info = runner.invoke(app, ["bundle", "info", "incident"]).output
    assert "sha256:" in info and "signed by ed25519:" in info
    for snippet in _blocks(section, "python"):
        exec(compile(snippet, str(doc), "exec"), {})
