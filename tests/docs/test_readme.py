"""Docs are tests: every ```python / ```bash block of README.md runs as written, in reading
order, in one fresh directory (see snippets.py for how, and for the docs-test markers)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from snippets import ROOT, check_document


def test_readme_runs_as_written(tmp_path: Path) -> None:
    check_document(ROOT / "README.md", tmp_path)
