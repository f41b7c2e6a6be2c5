"""Packing bundles: the archive layout the reader accepts (and why `zip -r` is refused),
verification after packing, unpacking, and permissions that follow the umask."""

from __future__ import annotations

import os
import stat
import subprocess
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from model_forensics import Bundle, BundleError, RecorderHooks, token_is
from model_forensics.cli import app
from model_forensics.core.bundle import BUNDLE_FILES, pack_bundle, unpack_bundle
from model_forensics.core.keys import generate_key
from model_forensics.core.signing import write_signature
from model_forensics.report import analysis

runner = CliRunner()


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def bundle(tiny, tmp_path: Path) -> Path:
    loaded = tiny["gpt2"]
    with RecorderHooks().install_hooks(loaded.model) as rec, torch.no_grad():
        loaded.model(input_ids=torch.tensor([[1, 5, 9, 3]]))
        return rec.create_bundle(tmp_path / "incident", predicate=token_is(0))


def test_zip_r_of_the_folder_is_refused_and_pack_makes_one_the_reader_accepts(bundle: Path, tmp_path: Path) -> None:
    # `zip -r x.mfb.zip DIR` stores DIR/ itself and every file as DIR/NAME; the reader
    # takes only the bundle's files at the top level (anything else could be a traversal).
    naive = tmp_path / "naive.mfb.zip"
    subprocess.run(["zip", "-qr", str(naive), bundle.name], cwd=bundle.parent, check=True)
    assert f"{bundle.name}/" in zipfile.ZipFile(naive).namelist()
    with pytest.raises(BundleError, match="unexpected entry"):
        Bundle.open(naive)

    res = runner.invoke(app, ["bundle", "pack", str(bundle), "-o", str(tmp_path / "x.mfb.zip")])
    assert res.exit_code == 0, res.output
    assert "verified" in res.output
    with zipfile.ZipFile(tmp_path / "x.mfb.zip") as zf:
        names = zf.namelist()
        assert set(names) <= BUNDLE_FILES and "manifest.json" in names
        assert all(info.compress_type == zipfile.ZIP_STORED and not info.is_dir() for info in zf.infolist())
    assert Bundle.open(tmp_path / "x.mfb.zip").digest == Bundle.open(bundle).digest


def test_pack_refuses_an_existing_archive_and_other_names(bundle: Path, tmp_path: Path) -> None:
    pack_bundle(bundle, tmp_path / "x.mfb.zip")
    before = (tmp_path / "x.mfb.zip").read_bytes()
    res = runner.invoke(app, ["bundle", "pack", str(bundle), "-o", str(tmp_path / "x.mfb.zip")])
    assert res.exit_code == 2 and "already exists" in res.output and "Traceback" not in res.output
    assert (tmp_path / "x.mfb.zip").read_bytes() == before
    res = runner.invoke(app, ["bundle", "pack", str(bundle), "-o", str(tmp_path / "x.zip")])
    assert res.exit_code == 2 and "must end in .mfb.zip" in res.output
    assert (
        runner.invoke(app, ["bundle", "pack", str(bundle), "-o", str(tmp_path / "x.mfb.zip"), "--overwrite"]).exit_code
        == 0
    )


def test_pack_refuses_a_bundle_that_fails_its_checksums(bundle: Path, tmp_path: Path) -> None:
    data = bytearray((bundle / "activations.safetensors").read_bytes())
    data[-1] ^= 1
    (bundle / "activations.safetensors").write_bytes(bytes(data))
    res = runner.invoke(app, ["bundle", "pack", str(bundle), "-o", str(tmp_path / "x.mfb.zip")])
    assert res.exit_code == 2 and "checksums" in res.output
    assert not (tmp_path / "x.mfb.zip").exists() and not list(tmp_path.glob(".x.mfb.zip*"))


def test_unpack_gives_back_the_same_bundle(bundle: Path, tmp_path: Path) -> None:
    archive = pack_bundle(bundle, tmp_path / "x.mfb.zip")
    res = runner.invoke(app, ["bundle", "unpack", str(archive), "-o", str(tmp_path / "again")])
    assert res.exit_code == 0, res.output
    again = Bundle.open(tmp_path / "again")
    assert again.source.is_dir() and again.digest == Bundle.open(bundle).digest
    with pytest.raises(BundleError, match="already exists"):
        unpack_bundle(archive, tmp_path / "again")


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_bundles_and_archives_follow_the_umask(tiny, tmp_path: Path, mask: int, file_mode: int, dir_mode: int) -> None:
    loaded = tiny["gpt2"]
    with umask(mask):
        with RecorderHooks().install_hooks(loaded.model) as rec, torch.no_grad():
            loaded.model(input_ids=torch.tensor([[1, 5, 9, 3]]))
            path = rec.create_bundle(tmp_path / "b", predicate=token_is(0))
        archive = pack_bundle(path, tmp_path / "b.mfb.zip")
        unpacked = unpack_bundle(archive, tmp_path / "u")
    assert _mode(path) == dir_mode == _mode(unpacked)
    assert {f.name: _mode(f) for f in path.iterdir()} == dict.fromkeys((f.name for f in path.iterdir()), file_mode)
    assert {_mode(f) for f in unpacked.iterdir()} == {file_mode}
    assert _mode(archive) == file_mode


def test_signatures_and_reports_follow_the_umask_and_private_keys_stay_private(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(analysis, "analysis_html", lambda result, **_: "<html></html>")  # the writer, not the page
    with umask(0o022):
        private, public = generate_key(tmp_path / "k")
        signature = write_signature(bundle, private)
        report = analysis.write_analysis_report({"bundle": str(bundle)}, tmp_path / "report.html")
    assert _mode(signature) == 0o644 and _mode(report) == 0o644 and _mode(public) == 0o644
    assert _mode(private) == 0o600  # a private key is never group-readable, whatever the umask
