"""zoo:kv-lookup-2l: the planted two-step path (a head moves the key, an MLP maps it) is
necessary by ablation against random controls, and circuit discovery recovers it on
prompts it never saw, with the thresholds used for induction-2l."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from sklearn.metrics import roc_auc_score

from model_forensics.circuits import discover
from model_forensics.models import zoo
from model_forensics.models.zoo.training import kv_lookup_2l as kv

NAME = "kv-lookup-2l"


@pytest.fixture(scope="module")
def lookup() -> Any:
    torch.set_num_threads(1)
    return zoo.load(NAME)


def test_zoo_lists_the_entry_with_its_path() -> None:
    gt = zoo.entry(NAME).ground_truth
    assert NAME in zoo.names()
    assert gt["units"] == [kv.HEAD, kv.MLP] and gt["path"] == ["embed", kv.HEAD, kv.MLP, "logits"]


def test_ablating_the_path_breaks_the_lookup_and_random_controls_do_not(lookup: Any) -> None:
    recipe = kv.KVRecipe()
    ids, answers = recipe.lookup_batch(random.Random(777), 256)  # fresh prompts, not the shipped metrics'
    full = recipe.accuracy(lookup.model, ids, answers)
    path = recipe.accuracy(lookup.model, ids, answers, (kv.HEAD, kv.MLP))
    head = recipe.accuracy(lookup.model, ids, answers, (kv.HEAD,))
    mlp = recipe.accuracy(lookup.model, ids, answers, (kv.MLP,))
    others = [f"blocks.{la}.attn.head.{h}" for la in range(2) for h in range(4) if (la, h) != (0, 1)] + ["blocks.0.mlp"]
    rng = random.Random(0)
    controls = {
        pair: recipe.accuracy(lookup.model, ids, answers, pair)
        for pair in (tuple(rng.sample(others, 2)) for _ in range(5))
    }
    report = f"full {full:.3f}, path {path:.3f}, head {head:.3f}, mlp {mlp:.3f}, random pairs {controls}"
    assert full >= 0.95, report
    assert path <= 0.15 and head <= 0.2 and mlp <= 0.2, report
    assert min(controls.values()) >= 0.5, report  # every random pair keeps most of the lookup


def test_discovery_recovers_the_planted_path_on_held_out_prompts(lookup: Any) -> None:
    scen = zoo.scenario_data(NAME)
    prompts, corrupted, targets = scen["incident_prompts"], scen["baseline_prompts"], scen["targets"]
    c = discover(
        lookup.model,
        lookup.tokenizer,
        prompts[:32],
        corrupted=corrupted[:32],
        targets=targets[:32],
        held_out=prompts[32:],
        held_out_corrupted=corrupted[32:],
    )
    ranking = dict(c.node_ranking())
    heads = [n for n in ranking if ".attn.head." in n]
    auroc = float(roc_auc_score([n == kv.HEAD for n in heads], [abs(ranking[n]) for n in heads]))
    report = (
        f"AUROC {auroc:.3f}; {len(c.edges)}/{c.total_edges} edges {c.nodes}; held-out faithfulness "
        f"{c.held_out.faithfulness:.3f}; ranking {c.node_ranking()}"
    )
    assert auroc >= 0.95, report
    assert abs(ranking[kv.MLP]) > abs(ranking["blocks.0.mlp"]), report
    assert {kv.HEAD, kv.MLP} <= set(c.nodes), report
    assert c.held_out.faithfulness >= 0.9 and c.edge_fraction <= 0.25, report
