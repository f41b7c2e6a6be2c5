"""Every CLI command turns a bad value into one stderr line and exit code 2, before any work:
no model is loaded and nothing is written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from model_forensics.cli import app

runner = CliRunner()

# (command line, fragment of the one error line). Placeholders: {model} a word-model
# directory, {bundle} a recorded bundle, {bundles} a directory of bundles, {tmp} an empty
# scratch directory holding {file} (a plain file), {yaml} (a config with an unknown key),
# {data} (a JSONL data file), {binary} (random bytes), {tmp}/k.key and {tmp}/k.pub (a key pair).
RECORD = ["record", "-m", "{model}", "-p", "w3 w4 w5"]
INSPECT = ["inspect", "-m", "{model}", "--data", "{data}"]
CASES = [
    # record
    ([*RECORD, "-o", "{tmp}/out", "--granularity", "bogus"], "'bogus' is not one of 'layer', 'head'"),
    ([*RECORD, "-o", "{tmp}/out", "--sketch", "zip"], "'zip' is not one of 'full'"),
    ([*RECORD, "-o", "{tmp}/out", "--max-new-tokens", "-1"], "Invalid value for '--max-new-tokens'"),
    ([*RECORD, "-o", "{tmp}/out", "--max-new-tokens", "many"], "Invalid value for '--max-new-tokens'"),
    ([*RECORD, "-o", "{tmp}/out", "--predicate", "nonsense"], "KIND:VALUE"),
    ([*RECORD, "-o", "{tmp}/out", "--predicate", "regex:(unclosed"], "is not a valid regex"),
    ([*RECORD, "-o", "{tmp}/out", "--predicate", "contains:"], "has an empty value"),
    ([*RECORD, "-o", "{tmp}/out", "--config", "{tmp}/none.yaml"], "config file '{tmp}/none.yaml' does not exist"),
    ([*RECORD, "-o", "{tmp}/out", "--config", "{yaml}"], "unknown key 'recorder.nope'"),
    ([*RECORD, "-o", "{tmp}/out", "--config", "{binary}"], "is not UTF-8 (byte 0)"),
    ([*RECORD, "-o", "{tmp}/out", "--predicate", "token_is:-5"], "names a negative index"),
    ([*RECORD, "-o", "{tmp}/out", "--sign-key", "{tmp}/none.key"], "key file '{tmp}/none.key' does not exist"),
    ([*RECORD, "-o", "{tmp}/out", "--sign-key", "{tmp}/k.pub"], "is not an unencrypted ed25519 private key"),
    ([*RECORD, "-o", "."], "'.' cannot be a bundle path"),
    ([*RECORD, "-o", "{file}"], "already exists"),
    ([*RECORD, "-o", "{file}", "--overwrite"], "is not a model-forensics bundle"),
    ([*RECORD, "-o", "{tmp}/missing/out"], "'{tmp}/missing' does not exist"),
    ([*RECORD, "-o", "{file}/out"], "is not a directory"),
    ([*RECORD, "-o", "{bundle}"], "already exists; choose another path"),
    (["record", "-m", "{model}", "-p", " ", "-o", "{tmp}/out"], "--prompt is empty"),
    (["record", "-m", "{model}", "-p", "w3"], "Missing option '--out'"),
    ([*RECORD, "-o", "{tmp}/out", "--no-such-option"], "No such option: --no-such-option"),
    # trace
    (["trace", "-m", "{model}", "-p", "w3", "-o", "{tmp}"], "it is a directory"),
    (["trace", "-m", "{model}", "-p", "w3", "-o", "{tmp}/missing/cube.json"], "'{tmp}/missing' does not exist"),
    (["trace", "-m", "{model}", "-p", "", "-o", "{tmp}/cube.json"], "--prompt is empty"),
    (["trace", "-m", "{model}", "-o", "{tmp}/cube.json"], "Missing option '--prompt'"),
    # replay
    (["replay", "{bundle}", "-i", "blocks.0.mlp"], "needs the form SITE:KIND"),
    (["replay", "{bundle}", "-i", "blocks.0.mlp:scale=big"], "blocks.0.mlp:scale=big"),
    (["replay", "{tmp}/none"], "bundle '{tmp}/none' does not exist"),
    (["replay", "{bundle}", "--verify=yes"], "does not take a value"),
    (["replay"], "Missing argument"),
    # analyze
    (["analyze", "{bundle}", "--baseline", "{tmp}/none"], "--baseline bundle '{tmp}/none' does not exist"),
    (["analyze", "{bundle}", "--config", "{tmp}/none.yaml"], "does not exist"),
    (["analyze", "{bundle}", "--strategy", "exhaustiv"], "unknown search strategy 'exhaustiv'"),
    (["analyze", "{bundle}", "--gating", "sometimes"], "'auto', 'always' or 'never'"),
    (["analyze", "{bundle}", "--out", "{tmp}/missing/a.json"], "name a file in an existing directory"),
    (["analyze", "{bundle}", "--report", "{tmp}"], "cannot write --report '{tmp}': it is a directory"),
    (["analyze", "{tmp}/none"], "bundle '{tmp}/none' does not exist"),
    (["analyze", "{bundle}", "--config", "{binary}"], "is not UTF-8 (byte 0)"),
    # batch
    (["batch", "{bundles}", "--workers", "0"], "Invalid value for '--workers'"),
    (["batch", "{tmp}/none"], "is not a directory of bundles"),
    (["batch", "{bundles}", "--config", "{tmp}/none.yaml"], "does not exist"),
    (["batch", "{bundles}", "--out", "{tmp}/missing/b.json"], "'{tmp}/missing' does not exist"),
    # triage
    (["triage", "{bundles}", "--workers", "-1"], "Invalid value for '--workers'"),
    (["triage", "{tmp}"], "holds no bundles"),
    (["triage", "{bundles}", "--config", "{yaml}"], "unknown key 'recorder.nope'"),
    # inspect
    (["inspect", "-m", "{model}", "--data", "{tmp}/none.jsonl"], "data file '{tmp}/none.jsonl' does not exist"),
    (["inspect", "-m", "{model}", "--data", "{binary}"], "data file '{binary}' is not UTF-8"),
    ([*INSPECT, "--reference", "{tmp}/none.jsonl"], "does not exist"),
    ([*INSPECT, "--batch-size", "0"], "Invalid value for '--batch-size'"),
    ([*INSPECT, "--max-length", "0"], "Invalid value for '--max-length'"),
    ([*INSPECT, "--seed", "-3"], "Invalid value for '--seed'"),
    ([*INSPECT, "--experiments", "sparsity,nope"], "unknown experiment(s) 'nope'"),
    ([*INSPECT, "--experiments", ","], "--experiments selects nothing"),
    ([*INSPECT, "--figures", "gif"], "unknown format 'gif'"),
    ([*INSPECT, "--out", "{file}"], "exists and is not a directory"),
    # demo
    (["demo", "--out", "."], "'.' cannot be a bundle path"),
    (["demo", "--out", "{file}"], "is not a model-forensics bundle"),
    (["demo", "--out", "{tmp}/missing/demo"], "'{tmp}/missing' does not exist"),
    (["demo", "--model", "x"], "No such option: --model"),
    # scenarios
    (["scenarios", "list", "--json=1"], "does not take a value"),
    (["scenarios", "list", "extra"], "unexpected extra argument"),
    (["scenarios", "list", "--verbose"], "No such option: --verbose"),
    (["scenarios", "run", "nope", "--out", "{tmp}/runs"], "unknown scenario 'nope'"),
    (["scenarios", "run", "gpt2-injection", "--out", "{tmp}/runs", "--incidents", "0"], "'--incidents'"),
    (["scenarios", "run", "gpt2-injection", "--out", "{tmp}/runs", "--incidents", "-1"], "'--incidents'"),
    (["scenarios", "run", "gpt2-injection", "--out", "{file}"], "exists and is not a directory"),
    (["scenarios", "run", "gpt2-injection"], "Missing option '--out'"),
    (["scenarios", "nope"], "No such command 'nope'"),
    # bundle info
    (["bundle", "info", "{tmp}/none"], "bundle '{tmp}/none' does not exist"),
    (["bundle", "info", "{file}"], "is neither a bundle directory nor a valid .mfb.zip"),
    (["bundle", "info", "{tmp}"], "has no manifest.json"),
    (["bundle", "info"], "Missing argument"),
    # bundle verify
    (["bundle", "verify", "{bundle}", "--model", "{model}"], "--model only applies with --replay"),
    (["bundle", "verify", "{bundle}", "--isolate"], "--isolate only applies with --replay"),
    (["bundle", "verify", "{bundle}", "--allow-weight-mismatch"], "only applies with --replay"),
    (["bundle", "verify", "{bundle}", "--trusted-key", "{tmp}/none.pub"], "key file '{tmp}/none.pub' does not exist"),
    (["bundle", "verify", "{bundle}", "--trusted-key", "{file}"], "is not an ed25519 public key"),
    (["bundle", "verify", "{tmp}/none"], "does not exist"),
    # bundle keygen
    (["bundle", "keygen", "{tmp}/k"], "already exists; choose another name"),
    (["bundle", "keygen", "{tmp}/missing/k"], "'{tmp}/missing' does not exist"),
    (["bundle", "keygen", ""], "names no file"),
    (["bundle", "keygen"], "Missing argument"),
    # bundle sign
    (["bundle", "sign", "{bundle}", "--key", "{tmp}/none.key"], "key file '{tmp}/none.key' does not exist"),
    (["bundle", "sign", "{bundle}", "--key", "{tmp}/k.pub"], "is not an unencrypted ed25519 private key"),
    (["bundle", "sign", "{tmp}/none", "--key", "{tmp}/k.key"], "bundle '{tmp}/none' does not exist"),
    (["bundle", "sign", "{bundle}"], "Missing option '--key'"),
]


@pytest.fixture()
def places(word_models, pristine, tmp_path: Path) -> dict[str, str]:
    from model_forensics.core.signing import generate_key

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "file").write_text("not a bundle")
    (scratch / "bad.yaml").write_text("recorder:\n  nope: 1\n")
    (scratch / "data.jsonl").write_text('{"text": "w3 w4 w5"}\n')
    (scratch / "binary").write_bytes(bytes(range(128, 256)))
    generate_key(scratch / "k")
    bundles = tmp_path / "bundles"
    shutil.copytree(pristine["forward"], bundles / "forward")
    return {
        "model": str(word_models["llama"].ref.reference),
        "bundle": str(bundles / "forward"),
        "bundles": str(bundles),
        "tmp": str(scratch),
        "file": str(scratch / "file"),
        "yaml": str(scratch / "bad.yaml"),
        "data": str(scratch / "data.jsonl"),
        "binary": str(scratch / "binary"),
    }


@pytest.fixture()
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every way a command loads a model, replaced by one that records the call and refuses."""
    import model_forensics.models
    import model_forensics.models.loading
    import model_forensics.replay.session
    from model_forensics import cli

    loads: list[str] = []

    def refuse(reference: object, *args: object, **kwargs: object) -> None:
        loads.append(str(reference))
        raise AssertionError(f"a model was loaded ({reference}) before the bad input was reported")

    for module in (cli,):
        monkeypatch.setattr(module, "_load", refuse)
    for module in (model_forensics.models, model_forensics.models.loading, model_forensics.replay.session):
        monkeypatch.setattr(module, "load", refuse)
    monkeypatch.setattr(model_forensics.models.loading, "load_directory", refuse)
    return loads


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize(("args", "fragment"), CASES, ids=[" ".join(a)[:70] for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_before_any_work(
    args: list[str], fragment: str, places: dict[str, str], no_model_loads: list[str], tmp_path: Path
) -> None:
    before = _tree(tmp_path)
    res = runner.invoke(app, [a.format(**places) for a in args])
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1, res.stderr
    assert fragment.format(**places) in lines[0]
    assert lines[0].startswith("error: ")
    assert "Traceback" not in res.output and res.stdout.strip() == ""
    assert no_model_loads == []
    assert _tree(tmp_path) == before  # nothing written, nothing touched


def test_every_command_has_at_least_three_bad_inputs() -> None:
    commands = {"record", "replay", "analyze", "batch", "triage", "inspect", "trace", "demo"}
    commands |= {"scenarios list", "scenarios run", "bundle info", "bundle verify", "bundle keygen", "bundle sign"}
    counts = {c: sum(" ".join(a).startswith(c + " ") or " ".join(a) == c for a, _ in CASES) for c in commands}
    assert all(n >= 3 for n in counts.values()), counts


def test_help_still_works() -> None:
    for args in (["--help"], ["record", "--help"], ["bundle", "verify", "--help"], ["bundle", "keygen", "--help"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        assert "Usage" in res.output


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    # env: the runner restores the variable --debug sets, so later tests run without it
    res = runner.invoke(app, ["--debug", "bundle", "info", str(tmp_path / "none")], env={"MODEL_FORENSICS_DEBUG": "0"})
    assert res.exit_code != 0
    assert type(res.exception).__name__ == "BundleError"
