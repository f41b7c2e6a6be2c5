"""Replay fixtures: tiny random language models and incident bundles recorded from them."""

from __future__ import annotations

from pathlib import Path

import pytest
from replay_models import BASELINES, make_models, record


@pytest.fixture(scope="session")
def lm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_models(tmp_path_factory.mktemp("replay-models"))


@pytest.fixture(scope="session")
def lms(lm_dirs: dict[str, Path]) -> dict[str, object]:
    from model_forensics.models.loading import load

    return {name: load(str(path)) for name, path in lm_dirs.items()}


@pytest.fixture(scope="session")
def bundles(lms, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Incident bundles: llama forward + generation, gpt2 forward, bert classifier."""
    root = tmp_path_factory.mktemp("replay-bundles")
    extras = {"baseline": BASELINES, "variants": [" ".join(f"w{i}" for i in range(4, 20))], "benign": BASELINES[:1]}
    return {
        "forward": record(lms["llama"], root / "forward", extras=extras),
        "generate": record(lms["llama"], root / "generate", max_new_tokens=6, granularity="head"),
        "gpt2": record(lms["gpt2"], root / "gpt2", extras=extras),
        "bert": record(lms["bert"], root / "bert", granularity="layer"),
    }


@pytest.fixture(scope="session")
def sessions(bundles, lms):
    """Open sessions over the bundles (sharing the loaded models)."""
    from model_forensics.replay import SandboxReplayer

    replayer = SandboxReplayer()
    return {
        "forward": replayer.load_bundle(bundles["forward"], model=lms["llama"]),
        "generate": replayer.load_bundle(bundles["generate"], model=lms["llama"]),
        "gpt2": replayer.load_bundle(bundles["gpt2"], model=lms["gpt2"]),
        "bert": replayer.load_bundle(bundles["bert"], model=lms["bert"]),
    }
