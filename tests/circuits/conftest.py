"""Circuits fixtures: the zoo's injection model, its scenario and trigger words."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def injection():
    """zoo:gpt2-injection, loaded offline from the package."""
    from model_forensics.models.loading import load

    return load("zoo:gpt2-injection")


@pytest.fixture(scope="session")
def injection_scenario():
    from model_forensics.scenarios.registry import get

    return get("gpt2-injection")


@pytest.fixture(scope="session")
def trigger_words() -> dict[str, Any]:
    """verbs / modifiers / nouns of the planted trigger (the zoo entry's ground truth)."""
    from model_forensics.models import zoo

    return zoo.entry("gpt2-injection").ground_truth["extra"]["trigger_words"]
