"""Trust on the command line: content digests, ed25519 signatures (keygen, record
--sign-key, sign, verify --trusted-key) and --isolate."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import struct
import sys
import types
from pathlib import Path

import pytest
from hostile import edit_manifest
from replay_models import PROMPT
from typer.testing import CliRunner

from model_forensics import cli
from model_forensics.cli import app
from model_forensics.core.bundle import Bundle, file_sha256

runner = CliRunner()
DIGEST = re.compile(r"digest\s+(sha256:[0-9a-f]{64})")


@pytest.fixture(autouse=True)
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli.console, "width", 250)


def _keygen(folder: Path, name: str) -> tuple[Path, Path, str]:
    res = runner.invoke(app, ["bundle", "keygen", str(folder / name)])
    assert res.exit_code == 0, res.output
    fingerprint = re.search(r"ed25519:[0-9a-f]{16}", res.stdout)
    assert fingerprint is not None, res.stdout
    return folder / f"{name}.key", folder / f"{name}.pub", fingerprint.group(0)


def _digest(*args: str) -> str:
    res = runner.invoke(app, list(args))
    assert res.exit_code == 0, res.output
    found = DIGEST.search(res.stdout)
    assert found is not None, res.stdout
    return found.group(1)


def _verify(bundle: Path, *extra: str):
    return runner.invoke(app, ["bundle", "verify", str(bundle), *extra])


def _error(res) -> str:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.fixture()
def alice(tmp_path: Path) -> tuple[Path, Path, str]:
    return _keygen(tmp_path, "alice")


@pytest.fixture()
def signed(word_models, alice, tmp_path: Path) -> Path:
    """A bundle recorded through the CLI, signed by alice as it was written."""
    out = tmp_path / "signed"
    model_dir = word_models["llama"].ref.reference
    res = runner.invoke(app, ["record", "-m", model_dir, "-p", PROMPT, "-o", str(out), "--sign-key", str(alice[0])])
    assert res.exit_code == 0, res.output
    assert f"signed by {alice[2]}" in res.stdout
    return out


def test_a_recorded_signed_bundle_verifies_against_its_key(signed, alice) -> None:
    res = _verify(signed, "--trusted-key", str(alice[1]))
    assert res.exit_code == 0, res.output
    assert "match their digests (blake3)" in res.stdout
    assert f"signed by {alice[2]}, the trusted key" in res.stdout
    assert DIGEST.search(res.stdout).group(1) == Bundle.open(signed).digest


def _flip_a_logit_bit(bundle: Path) -> None:
    """Change the lowest mantissa byte of the first recorded logit, then re-hash the file
    into the manifest: every checksum agrees, only the signature can tell."""
    file = bundle / "outputs.safetensors"
    data = bytearray(file.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    begin = header["logits"]["data_offsets"][0]
    data[8 + length + begin] ^= 1
    file.write_bytes(bytes(data))

    def rehash(manifest: dict) -> None:
        manifest["files"]["outputs.safetensors"] = {"sha256": file_sha256(file), "bytes": file.stat().st_size}

    edit_manifest(bundle, rehash)


def test_a_self_consistent_tamper_changes_the_digest_and_breaks_the_signature(signed, alice) -> None:
    before = _digest("bundle", "info", str(signed))
    _flip_a_logit_bit(signed)
    assert Bundle.open(signed).verify_contents() == []  # the tamper is self-consistent
    after = _digest("bundle", "info", str(signed))
    assert after != before
    for extra in ([], ["--trusted-key", str(alice[1])]):
        res = _verify(signed, *extra)
        assert res.exit_code == 2, res.output
        assert "changed after signing" in _error(res)


def test_a_bundle_signed_by_another_key_fails_against_the_trusted_key(fresh, alice, tmp_path: Path) -> None:
    bob_key, _, bob = _keygen(tmp_path, "bob")
    bundle = fresh("forward")
    res = runner.invoke(app, ["bundle", "sign", str(bundle), "--key", str(bob_key)])
    assert res.exit_code == 0, res.output
    assert bob in res.stdout
    res = _verify(bundle, "--trusted-key", str(alice[1]))
    assert res.exit_code == 2
    assert f"signed by {bob}, not by the trusted key {alice[2]}" in _error(res)
    res = _verify(bundle)  # without a trusted key: reported, not trusted
    assert res.exit_code == 0, res.output
    assert f"signed by {bob}, not checked against a trusted key" in res.stdout


def test_an_unsigned_bundle_fails_with_a_trusted_key(pristine, alice) -> None:
    res = _verify(pristine["forward"], "--trusted-key", str(alice[1]))
    assert res.exit_code == 2
    assert "is not signed" in _error(res)
    res = _verify(pristine["forward"])
    assert res.exit_code == 0 and "unsigned" in res.stdout


def test_info_and_verify_print_one_digest_that_copies_share(pristine, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(pristine["generate"], tmp_path / "copy"))
    digest = _digest("bundle", "info", str(pristine["generate"]))
    assert digest == _digest("bundle", "verify", str(pristine["generate"]))
    assert digest == _digest("bundle", "info", str(copy)) == _digest("bundle", "verify", str(copy))
    assert digest == Bundle.open(copy).digest


@pytest.mark.parametrize(
    ("kind", "field", "edit"),
    [
        ("forward", "predicate.holds", lambda m: m["predicate"].update(holds=not m["predicate"]["holds"])),
        ("generate", "predicate.holds", lambda m: m["output"].update(text="an answer without the target")),
    ],
    ids=["predicate.holds", "output.text"],
)
def test_editing_the_recorded_verdict_fails_verify_and_changes_the_digest(fresh, kind, field, edit) -> None:
    bundle = fresh(kind)
    before = _digest("bundle", "info", str(bundle))
    edit_manifest(bundle, edit)
    res = _verify(bundle)
    assert res.exit_code == 2
    assert "failed verification" in _error(res) and field in res.stdout
    assert _digest("bundle", "info", str(bundle)) != before


def test_keygen_never_overwrites_a_key(alice, tmp_path: Path) -> None:
    before = alice[0].read_bytes()
    res = runner.invoke(app, ["bundle", "keygen", str(tmp_path / "alice")])
    assert res.exit_code == 2 and "already exists" in _error(res)
    assert alice[0].read_bytes() == before


def test_sign_refuses_an_inconsistent_bundle(fresh, alice) -> None:
    bundle = fresh("forward")
    edit_manifest(bundle, lambda m: m["predicate"].update(holds=not m["predicate"]["holds"]))
    res = runner.invoke(app, ["bundle", "sign", str(bundle), "--key", str(alice[0])])
    assert res.exit_code == 2 and "refusing to sign" in _error(res)
    assert not (bundle / "signature.json").exists()


# -- --isolate ------------------------------------------------------------------------------------
def _fake_isolation(monkeypatch: pytest.MonkeyPatch, problem: str | None) -> list[list[str]]:
    """Stand-in for model_forensics.replay.isolation: records the command line it is given."""
    runs: list[list[str]] = []

    def run_isolated(argv: list[str], timeout: float | None = None) -> int:
        runs.append(argv)
        return 0

    fake = types.ModuleType("model_forensics.replay.isolation")
    fake.isolation_problem = lambda: problem  # type: ignore[attr-defined]
    fake.run_isolated = run_isolated  # type: ignore[attr-defined]
    import model_forensics.replay

    monkeypatch.setitem(sys.modules, "model_forensics.replay.isolation", fake)
    monkeypatch.setattr(model_forensics.replay, "isolation", fake, raising=False)
    return runs


def test_isolate_reruns_the_same_command_without_isolate(monkeypatch, pristine) -> None:
    runs = _fake_isolation(monkeypatch, None)
    path = str(pristine["forward"])
    res = runner.invoke(app, ["replay", path, "--isolate", "-i", "embed:zero", "--json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["bundle", "verify", path, "--replay", "--isolate"])
    assert res.exit_code == 0, res.output
    assert runs == [["replay", path, "-i", "embed:zero", "--json"], ["bundle", "verify", path, "--replay"]]


def test_isolate_where_it_cannot_run_is_one_line_exit_2(monkeypatch, pristine) -> None:
    runs = _fake_isolation(monkeypatch, "unprivileged user namespaces are disabled")
    res = runner.invoke(app, ["replay", str(pristine["forward"]), "--isolate"])
    assert res.exit_code == 2
    assert "unprivileged user namespaces are disabled" in _error(res)
    assert runs == []


@pytest.mark.skipif(
    importlib.util.find_spec("model_forensics.replay.isolation") is None, reason="isolation module not installed"
)
def test_isolated_replay_runs_for_real(pristine, capfd) -> None:
    from model_forensics.replay import isolation

    if isolation.isolation_problem() is not None:
        pytest.skip(isolation.isolation_problem())
    res = runner.invoke(app, ["replay", str(pristine["forward"]), "--isolate", "--json"])
    assert res.exit_code == 0, capfd.readouterr().err
    assert json.loads(capfd.readouterr().out)["verify"]["bit_identical"] is True
