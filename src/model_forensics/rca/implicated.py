"""Implicated units: which top-ranked heads/neurons exact patching confirms carry the failure.

Each of the top ``confirm_top`` heads/neurons (and every fine fix member) is ablated alone
and its effect on the failure metric measured exactly (:func:`exact_effects`), against a
noise floor of its own level: the largest |effect| of as many random units of that level
(at least 16, seeded), so generally important heads do not hide failure-specific neurons,
and at least ``RELATIVE_FLOOR`` of the level's largest effect (when random units are all
~0, tiny effects are not evidence). A unit is implicated when its effect exceeds its
level's floor. The implicated set is a superset of what a minimal fix needs when the
mechanism is redundant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from model_forensics.rca.attribution import UnitScore, exact_effects
from model_forensics.replay import Session

RELATIVE_FLOOR = 0.01  # implicated units carry ≥ 1 % of their level's largest exact effect
RANDOM_UNITS = 16  # random units per level that set its noise floor: at least this many


@dataclass
class Implicated:
    units: list[dict[str, Any]] = field(default_factory=list)  # {"unit", "level", "effect"}, largest first
    noise_floors: dict[str, float] = field(default_factory=dict)  # per level: head, neuron


def implicated_units(
    session: Session, scores: list[UnitScore], members: list[str], kind: str, confirm_top: int, confirm_variants: int
) -> Implicated:
    """Exact patching of the fix set's heads/neurons ``members`` and the top ``confirm_top`` heads/neurons of
    ``scores`` (ablation ``kind``), averaged over up to ``confirm_variants`` failing variants."""
    fine = [u for u in scores if u.level in ("head", "neuron")]
    if not fine:
        return Implicated()
    names = [u.unit for u in fine]
    level = {u.unit: u.level for u in fine}
    top = list(dict.fromkeys(members + names[:confirm_top]))
    generator = torch.Generator().manual_seed(0)
    random_units: dict[str, list[str]] = {}
    for lvl in ("head", "neuron"):
        rest = [u for u in names if level[u] == lvl and u not in top]
        count = max(RANDOM_UNITS, sum(level[u] == lvl for u in top))
        random_units[lvl] = [rest[i] for i in torch.randperm(len(rest), generator=generator)[:count].tolist()]
    effects = exact_effects(
        session, top + random_units["head"] + random_units["neuron"], kind, max_variants=confirm_variants
    )
    floors = {
        lvl: max(
            max((abs(effects[u]) for u in units), default=0.0),
            RELATIVE_FLOOR * max((effects[u] for u in top if level[u] == lvl), default=0.0),
        )
        for lvl, units in random_units.items()
    }
    implicated = [
        {"unit": u, "level": level[u], "effect": effects[u]}
        for u in sorted(top, key=lambda u: -effects[u])
        if effects[u] > floors[level[u]]
    ]
    return Implicated(implicated, floors)
