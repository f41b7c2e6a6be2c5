"""Every output file is written whole or not at all, with the permissions the umask gives."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from model_forensics import add_hooks_all
from model_forensics.core import files


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")

    def broken(src: str, dst: Path) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(files.os, "replace", broken)
    with pytest.raises(OSError, match="disk gone"):
        files.write_text_atomic(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = files.write_text_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 and path.read_text() == "x"


def test_a_failed_cube_save_keeps_the_old_cube(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny["gpt2"].model
    with add_hooks_all(model) as tracer, torch.no_grad():
        model(input_ids=torch.tensor([[1, 5, 9, 3]]))
    target = tmp_path / "cube.json"
    tracer.cube("first").save(target)
    before = target.read_bytes()

    def broken(src: str, dst: Path) -> None:
        raise OSError("killed")

    monkeypatch.setattr(files.os, "replace", broken)
    with pytest.raises(OSError, match="killed"):
        tracer.cube("second").save(target)
    assert target.read_bytes() == before  # the old cube, whole
