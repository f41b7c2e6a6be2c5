"""Fix-set search over ranked units; every flip rate comes from exact replays.

* **greedy** (:meth:`FixSearch.greedy`): the shortest rank-order prefix whose flip rate
  reaches ``early_stop_threshold`` (prefixes in chunks of 8, one batched sweep per variant
  and chunk), or the best prefix;
* **delta-debugging** (:meth:`FixSearch.minimise`): drop members while the rest still
  reaches the threshold, to a 1-minimal set;
* **exhaustive** (:meth:`FixSearch.exhaustive`): every subset, by size, of the top
  ``MAX_EXHAUSTIVE`` candidates — exponential, for small spaces and for testing greedy;
* **coarse to fine** (:meth:`FixSearch.coarse_to_fine`): sites first, then the heads and
  neurons inside the sites found;
* **counterexample-guided** (:meth:`FixSearch.refine`): search on a subset of the failing
  variants, re-measure on all, search again with the variants it misses added.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from model_forensics.core.config import CCAConfig
from model_forensics.rca.attribution import UnitScore
from model_forensics.rca.candidates import Ablation, fine_candidates
from model_forensics.rca.flips import clean_runs, flips_each, screens
from model_forensics.rca.members import solo_kls
from model_forensics.rca.notes import Note
from model_forensics.rca.progress import Progress, silent
from model_forensics.rca.runs import Inputs, failing_variants, flip_rate
from model_forensics.rca.side_effects import SideEffects, measure
from model_forensics.replay import Intervention, Session

MAX_EXHAUSTIVE = 12
SEQUENTIAL_FROM = 12  # larger sets get a sequential removal pass before the batched rounds
GREEDY_CHUNK = 8  # prefixes per batched sweep
REACH_CHUNK = 4  # variants per round of :meth:`FixSearch.reaching_rates`


@dataclass
class Trial:
    """Units tried together and the fraction of the variants they flipped."""

    units: list[UnitScore]
    flip_rate: float


@dataclass
class Found:
    """One search's result: the fix set (units in search order), the coarse sites it was
    searched inside, and the candidates' solo benign KLs (first decoding step)."""

    units: list[UnitScore]
    sites: list[str]
    solo_kl: dict[str, float]


@dataclass
class Refined:
    """The best set of the counterexample-guided rounds and its flip rate on every failing variant."""

    found: Found
    flip_rate: float


@dataclass
class FixChoice:
    """The fix set kept so far: its units, how they are ablated, their benign KL (as
    reported: over the whole answer for generation) and the solo KLs of its candidates."""

    units: list[UnitScore]
    ablation: Ablation
    benign_kl: float
    solo_kl: dict[str, float]

    @property
    def interventions(self) -> list[Intervention]:
        return self.ablation.all(self.units)


