"""Reliability fixtures: tiny word-level models and bundles recorded from them."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "replay"))

from replay_models import make_models, record


@pytest.fixture(scope="session")
def word_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from model_forensics.models.loading import load

    dirs = make_models(tmp_path_factory.mktemp("reliability-models"))
    return {name: load(str(path)) for name, path in dirs.items()}


@pytest.fixture(scope="session")
def pristine(word_models, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Bundles nobody touched: a llama generation, a llama forward pass (fp16 sketch), a bert classifier."""
    root = tmp_path_factory.mktemp("reliability-bundles")
    return {
        "generate": record(word_models["llama"], root / "generate", max_new_tokens=4, granularity="layer"),
        "forward": record(word_models["llama"], root / "forward", granularity="layer"),
        "bert": record(word_models["bert"], root / "bert", granularity="layer"),
    }


@pytest.fixture()
def fresh(pristine, tmp_path: Path) -> Callable[[str], Path]:
    """A private copy of a pristine bundle, safe to damage."""

    def copy(kind: str) -> Path:
        return Path(shutil.copytree(pristine[kind], tmp_path / kind))

    return copy
