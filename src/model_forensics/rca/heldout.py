"""Held-out evaluation: the incident's prompts split into a search part and a held-out part.

Before anything is fitted (CF's baselines, the attribution ranking, the fix search, gates,
failure directions, mean ablations and thresholds), :func:`split_prompts` splits the
prompt sets a bundle carries (``extras.variants``, ``benign``, ``near_miss``, ``baseline``),
seeded and stratified by kind. Prompts that belong together go to one part: a failing
variant and its clean counterpart (``baseline[j]`` belongs to ``session.variants()[j]``),
and copies of one prompt in several sets (a benign prompt that is also a counterpart). The
incident itself always stays in the search part. Of a kind's n groups, round(fraction · n)
are held out, chosen by ``random.Random(f"{seed}:{kind}")``, when each part gets at least
``MIN_PART`` groups; a smaller kind is not split (a Note says so) and has no held-out figures.

While :func:`searching` is active the session sees the search part only: its extras and its
baseline set (what ``mean`` ablations and gate thresholds read) are the search part's.
:func:`evaluate` then measures the found fix on both parts, the means still those of the
search part: flip rate over the failing variants, side effects on the benign prompts and on
the near misses (prompts that contain the trigger but on which the model behaves: a fix that
changes their answers has a side effect; a gate that fires on them detects the trigger, not
the failure). The held-out flip rate decides whether the fix reaches the threshold.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from model_forensics.core.records import fields_json
from model_forensics.rca.notes import Note
from model_forensics.rca.progress import Progress, silent
from model_forensics.rca.side_effects import SideEffects, measure
from model_forensics.replay import Intervention, Session

KINDS = ("variants", "near_miss", "benign", "baseline")  # a group's kind: the first of these it holds
MIN_PART = 2  # prompt groups each part needs before a kind is split


@dataclass
class PromptSplit:
    """The prompt sets of one bundle, split into a search part and a held-out part.

    Attributes:
        search / held_out: entries by kind, as ``manifest.extras`` stores them (``variants``
            without the incident; ``baseline`` with the incident's counterpart first in
            ``search``, counterparts in the order of their variants).
        groups: per kind, the number of prompt groups in each part.
        unsplit: kinds with too few groups to split (all searched).
    """

    search: dict[str, list[Any]]
    held_out: dict[str, list[Any]]
    fraction: float
    seed: int
    groups: dict[str, dict[str, int]] = field(default_factory=dict)
    unsplit: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        """Entries per kind in each part (the incident counts as a search variant)."""
        return {
            kind: {
                "search": len(self.search.get(kind, [])) + (kind == "variants"),
                "held_out": len(self.held_out.get(kind, [])),
            }
            for kind in KINDS
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "fraction": self.fraction,
            "seed": self.seed,
            "counts": self.counts(),
            "groups": self.groups,
            "unsplit": list(self.unsplit),
        }


def split_prompts(extras: dict[str, Any], fraction: float, seed: int = 0) -> PromptSplit:
    """Split the prompt sets of ``extras`` (a bundle's ``manifest.extras``) into a search
    part and a held-out part, seeded and stratified by kind (see the module docstring).

    Args:
        extras: holds ``variants`` (without the incident), ``benign``, ``near_miss`` and
            ``baseline`` (``baseline[0]`` the incident's counterpart), each optional.
        fraction: the share of each kind's prompt groups held out (0: nothing held out).
        seed: the split's seed.
    """
    sets = {kind: list(extras.get(kind) or []) for kind in KINDS}
    # Members (kind, index); variant index j counts the incident as 0, as session.variants() does.
    members = [("variants", j) for j in range(len(sets["variants"]) + 1)]
    members += [(kind, i) for kind in KINDS[1:] for i in range(len(sets[kind]))]
    parent = {m: m for m in members}

    def root(m: tuple[str, int]) -> tuple[str, int]:
        while parent[m] != m:
            m = parent[m]
        return m

    def join(a: tuple[str, int], b: tuple[str, int]) -> None:
        parent[root(a)] = root(b)

    for j in range(min(len(sets["baseline"]), len(sets["variants"]) + 1)):
        join(("baseline", j), ("variants", j))
    seen: dict[str, tuple[str, int]] = {}
    for kind, i in members:
        if kind == "variants" and i == 0:
            continue  # the incident's own prompt is not in extras
        text = _prompt_key(sets[kind][i - (kind == "variants")])
        if text in seen:
            join((kind, i), seen[text])
        else:
            seen[text] = (kind, i)
    groups: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for m in members:
        groups.setdefault(root(m), []).append(m)
    held: set[tuple[str, int]] = set()
    split = PromptSplit({}, {}, fraction, seed)
    incident = root(("variants", 0))
    for kind in KINDS:
        of_kind = [r for r, ms in groups.items() if min(KINDS.index(k) for k, _ in ms) == KINDS.index(kind)]
        take = round(fraction * len(of_kind))
        if fraction > 0 and of_kind and (take < MIN_PART or len(of_kind) - take < MIN_PART):
            split.unsplit.append(kind)
            take = 0
        pool = sorted((r for r in of_kind if r != incident), key=lambda r: min(groups[r]))
        chosen = random.Random(f"{seed}:{kind}").sample(pool, min(take, len(pool)))
        held.update(chosen)
        split.groups[kind] = {"search": len(of_kind) - len(chosen), "held_out": len(chosen)}
    for part, keep in (("search", False), ("held_out", True)):
        side = {m for r in groups if (r in held) == keep for m in groups[r]}
        entries = split.search if part == "search" else split.held_out
        entries.update(_part_entries(sets, side))
    return split


def _prompt_key(entry: Any) -> str:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("prompt"), str):
        return str(entry["prompt"])
    return json.dumps(entry, sort_keys=True, default=str)


def _part_entries(sets: dict[str, list[Any]], side: set[tuple[str, int]]) -> dict[str, list[Any]]:
    """One part's entries by kind; variants with a counterpart first, so that ``baseline[j]``
    still belongs to the part's ``variants()[j]``."""
    paired = len(sets["baseline"])
    order = sorted((j for k, j in side if k == "variants"), key=lambda j: (j >= paired, j))
    return {
        "variants": [sets["variants"][j - 1] for j in order if j > 0],
        "baseline": [sets["baseline"][j] for j in order if j < paired]
        + [sets["baseline"][i] for i in range(len(sets["baseline"])) if ("baseline", i) in side and i not in order],
        "benign": [sets["benign"][i] for i in range(len(sets["benign"])) if ("benign", i) in side],
        "near_miss": [sets["near_miss"][i] for i in range(len(sets["near_miss"])) if ("near_miss", i) in side],
    }


def searching(session: Session, split: PromptSplit) -> AbstractContextManager[None]:
    """Inside the block, ``session`` sees the search part only: ``session.extras`` holds the
    search part's prompt sets and the baseline set is the search part's counterparts. Both
    are restored on leaving (also on an exception)."""
    return session.restricted(split.search)


@dataclass
class PartFigures:
    """A fix's figures on one part of the prompts.

    Attributes:
        failing: failing variants measured (those on which the model fails without the fix).
        flip_rate: the fraction of them the fix flips (None: no failing variant in the part).
        flips: which of them it flips.
        benign: side effects on the part's benign prompts (None: none there).
        near_miss: side effects on the part's near misses (None: none there); its
            ``answers_unchanged`` is the share kept word for word, its ``gate_fired`` the
            share the fix's gate fires on.
    """

    failing: int
    flip_rate: float | None
    flips: list[bool]
    benign: SideEffects | None
    near_miss: SideEffects | None

    def to_json(self) -> dict[str, Any]:
        return fields_json(
            self,
            benign=None if self.benign is None else self.benign.to_json(),
            near_miss=None if self.near_miss is None else self.near_miss.to_json(),
        )


@dataclass
class HeldOut:
    """A fix measured on the search part and on the held-out part of the incident's prompts.

    ``decides`` names the part whose flip rate decides whether the fix reaches the threshold:
    ``held_out``, or ``search`` when no failing variant was held out.
    """

    split: PromptSplit
    search: PartFigures
    held_out: PartFigures
    decides: str

    @property
    def flip_rate(self) -> float | None:
        """The flip rate that decides the threshold."""
        return (self.held_out if self.decides == "held_out" else self.search).flip_rate

    @property
    def out_of_bound(self) -> list[str]:
        """The side-effect bounds the fix breaks on held-out prompts: ``kl`` / ``accuracy``
        (benign), ``near_miss_kl`` / ``near_miss_answers`` (near misses)."""
        benign, near = self.held_out.benign, self.held_out.near_miss
        over = [] if benign is None else list(benign.out_of_bound)
        if near is not None:
            over += [{"kl": "near_miss_kl", "accuracy": "near_miss_answers"}[name] for name in near.out_of_bound]
        return over

    def to_json(self) -> dict[str, Any]:
        return {
            "split": self.split.to_json(),
            "decides": self.decides,
            "flip_rate": self.flip_rate,
            "out_of_bound": self.out_of_bound,
            "search": self.search.to_json(),
            "held_out": self.held_out.to_json(),
        }


def evaluate(
    session: Session,
    fix: Sequence[Intervention],
    split: PromptSplit,
    search: PartFigures,
    bound: float,
    max_accuracy_drop: float,
    progress: Progress = silent,
    search_near_misses: bool = True,
) -> HeldOut:
    """``fix`` measured on the held-out part of ``split`` (and on the search part's near
    misses, which the search itself does not measure); ``search`` holds what the search
    measured on its part. Call it inside :func:`searching`, so that the fix's mean
    ablations read the search part's baselines, as they did when it was found
    (``search_near_misses=False``: ``search.near_miss`` was measured already)."""
    held = split.held_out

    def effects(entries: list[Any]) -> SideEffects | None:
        if not entries:
            return None
        return measure(session, fix, bound, benign=entries, progress=progress, max_accuracy_drop=max_accuracy_drop)

    flips = held_out_flips(session, fix, held["variants"], progress)
    figures = PartFigures(len(flips), sum(flips) / len(flips) if flips else None, flips, None, None)
    figures.benign = effects(held["benign"])
    figures.near_miss = effects([_as_prompt(e) for e in held["near_miss"]])
    if search_near_misses:
        search.near_miss = effects([_as_prompt(e) for e in split.search["near_miss"]])
    return HeldOut(split, search, figures, "held_out" if flips else "search")


def held_out_flips(
    session: Session, fix: Sequence[Intervention], variants: list[Any], progress: Progress = silent
) -> list[bool]:
    """For each of ``variants`` on which the model fails without ``fix``: whether the fix
    flips it (sweeps of two rows per variant, :meth:`Session.sweep_each`, stopped once both
    verdicts are settled: ``verdicts_only``; those that do not fail are left out)."""
    flipped: list[bool | None] = [None] * len(variants)
    for done, (i, (clean, fixed)) in enumerate(session.sweep_each(variants, [[], list(fix)], verdicts_only=True)):
        progress("held-out variants", done, len(variants))
        flipped[i] = not fixed.failed if clean.failed else None
    progress("held-out variants", len(variants), len(variants))
    return [f for f in flipped if f is not None]


def _as_prompt(entry: Any) -> Any:
    """A near miss as a prompt alone: its answer is compared with the clean run's, word for
    word (an ``expected`` field would turn that into a containment check)."""
    return entry["prompt"] if isinstance(entry, dict) and "prompt" in entry else entry


def held_out_notes(held: HeldOut, threshold: float, search_flip_rate: float) -> list[Note]:
    """What the reader should know about the held-out figures, as notes."""
    notes = [
        Note(
            "held_out_too_small", {"kind": kind, "groups": sum(held.split.groups[kind].values()), "min_part": MIN_PART}
        )
        for kind in held.split.unsplit
    ]
    part = held.held_out
    if part.flip_rate is not None:
        notes.append(
            Note(
                "held_out_flip_rate",
                {
                    "flip_rate": part.flip_rate,
                    "failing": part.failing,
                    "search_flip_rate": search_flip_rate,
                    "verdict": "reaches" if part.flip_rate >= threshold else "does not reach",
                    "threshold": threshold,
                },
            )
        )
    for name, figures in (("held-out", part), ("search", held.search)):
        near = figures.near_miss
        if near is None:
            continue
        changed = 1.0 - near.answers_unchanged
        if "accuracy" in near.out_of_bound:
            notes.append(
                Note(
                    "near_miss_changed",
                    {"part": name, "changed": changed, "n": near.n_benign, "bound": near.max_accuracy_drop},
                )
            )
        if near.gate_fired:
            notes.append(
                Note("gate_fires_on_near_misses", {"part": name, "fired": near.gate_fired, "n": near.n_benign})
            )
    if part.benign is not None and part.benign.out_of_bound:
        notes.append(
            Note(
                "held_out_out_of_bound",
                {"which": " and ".join(part.benign.out_of_bound), "n": part.benign.n_benign, "kl": part.benign.mean_kl},
            )
        )
    return notes
