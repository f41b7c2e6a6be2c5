"""Values from a bundle are data, not terminal markup: rich markup prints literally and
control characters print as escapes (``\\x1b``), in tables, success lines and errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hostile import edit_manifest
from typer.testing import CliRunner

from model_forensics import cli
from model_forensics.cli import app

runner = CliRunner()

MARKUP = "[bold red]PWNED[/]"
LINK = "[link=file:///etc/passwd]x[/link]"
CONTROL = "\x1b[2J\x1b]0;title\x07"
SHOWN_CONTROL = "\\x1b[2J\\x1b]0;title\\x07"
DIRNAME = "[bold red]PWNED\x1b[31m"  # markup and ESC in a directory name (no slash)
SHOWN_DIRNAME = "[bold red]PWNED\\x1b[31m"
RAW = ("\x1b", "\x07", "\r", "\x9b", "\u202e")


@pytest.fixture(autouse=True)
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wide consoles, so a table never wraps one of the strings looked for."""
    monkeypatch.setattr(cli.console, "width", 400)
    monkeypatch.setattr(cli.err, "width", 400)


def _no_raw_controls(text: str) -> None:
    for char in RAW:
        assert char not in text, f"raw {char!r} reached the terminal"


def _hostile(manifest: dict) -> None:
    manifest["name"] = f"{MARKUP}{CONTROL}"
    manifest["model"]["name"] = LINK
    manifest["model"]["class"] = "Llama\rForCausalLM\x9b31m"
    manifest["input"]["text"] = f"{MARKUP} \u202eevil"
    manifest["output"]["text"] = f"{LINK}{CONTROL}"
    manifest["predicate"]["args"]["text"] = MARKUP
    manifest["dropped_sites"] = [f"blocks.9.{MARKUP}"]
    manifest["partial"] = {f"blocks.8.{LINK}": f"hook failed: {CONTROL}"}


def test_bundle_info_shows_every_value_literally(fresh) -> None:
    bundle = fresh("generate")
    edit_manifest(bundle, _hostile)
    res = runner.invoke(app, ["bundle", "info", str(bundle)])
    assert res.exit_code == 0, res.output
    out = res.output
    _no_raw_controls(out)
    assert f"incident bundle {MARKUP}{SHOWN_CONTROL}" in out
    assert LINK in out and "Llama\\rForCausalLM\\x9b31m" in out
    assert f"{MARKUP} \\u202eevil" in out
    assert f"{LINK}{SHOWN_CONTROL}" in out
    assert f"contains('{MARKUP}')" in out
    assert f"blocks.9.{MARKUP}" in out
    assert f"blocks.8.{LINK}: hook failed: {SHOWN_CONTROL}" in out


def test_replay_shows_the_recorded_output_and_path_literally(fresh, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(fresh("generate"), tmp_path / DIRNAME))
    edit_manifest(bundle, lambda m: m["output"].update(text=f"{MARKUP}{CONTROL}"))
    res = runner.invoke(app, ["replay", str(bundle), "--no-verify"])
    assert res.exit_code == 0, res.output
    _no_raw_controls(res.output)
    squeezed = "".join(res.output.split())  # the title wraps to the table's width
    assert "".join(f"replay of {tmp_path}/{SHOWN_DIRNAME}".split()) in squeezed
    assert f"{MARKUP}{SHOWN_CONTROL}" in res.output


def test_bundle_verify_shows_paths_and_problems_literally(fresh, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(fresh("forward"), tmp_path / DIRNAME))
    res = runner.invoke(app, ["bundle", "verify", str(bundle)])
    assert res.exit_code == 0, res.output
    _no_raw_controls(res.output)
    assert f"{tmp_path}/{SHOWN_DIRNAME}: schema ok" in res.output

    def rename_a_site(manifest: dict) -> None:
        first = next(iter(manifest["sites"]))
        manifest["sites"][f"{MARKUP}{CONTROL}"] = manifest["sites"].pop(first)

    edit_manifest(bundle, rename_a_site)
    res = runner.invoke(app, ["bundle", "verify", str(bundle)])
    assert res.exit_code == 2
    _no_raw_controls(res.output)
    assert MARKUP in res.stdout  # the problem list names the site as written
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "failed verification" in lines[0] and MARKUP in lines[0]


def test_an_error_that_echoes_a_bundle_value_is_one_literal_line(fresh) -> None:
    bundle = fresh("forward")
    reference = f"/no/such/{MARKUP}{CONTROL}\nsecond line"
    edit_manifest(bundle, lambda m: m["model"].update(reference=reference))
    res = runner.invoke(app, ["replay", str(bundle)])
    assert res.exit_code == 2, res.output
    _no_raw_controls(res.output)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert f"/no/such/{MARKUP}{SHOWN_CONTROL}" in lines[0] and "Traceback" not in res.output


def test_an_error_that_echoes_user_input_is_one_literal_line(pristine) -> None:
    res = runner.invoke(app, ["replay", str(pristine["forward"]), "-i", f"{MARKUP}{CONTROL}"])
    assert res.exit_code == 2
    _no_raw_controls(res.output)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"intervention '{MARKUP}{SHOWN_CONTROL}'" in lines[0]
