"""The smallest fix: single units and pairs are swept before the greedy search, and a smaller
set that fixes as well, with no worse side effects, wins.

On gpt2-injection the greedy search alone returns 3 redundant neurons of blocks.1.mlp at 88 %
flip rate, while one planted head of block 0 flips 98 % (benchmarks/results/rca_eval.md):
the answer must be that head. On the other zoo scenarios the answer must be no worse than
the greedy search's (size, flip rate, benign KL)."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_forensics import CausalCCA, SandboxReplayer
from model_forensics.core.errors import ConfigError
from model_forensics.models import zoo
from model_forensics.rca.attribution import UnitScore, attribution_ranking
from model_forensics.rca.smallest import SmallFix, site_of, smaller_wins

SCENARIOS = ["gpt2-injection", "bert-sentiment-bypass", "gpt2-toxic"]
pytestmark = pytest.mark.skipif(
    not set(SCENARIOS) <= set(zoo.names()), reason="the zoo's trained weights are not shipped in this checkout"
)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from model_forensics.scenarios import get

    return {name: get(name).record(tmp_path_factory.mktemp(name), limit=1).incidents[0] for name in SCENARIOS}


@pytest.fixture(scope="module")
def before_after(recorded: dict[str, Path]):
    """Per scenario: (session, fix without the sweep, fix with it), one attribution ranking."""
    out = {}
    for name, bundle in recorded.items():
        session = SandboxReplayer().load_bundle(bundle)
        ranking = attribution_ranking(session)
        before = CausalCCA(sweep_smallest=False).search_fix_set(session, ranking=ranking)
        after = CausalCCA().search_fix_set(session, ranking=ranking)
        out[name] = (session, before, after)
    return out


def test_gpt2_injection_answer_is_the_single_planted_head(before_after) -> None:
    session, before, after = before_after["gpt2-injection"]
    truth = session.extras["ground_truth"]["units"]
    # greedy alone: several redundant neurons
    assert len(before.units) > 1 and all(m.level == "neuron" for m in before.members)
    assert len(after.units) == 1
    (head,) = after.members
    assert head.level == "head" and head.unit.startswith("blocks.0.attn.head.") and head.unit in truth
    assert after.total_flip_rate >= 0.95 > before.total_flip_rate
    assert after.side_effects is not None and after.side_effects.within_bound
    assert after.side_effects.accuracy_drop <= 0.0
    assert any(n.event == "smallest_found" and head.unit in n.numbers["units"] for n in after.note_records)
    assert after.phase_passes["smallest"] > 0 and after.phase_passes.get("search", 0) == 0  # no greedy needed
    assert after.forward_passes <= before.forward_passes


@pytest.mark.parametrize("name", ["bert-sentiment-bypass", "gpt2-toxic"])
def test_other_zoo_answers_are_no_worse(before_after, name: str) -> None:
    _, before, after = before_after[name]
    assert len(after.units) <= len(before.units), (before.units, after.units)
    assert after.total_flip_rate >= before.total_flip_rate, (before.total_flip_rate, after.total_flip_rate)
    assert after.reached_threshold
    assert before.side_effects is not None and after.side_effects is not None
    assert after.side_effects.mean_kl <= max(before.side_effects.mean_kl, after.side_effects.bound)


def _small(n: int) -> SmallFix:
    return SmallFix([UnitScore(f"blocks.0.attn.head.{i}", "head", 1.0) for i in range(n)], 0.9, 0.0, 10)


def test_a_smaller_set_wins_only_with_no_worse_side_effects() -> None:
    bound = 0.05
    assert smaller_wins(_small(1), 0.01, greedy_size=3, greedy_reaches=True, greedy_kl=0.001, bound=bound)
    assert smaller_wins(_small(1), 0.2, greedy_size=3, greedy_reaches=True, greedy_kl=0.3, bound=bound)
    assert not smaller_wins(_small(1), 0.2, greedy_size=3, greedy_reaches=True, greedy_kl=0.01, bound=bound)
    assert not smaller_wins(_small(2), 0.0, greedy_size=2, greedy_reaches=True, greedy_kl=0.01, bound=bound)
    # the greedy set misses the threshold: the sweep's set wins even at equal size
    assert smaller_wins(_small(2), 0.0, greedy_size=2, greedy_reaches=False, greedy_kl=0.01, bound=bound)


def test_site_of_a_unit() -> None:
    assert site_of("blocks.0.attn.head.1") == "blocks.0.attn"
    assert site_of("blocks.1.mlp.post[7]") == "blocks.1.mlp"
    assert site_of("blocks.1.mlp") == "blocks.1.mlp"


def test_sweep_knobs_are_validated() -> None:
    with pytest.raises(ConfigError):
        CausalCCA({"modules": {"cca": {"sweep_neurons": -1}}})
    assert CausalCCA(sweep_smallest=False).config.sweep_smallest is False
