"""One side-effect bound: KL and the benign accuracy / predicate change are read together."""

from __future__ import annotations

import pytest

from model_forensics import CausalCCA
from model_forensics.core.errors import ConfigError
from model_forensics.rca.explain import _over
from model_forensics.rca.side_effects import SideEffects


def _effects(kl: float, clean: float, fixed: float, changed: float = 0.0) -> SideEffects:
    return SideEffects(
        mean_kl=kl,
        max_kl=kl,
        predicate_changed=changed,
        accuracy_clean=clean,
        accuracy_fixed=fixed,
        n_benign=50,
        bound=0.05,
    )


@pytest.mark.parametrize(
    ("kl", "fixed", "changed", "over"),
    [
        (0.01, 0.90, 0.0, []),
        (0.01, 0.80, 0.0, ["accuracy"]),  # the redundant-mechanism case: KL small, accuracy down 10 points
        (0.20, 0.90, 0.0, ["kl"]),
        (0.20, 0.80, 0.0, ["kl", "accuracy"]),
        (0.01, 0.90, 0.06, ["accuracy"]),  # the predicate flips on benign prompts
        (0.01, 0.88, 0.0, []),  # a 2-point drop is within the default 0.02
    ],
)
def test_the_bound_names_what_it_breaks(kl: float, fixed: float, changed: float, over: list[str]) -> None:
    e = _effects(kl, 0.90, fixed, changed)
    assert e.out_of_bound == over
    assert e.within_bound is (not over)
    assert e.to_json()["out_of_bound"] == over
    text = _over(e.to_json())
    assert ("KL bound" in text) is ("kl" in over) and ("accuracy bound" in text) is ("accuracy" in over)


def test_the_accuracy_bound_is_configurable() -> None:
    assert CausalCCA().config.max_accuracy_drop == 0.02
    assert CausalCCA(max_accuracy_drop=0.1).config.max_accuracy_drop == 0.1
    with pytest.raises(ConfigError):
        CausalCCA(max_accuracy_drop=2.0)
