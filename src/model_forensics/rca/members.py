"""Scoring a fix set's members, every number from exact replays.

For a set S of n interventions flipping rate(S) of the failing variants:
    necessity(m)   = rate(S) − rate(S ∖ {m})   how much the set loses without m
    sufficiency(m) = rate({m})                 what m does alone
    solo KL(m)     = mean benign KL of m alone, at the first decoding step (the search's
                     cheap per-candidate side-effect estimate; it also orders the search)
The 2n + 1 sets run as one batched sweep per failing variant.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from model_forensics.core.records import fields_json
from model_forensics.rca.attribution import UnitScore
from model_forensics.rca.candidates import Ablation, cf_score
from model_forensics.rca.compression import AnomalyReport
from model_forensics.rca.flips import flip_table
from model_forensics.rca.progress import Progress, silent
from model_forensics.rca.runs import Inputs, flip_rate
from model_forensics.rca.side_effects import benign_kls
from model_forensics.replay import Intervention, Session

SOLO_KL_POOL = 16  # candidates whose solo KL is measured: at least this many
# flips[set][variant] of some intervention sets on some variants, ticking (done, total) per variant
FlipTable = Callable[
    [Sequence[Inputs], Sequence[Sequence[Intervention]], Callable[[int, int], None] | None], list[list[bool]]
]


@dataclass
class FixMember:
    intervention: Intervention
    unit: str
    level: str
    attribution: float
    cf_score: float
    necessity: float  # flip rate of the set − flip rate without this member
    sufficiency: float  # flip rate of this member alone
    benign_kl: float | None  # mean benign KL of this member alone

    def to_json(self) -> dict[str, Any]:
        return fields_json(self, intervention=self.intervention.to_json())


@dataclass
class ScoredFix:
    """A fix set's members, scored, and which failing variants the whole set flips."""

    members: list[FixMember]
    flips: list[bool]

    @property
    def flip_rate(self) -> float:
        return flip_rate(self.flips)

    @property
    def interventions(self) -> list[Intervention]:
        return [m.intervention for m in self.members]


def solo_kls(
    session: Session, candidates: list[UnitScore], ablate: Ablation, max_fix_set_size: int
) -> dict[str, float]:
    """Mean first-step benign KL of each of the first max(max_fix_set_size, 16) candidates
    ablated alone ({} without a benign set)."""
    if not session.benign() or not candidates:
        return {}
    pool = candidates[: max(max_fix_set_size, SOLO_KL_POOL)]
    kls = benign_kls(session, [[ablate(u)] for u in pool])
    return {u.unit: sum(k) / len(k) for u, k in zip(pool, kls, strict=True)}


def score_members(
    session: Session,
    failing: list[Inputs],
    units: list[UnitScore],
    ablate: Ablation,
    guided_by: AnomalyReport | None,
    solo_kl: dict[str, float],
    progress: Progress = silent,
    table: FlipTable | None = None,
) -> ScoredFix:
    """Necessity and sufficiency of every member on the ``failing`` variants
    (``progress``: ("members", variants done, variants)). ``table`` runs the sets
    (default: :func:`~model_forensics.rca.flips.flip_table`; the search passes its own,
    which does not run again the sets it has measured, such as the whole set)."""
    full = ablate.all(units)
    without = [[iv for iv in full if iv is not removed] for removed in full]
    progress("members", 0, len(failing))
    run = table or partial(flip_table, session)
    flips = run(failing, [full, *without, *([iv] for iv in full)], partial(progress, "members"))
    rates = [flip_rate(f) for f in flips]
    n = len(full)
    members = [
        FixMember(
            intervention=full[i],
            unit=u.unit,
            level=u.level,
            attribution=u.score,
            cf_score=cf_score(guided_by, u.unit),
            necessity=rates[0] - rates[1 + i],
            sufficiency=rates[1 + n + i],
            benign_kl=solo_kl.get(u.unit),
        )
        for i, u in enumerate(units)
    ]
    return ScoredFix(members, flips[0])
