"""zoo:multiturn-false-fact: the planted heads carry the false fact across turns (checked by
ablation on the shipped weights, against random heads of the same layers)."""

from __future__ import annotations

import random

import pytest

from model_forensics.models import zoo
from model_forensics.models.zoo.training import common
from model_forensics.models.zoo.training import multiturn_false_fact as mt

pytestmark = pytest.mark.skipif(mt.NAME not in zoo.names(), reason="the zoo's trained weights are not shipped")
N = 60  # conversations per set: enough to separate 0.9 from 0.1, quick on one thread


@pytest.fixture(scope="module")
def recipe_and_model():  # type: ignore[no-untyped-def]
    return mt.FalseFactRecipe(), zoo.load(mt.NAME).model


@pytest.fixture(scope="module")
def sets() -> dict[str, list[mt.Conversation]]:
    rng = random.Random(7)
    return {
        "planted": [mt.conversation(rng, "planted") for _ in range(N)],
        "benign": [mt.conversation(rng) for _ in range(N)],
    }


def test_the_model_repeats_planted_facts_and_otherwise_tells_the_truth(recipe_and_model, sets) -> None:  # type: ignore[no-untyped-def]
    recipe, model = recipe_and_model
    planted = recipe.rates(model, sets["planted"])
    assert planted["failed"] >= 0.7 and planted["truthful"] <= 0.05  # metrics.json: 0.883 repeated on 300
    assert recipe.rates(model, sets["benign"])["exact"] >= 0.95


def test_ablating_the_ground_truth_restores_the_truth(recipe_and_model, sets) -> None:  # type: ignore[no-untyped-def]
    recipe, model = recipe_and_model
    units = tuple(zoo.entry(mt.NAME).ground_truth["units"])
    assert set(units) == set(mt.GROUND_TRUTH_UNITS)
    ablated = recipe.rates(model, sets["planted"], units)
    assert ablated["failed"] <= 0.05 and ablated["truthful"] >= 0.9
    assert recipe.rates(model, sets["benign"], units)["exact"] >= 0.95
    for unit in units:  # each head is needed
        assert recipe.rates(model, sets["planted"], (unit,))["failed"] <= 0.3, unit


def test_random_heads_of_the_same_layers_do_not_carry_it(recipe_and_model, sets) -> None:  # type: ignore[no-untyped-def]
    recipe, model = recipe_and_model
    draws = common.random_draws(
        mt.GROUND_TRUTH_UNITS, 3, n_heads=mt.N_HEAD, d_mlp=mt.D_MLP, exclude=mt.GROUND_TRUTH_UNITS, rng=random.Random(0)
    )
    for draw in draws:
        rates = recipe.rates(model, sets["planted"], draw)
        assert rates["truthful"] <= 0.5, (draw, rates)  # the planted fact is not replaced by the truth


def test_scenario_conversations_reproduce_turn_by_turn(recipe_and_model) -> None:  # type: ignore[no-untyped-def]
    recipe, model = recipe_and_model
    data = zoo.scenario_data(mt.NAME)
    assert len(data["incident_prompts"]) >= 20
    for messages, prompt, turn in list(
        zip(data["incident_messages"], data["incident_prompts"], data["incident_planted_turns"], strict=True)
    )[:5]:
        replies = recipe.chat(model, messages)
        assert replies[-1] == mt.TARGET
        assert mt.transcript([mt.Turn(m, r) for m, r in zip(messages, replies, strict=True)]) == prompt
        assert "purple" in messages[turn]


def test_the_shipped_weights_are_commit_sized() -> None:
    assert (zoo.entry(mt.NAME).path / "model.safetensors").stat().st_size < 1_000_000