class FixSearch:
    """Fix-set search on one incident.

    Args:
        session: a replay Session whose incident fails.
        config: the ``modules.cca`` knobs (threshold, set size, strategy, variants …).
        progress: told about finding the failing variants and each greedy search
            (:mod:`~model_forensics.rca.progress`).
    Attributes:
        failing: every failing variant (the reported flip rates are over these).
        search_variants: the first ``search_variants`` of them, which the search runs on.
    Raises:
        ForensicsError: no predicate, or nothing fails.
    """

    def __init__(self, session: Session, config: CCAConfig, progress: Progress = silent) -> None:
        self.session = session
        self.config = config
        self.progress = progress
        # where the screen pays it reads every variant's full clean run: the verdicts come from those
        self.failing = failing_variants(session, progress, clean_runs if screens(session) else None)
        self.search_variants = self.failing[: config.search_variants]
        # every measurement made, so that none runs twice: (variant, set) → flipped; set → side effects
        self._flipped: dict[tuple[int, str], bool] = {}
        self._variants: dict[int, Inputs] = {}  # holds the variants the ids above name
        self._effects: dict[str, SideEffects] = {}
        # how often a measurement was asked for again and not run (benchmarks report it)
        self.memo = {"flip_checks": 0, "flip_checks_reused": 0, "side_effects": 0, "side_effects_reused": 0}

    def reaches(self, rate: float) -> bool:
        return rate >= self.config.early_stop_threshold

    def flips(self, variants: Sequence[Inputs], fix: Sequence[Intervention]) -> list[bool]:
        """Which of ``variants`` one intervention set flips."""
        (flips,) = self.flip_table(variants, [fix])
        return flips

    def flip_table(
        self,
        variants: Sequence[Inputs],
        sets: Sequence[Sequence[Intervention]],
        tick: Callable[[int, int], None] | None = None,
    ) -> list[list[bool]]:
        """flips[set][variant] (:func:`~model_forensics.rca.flips.flips_each`: every
        variant's sets in batched sweeps); a set already measured on a variant is not run again."""
        keys = [set_key(s) for s in sets]
        first = {k: s for k, s in zip(keys, sets, strict=True)}
        todo: list[list[str]] = []
        for variant in variants:
            self._variants[id(variant)] = variant
            todo.append(list(dict.fromkeys(k for k in keys if (id(variant), k) not in self._flipped)))
            self.memo["flip_checks"] += len(keys)
            self.memo["flip_checks_reused"] += len(keys) - len(todo[-1])
        work = [(v, [first[k] for k in ks]) for v, ks in zip(variants, todo, strict=True)]
        for variant, ks, flipped in zip(variants, todo, flips_each(self.session, work, tick), strict=True):
            for k, f in zip(ks, flipped, strict=True):
                self._flipped[(id(variant), k)] = f
        return [[self._flipped[(id(v), k)] for v in variants] for k in keys]

    def reaching_rates(self, variants: Sequence[Inputs], sets: Sequence[Sequence[Intervention]]) -> list[float | None]:
        """Each set's flip rate on ``variants`` when it reaches the threshold, else None.

        The variants are measured in rounds, those already measured for the most sets first,
        and a set is not measured further once its misses so far keep it below the threshold
        even if it flipped every variant left. A round takes at least :data:`REACH_CHUNK`
        variants, and as many as the set closest to being dropped still needs misses for that
        (no set can be dropped sooner). A set that reaches is measured on every variant, so
        the rates returned, and which sets get None, are those of :meth:`flip_table` on all of
        them (the same count over the same total)."""
        n = len(variants)
        keys = [set_key(s) for s in sets]
        misses = [0] * len(sets)
        allowed = -1  # the most misses a set may have and still reach (-1: none reaches)
        while allowed < n and self.reaches((n - allowed - 1) / n):
            allowed += 1
        live = list(range(len(sets))) if allowed >= 0 else []

        def held(j: int) -> int:
            return sum((id(variants[j]), keys[i]) in self._flipped for i in live)

        order = sorted(range(n), key=lambda j: -held(j))
        done = 0
        while live and done < n:
            size = max(REACH_CHUNK, min(allowed + 1 - misses[i] for i in live))
            chunk = [variants[j] for j in order[done : done + size]]
            done += len(chunk)
            for i, flips in zip(live, self.flip_table(chunk, [sets[i] for i in live]), strict=True):
                misses[i] += len(flips) - sum(flips)
            live = [i for i in live if misses[i] <= allowed]
        return [(n - m) / n if m <= allowed else None for m in misses]

    def side_effects(self, fix: Sequence[Intervention], progress: Progress = silent) -> SideEffects:
        """The set's side effects on the benign set (:func:`~model_forensics.rca.side_effects.measure`),
        measured once per set."""
        key = set_key(fix)
        self.memo["side_effects"] += 1
        if key in self._effects:
            self.memo["side_effects_reused"] += 1
            n = self._effects[key].n_benign
            progress("side effects", 0, n)
            progress("side effects", n, n)
        else:
            cfg = self.config
            self._effects[key] = measure(
                self.session, fix, cfg.max_side_effect_kl, progress=progress, max_accuracy_drop=cfg.max_accuracy_drop
            )
        return self._effects[key]

    def benign_kl(self, fix: Sequence[Intervention]) -> float:
        """The side-effect KL the result reports (over the whole clean answer for generation)."""
        if not self.session.benign():
            return 0.0
        return self.side_effects(fix).mean_kl

    def greedy(
        self, variants: Sequence[Inputs], ranked: list[UnitScore], ablate: Ablation, limit: int, phase: str = ""
    ) -> Trial:
        """The shortest rank-order prefix (at most ``limit`` units) reaching the threshold,
        or the prefix with the best flip rate. With a ``phase`` name, progress counts the
        candidates tried out of ``limit`` (the total shrinks to those tried when it stops early)."""
        best = Trial([], 0.0)
        total = min(limit, len(ranked))
        for lo in range(0, total, GREEDY_CHUNK):
            if phase:
                self.progress(phase, lo, total)
            sizes = list(range(lo + 1, min(total, lo + GREEDY_CHUNK) + 1))
            sets = [ablate.all(ranked[:k]) for k in sizes]
            for k, flips in zip(sizes, self.flip_table(variants, sets), strict=True):
                rate = flip_rate(flips)
                if rate > best.flip_rate:
                    best = Trial(ranked[:k], rate)
                if self.reaches(rate):
                    if phase:
                        self.progress(phase, k, k)
                    return Trial(ranked[:k], rate)
        if phase:
            self.progress(phase, total, total)
        return best

    def minimise(
        self, variants: Sequence[Inputs], chosen: list[UnitScore], ablate: Ablation, solo_kl: dict[str, float]
    ) -> list[UnitScore]:
        """Delta-debugging removal to a 1-minimal set: drop members while the rest still flips.

        Each round replays every one-member-removed set and drops the removable member with
        the largest solo KL. Sets larger than ``SEQUENTIAL_FROM`` first get one sequential
        pass in that order (one set per check, so the pass costs O(n) runs, not O(n²); run
        speculatively, several removals per batched sweep, it took fewer forward calls but
        more model rows and no less CPU on SmolLM2: benchmarks/results/rca_speed_smollm2.md);
        the rounds then confirm 1-minimality."""
        current = list(chosen)
        if len(current) > SEQUENTIAL_FROM:
            for member in sorted(current, key=lambda m: (-solo_kl.get(m.unit, 0.0), m.score)):
                rest = [u for u in current if u is not member]
                if self.reaches(flip_rate(self.flips(variants, ablate.all(rest)))):
                    current = rest
        while len(current) > 1:
            without = [ablate.all([u for u in current if u is not m]) for m in current]
            flips = self.flip_table(variants, without)
            removable = [m for m, f in zip(current, flips, strict=True) if self.reaches(flip_rate(f))]
            if not removable:
                break
            current.remove(max(removable, key=lambda m: (solo_kl.get(m.unit, 0.0), -m.score)))
        return current

    def exhaustive(self, variants: Sequence[Inputs], ranked: list[UnitScore], ablate: Ablation) -> Trial:
        """The smallest subset of the top ``MAX_EXHAUSTIVE`` units reaching the threshold
        (the best flip rate of each size, by size), or the best subset tried."""
        pool = ranked[:MAX_EXHAUSTIVE]
        best = Trial([], 0.0)
        for size in range(1, min(len(pool), self.config.max_fix_set_size) + 1):
            combos = [list(c) for c in itertools.combinations(pool, size)]
            rates = [flip_rate(f) for f in self.flip_table(variants, [ablate.all(c) for c in combos])]
            top = max(range(len(combos)), key=lambda i: rates[i])
            if rates[top] > best.flip_rate:
                best = Trial(combos[top], rates[top])
            if self.reaches(rates[top]):
                return best
        return best

    def coarse_to_fine(
        self, variants: Sequence[Inputs], scores: list[UnitScore], ablate: Ablation, unguided: bool, notes: list[Note]
    ) -> Found:
        """Coarse sites (greedy, then minimised), then heads/neurons inside them, on ``variants``.
        Candidates whose solo KL exceeds the side-effect bound go last (guided search). When
        heads/neurons do not reach the threshold the set is the coarse one (at most
        ``max_fix_set_size`` sites)."""
        cfg = self.config
        coarse = [u for u in scores if u.level in ("site", "position")]  # positions: modules.cca.positions
        sites_trial = self.greedy(variants, coarse, ablate, len(coarse), "search: sites")
        if not self.reaches(sites_trial.flip_rate):
            notes.append(Note("sites_below_threshold", {"flip_rate": sites_trial.flip_rate}))
        coarse_set = self.minimise(variants, sites_trial.units, ablate, {})
        sites = [u.unit for u in coarse_set]

        fine = fine_candidates(scores, sites, cfg.neurons_per_site)
        solo_kl = solo_kls(self.session, fine, ablate, cfg.max_fix_set_size)
        fine.sort(
            key=lambda u: (solo_kl.get(u.unit, 0.0) > cfg.max_side_effect_kl, -u.score) if not unguided else (0, 0)
        )
        if cfg.search_strategy == "exhaustive":
            trial = self.exhaustive(variants, fine, ablate)
            chosen = trial.units
        else:
            trial = self.greedy(variants, fine, ablate, cfg.max_fix_set_size, "search: units")
            chosen = (
                self.minimise(variants, trial.units, ablate, solo_kl) if self.reaches(trial.flip_rate) else trial.units
            )
        if not self.reaches(trial.flip_rate) or not chosen:
            notes.append(Note("fell_back_to_sites"))
            chosen = coarse_set
            if len(chosen) > cfg.max_fix_set_size:
                notes.append(Note("sites_truncated", {"sites": len(chosen), "limit": cfg.max_fix_set_size}))
                chosen = chosen[: cfg.max_fix_set_size]
        return Found(chosen, sites, solo_kl)

    def refine(self, search: Callable[[list[Inputs]], Found], ablate: Ablation, notes: list[Note]) -> Refined:
        """Counterexample-guided: ``search(variants)`` on ``search_variants``, re-measure the
        set on every failing variant, and search again with up to ``search_variants`` of
        the variants it does not flip added (at most ``refine_rounds`` times). The best
        round's set is returned."""
        variants = list(self.search_variants)
        best: Refined | None = None
        for round_ in range(self.config.refine_rounds + 1):
            found = search(variants)
            flipped = self.flips(self.failing, ablate.all(found.units))
            rate = flip_rate(flipped)
            if best is None or rate > best.flip_rate:
                best = Refined(found, rate)
            missed = [v for v, f in zip(self.failing, flipped, strict=True) if not f and not among(v, variants)]
            if self.reaches(rate) or not missed or round_ == self.config.refine_rounds:
                break
            added = missed[: self.config.search_variants]
            notes.append(
                Note(
                    "refine_round",
                    {
                        "round": round_ + 1,
                        "searched": len(variants),
                        "flip_rate": rate,
                        "variants": len(self.failing),
                        "added": len(added),
                    },
                )
            )
            variants = variants + added
        assert best is not None  # the loop runs at least once
        return best


def set_key(fix: Sequence[Intervention]) -> str:
    """One intervention set as a key: its interventions' JSON, sorted (the sets searched
    ablate distinct units, and the order they are listed in changes no replay)."""
    return json.dumps(sorted(json.dumps(iv.to_json(), sort_keys=True) for iv in fix))


def among(batch: Inputs, batches: Sequence[Inputs]) -> bool:
    """Whether ``batch`` is one of ``batches`` (the same object: variants are compared by identity)."""
    return any(batch is other for other in batches)
