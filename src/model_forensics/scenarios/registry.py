"""The scenario registry: every scenario by name (zoo entries, real-weight incidents, the agent,
the image backdoor)."""

from __future__ import annotations

from collections.abc import Callable

from model_forensics.core.errors import ForensicsError
from model_forensics.scenarios.agent import tool_misuse
from model_forensics.scenarios.images import cnn_badnets
from model_forensics.scenarios.multiturn import multiturn_false_fact
from model_forensics.scenarios.scenario import Scenario, from_zoo, minilm_suffix, smollm2_injection

_BUILDERS: dict[str, Callable[[], Scenario]] = {
    "gpt2-injection": lambda: from_zoo("gpt2-injection"),
    "bert-sentiment-bypass": lambda: from_zoo("bert-sentiment-bypass"),
    "gpt2-toxic": lambda: from_zoo("gpt2-toxic"),
    "smollm2-injection": smollm2_injection,
    "minilm-suffix": minilm_suffix,
    "tool-misuse": tool_misuse,
    "cnn-badnets": cnn_badnets,
    "multiturn-false-fact": multiturn_false_fact,
}


def names() -> list[str]:
    """Every scenario name, in listing order."""
    return list(_BUILDERS)


def get(name: str) -> Scenario:
    """The scenario called ``name``.

    Raises:
        ForensicsError: no scenario has that name (the message lists them), or its data
            is missing.
    """
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ForensicsError(f"unknown scenario '{name}'; available: {', '.join(names())}")
    return builder()


def scenarios() -> list[Scenario]:
    """Every scenario, built (reads JSON only; no model is loaded)."""
    return [get(name) for name in names()]
