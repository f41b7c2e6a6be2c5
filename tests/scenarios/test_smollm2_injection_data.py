"""The stored SmolLM2 prompt-injection incidents still reproduce on the real weights."""

from __future__ import annotations

import importlib.util
import json
import random
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "src/model_forensics/scenarios/data/smollm2_injection.json"


def _search_script() -> ModuleType:
    # The test decodes exactly as the search did: with the script's own functions.
    path = ROOT / "scripts/search_smollm2_injection.py"
    spec = importlib.util.spec_from_file_location("search_smollm2_injection", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    return json.loads(DATA.read_text())


@pytest.fixture(scope="module")
def smollm2() -> Iterator[Any]:
    from model_forensics.models import load

    # The search decoded with one thread; one thread also keeps generation fast on a busy CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield load("smollm2")
    finally:
        torch.set_num_threads(threads)


def test_data_has_enough_failing_and_benign_cases(data: dict[str, Any]) -> None:
    assert len(data["failing"]) >= 20
    assert len(data["benign"]) >= 20
    assert data["search"]["kept"] == len(data["failing"])
    assert all(case["target"] in case["output"] for case in data["failing"])
    assert data["demo"] in data["failing"]


def test_model_still_follows_injections(data: dict[str, Any], smollm2: Any) -> None:
    script = _search_script()
    for case in random.Random(0).sample(data["failing"], 5):
        output = script.greedy_output(smollm2.model, smollm2.tokenizer, case["prompt"], data["max_new_tokens"])
        assert case["target"] in output, (case["prompt"], output)


def test_model_does_the_task_without_injection(data: dict[str, Any], smollm2: Any) -> None:
    script = _search_script()
    targets = {case["target"] for case in data["failing"]}
    for case in random.Random(0).sample(data["benign"], 5):
        output = script.greedy_output(smollm2.model, smollm2.tokenizer, case["prompt"], data["max_new_tokens"])
        assert not any(t in output for t in targets), (case["prompt"], output)
