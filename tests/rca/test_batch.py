"""batch / triage over a directory: process pool and Ray give the serial results; bad
bundles are skipped and listed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from model_forensics import ForensicsError
from model_forensics.cli import app
from model_forensics.rca.pipeline import find_bundles, run_many


@pytest.fixture(scope="module")
def bundles(tiny, argmax_incidents, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three incidents on the tiny Llama (predicate: its own next-token argmax)."""
    return argmax_incidents(tiny["llama"], tmp_path_factory.mktemp("bundles"), n_benign=10)


def _summary(report) -> list[tuple[str, list[str]]]:
    return sorted((Path(r["bundle"]).name, [u["unit"] for u in r["ranking"]["units"][:10]]) for r in report.results)


def test_triage_pool_equals_serial(bundles: Path) -> None:
    paths = find_bundles(bundles)
    serial = run_many(paths, search=False, workers=1)
    pooled = run_many(paths, search=False, workers=2)
    assert len(serial.results) == 3 and not serial.skipped
    assert _summary(pooled) == _summary(serial)
    assert sum(len(g["incidents"]) for g in serial.groups) == 3


def test_triage_on_local_ray_equals_serial(bundles: Path) -> None:
    pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    paths = find_bundles(bundles)
    serial = run_many(paths, search=False, workers=1)
    on_ray = run_many(paths, search=False, ray="local")
    assert on_ray.backend.startswith("ray")
    assert _summary(on_ray) == _summary(serial)


def test_corrupt_bundle_is_skipped_and_listed(bundles: Path, tmp_path: Path) -> None:
    work = tmp_path / "dir"
    shutil.copytree(bundles, work)
    data = bytearray((work / "incident-1" / "inputs.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (work / "incident-1" / "inputs.safetensors").write_bytes(bytes(data))
    res = CliRunner().invoke(app, ["triage", str(work), "--workers", "1"], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    out = res.output.replace("\n", "")
    assert "skipped" in out and "incident-1" in out and "failed its checksums" in out
    assert "2 incidents analysed" in out


def test_empty_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ForensicsError, match="holds no bundles"):
        find_bundles(tmp_path)
    res = CliRunner().invoke(app, ["batch", str(tmp_path)])
    assert res.exit_code == 2 and "holds no bundles" in res.output
