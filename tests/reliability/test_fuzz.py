"""Fuzzing (Hypothesis): a few hundred hostile bundles per run; every one either verifies
(with a new digest when it changed) or is refused with one line. benchmarks/reliability.py
runs the same mutators ≥ 10,000 times."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from fuzzing import MUTATORS, run_case
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CASES = 50  # per mutator and bundle kind: 6 mutators × 50 = 300 cases on the generation bundle


@pytest.mark.parametrize("name", sorted(MUTATORS))
def test_hostile_bundles_verify_or_are_refused(pristine, tmp_path_factory, name: str) -> None:
    mutator = MUTATORS[name]
    work = tmp_path_factory.mktemp("fuzz") / "case"
    seen: dict[str, int] = {}

    @settings(
        max_examples=CASES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(rng=st.randoms(use_true_random=False))
    def case(rng: random.Random) -> None:
        what, outcome = run_case(mutator, rng, pristine["generate"], work)
        seen[outcome.kind] = seen.get(outcome.kind, 0) + 1
        assert outcome.kind in ("verified", "rejected"), f"{what}: {outcome.kind}: {outcome.detail}"

    case()
    assert sum(seen.values()) >= CASES
    assert seen.get("rejected", 0) > 0, f"{name}: no mutation was ever refused ({seen}); the fuzzer is not biting"


def test_the_fuzzer_finds_a_planted_crash(pristine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness itself must be able to fail: a reader that raises a plain exception is a crash."""
    from model_forensics.core import bundle as bundle_mod

    def broken(self):  # type: ignore[no-untyped-def]
        raise KeyError("planted")

    monkeypatch.setattr(bundle_mod.Bundle, "cube", broken)
    _, outcome = run_case(MUTATORS["manifest values"], random.Random(0), pristine["generate"], tmp_path / "c")
    assert outcome.kind in ("crash", "rejected")
    _, clean = run_case(lambda rng, b: "nothing", random.Random(0), pristine["generate"], tmp_path / "d")
    assert clean.kind == "crash" and "planted" in clean.detail
