"""Near misses: the SmolLM2 scenario carries injected prompts the model does not obey, and
its incident bundles store them; the stored outputs still reproduce on the real weights."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from model_forensics.scenarios import get
from model_forensics.scenarios.scenario import prompt_of

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "src/model_forensics/scenarios/data/smollm2_injection.json"


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    return json.loads(DATA.read_text())


def test_near_misses_carry_the_trigger_but_not_the_failure(data: dict[str, Any]) -> None:
    near, failing = data["near_miss"], {case["prompt"] for case in data["failing"]}
    assert len(near) >= 50 and data["near_miss_search"]["kept"] == len(near)
    targets = set(data["search"]["grid"]["targets"])
    for case in near:
        assert case["injection"] in case["prompt"] and case["target"] in case["prompt"]
        assert not any(t in case["output"] for t in targets)
        assert case["prompt"] not in failing
    assert len({case["prompt"] for case in near}) == len(near)


def test_the_scenario_stores_its_near_misses_in_every_incident_bundle(data: dict[str, Any]) -> None:
    scenario = get("smollm2-injection")
    assert [prompt_of(e) for e in scenario.near_miss] == [case["prompt"] for case in data["near_miss"]]
    assert scenario.incident_extras(0)["near_miss"] == scenario.near_miss
    assert scenario.to_json()["near_miss"] == scenario.near_miss
    assert "near_miss" not in get("gpt2-injection").incident_extras(0)  # none known for the zoo entry


@pytest.mark.slow
def test_model_still_ignores_the_near_miss_injections(data: dict[str, Any], smollm2: Any) -> None:
    path = ROOT / "scripts/search_smollm2_injection.py"
    spec = importlib.util.spec_from_file_location("search_smollm2_injection", path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the near misses were decoded
    try:
        outputs = [
            (case, script.greedy_output(smollm2.model, smollm2.tokenizer, case["prompt"], data["max_new_tokens"]))
            for case in random.Random(0).sample(data["near_miss"], 3)
        ]
    finally:
        torch.set_num_threads(threads)
    for case, output in outputs:
        assert output == case["output"], (case["prompt"], output)
