"""The committed dashboard build (server/static) is the build of the committed UI sources.

ui/scripts/build-info.mjs writes static/build-info.json with a sha256 over ui/src,
ui/index.html, ui/package-lock.json and ui/vite.config.ts; this recomputes it the same way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UI = ROOT / "ui"
STATIC = ROOT / "src" / "model_forensics" / "server" / "static"
INPUTS = ("src", "index.html", "package-lock.json", "vite.config.ts")


def source_digest(ui: Path = UI) -> tuple[str, int]:
    """sha256 of the lines "<path>\\n<sha256 of its bytes>\\n" of every input file, sorted by path."""
    files = []
    for name in INPUTS:
        path = ui / name
        files += [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    outer = hashlib.sha256()
    paths = sorted(p.relative_to(ui).as_posix() for p in files)
    for rel in paths:
        outer.update(f"{rel}\n{hashlib.sha256((ui / rel).read_bytes()).hexdigest()}\n".encode())
    return outer.hexdigest(), len(paths)


@pytest.mark.skipif(not UI.is_dir(), reason="needs the ui/ sources (a checkout, not an installed wheel)")
def test_committed_build_matches_the_ui_sources() -> None:
    info = json.loads((STATIC / "build-info.json").read_text())
    digest, count = source_digest()
    assert info["sha256"] == digest and info["files"] == count, "UI build is stale: run `make ui`"


def test_build_is_one_page_with_relative_assets_that_exist() -> None:
    page = (STATIC / "index.html").read_text()
    assets = [a for a in page.split('"') if a.startswith("./assets/")]
    assert {Path(a).suffix for a in assets} == {".js", ".css"}, page
    for asset in assets:
        assert (STATIC / asset).is_file(), asset
    assert "http://" not in page and "https://" not in page


def test_digest_changes_when_a_source_changes(tmp_path: Path) -> None:
    for name in INPUTS:
        target = tmp_path / name
        if name == "src":
            (target / "views").mkdir(parents=True)
            (target / "views" / "A.tsx").write_text("export const a = 1;\n")
        else:
            target.write_text("{}\n")
    before = source_digest(tmp_path)
    (tmp_path / "src" / "views" / "A.tsx").write_text("export const a = 2;\n")
    assert source_digest(tmp_path)[0] != before[0]
