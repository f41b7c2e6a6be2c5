"""CausalCCA: the smallest set of interventions that fixes the failure (causal minimal fix sets).

Search, coarse to fine, every number from exact replays:
1. Rank units by attribution patching, re-weighted by CF anomaly scores (``guided_by``;
   :mod:`~model_forensics.rca.candidates`).
2. Layers: add whole sites (``blocks.L.attn`` / ``blocks.L.mlp``) in rank order until the
   flip rate over the incident's failing variants reaches ``early_stop_threshold``
   (all prefixes evaluated in one batched sweep per variant), then delta-debug to a
   1-minimal set of sites (:mod:`~model_forensics.rca.search`).
3. Heads / neurons inside those sites: the same greedy addition (at most
   ``max_fix_set_size`` members; candidates whose solo benign KL exceeds the side-effect
   bound go last), then delta-debugging removal until removing any member drops the flip
   rate below the threshold (1-minimal). Among removable members, the one with the largest
   benign KL goes first. Searched on ``search_variants`` failing variants, re-measured on
   all, searched again with the missed ones added (``refine_rounds``).
4. When the set's benign side effects exceed the bound: gate it (the members apply only to
   runs a detector upstream of them flags; :mod:`~model_forensics.rca.gating`), and failing
   that, narrow whole heads to their failure directions (:mod:`~model_forensics.rca.narrowing`).
5. Side effects of the result on the benign set; necessity (flip-rate loss when a member is
   removed) and sufficiency (flip rate of the member alone) per member
   (:mod:`~model_forensics.rca.members`); units exact patching implicates
   (:mod:`~model_forensics.rca.implicated`).

``search_strategy: exhaustive`` replaces 3 by a search over every subset (by size) of the
top candidates — exponential, for small spaces and for testing greedy's optimality.
Every knob is in ``modules.cca`` of the config (``configs/default.yaml``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_forensics.core.config import CCAConfig, ForensicsConfig, load_config
from model_forensics.core.errors import ConfigError
from model_forensics.core.records import fields_json
from model_forensics.rca.attribution import Ranking, UnitScore, attribution_ranking
from model_forensics.rca.candidates import Ablation, saturation_note, search_order, unit_count
from model_forensics.rca.compression import AnomalyReport
from model_forensics.rca.gating import gate_if_it_helps, gate_threshold
from model_forensics.rca.heldout import HeldOut
from model_forensics.rca.implicated import implicated_units
from model_forensics.rca.members import FixMember, score_members
from model_forensics.rca.narrowing import narrow_if_it_helps
from model_forensics.rca.notes import Note, distinct
from model_forensics.rca.progress import Progress, silent, step
from model_forensics.rca.search import FixChoice, FixSearch, Found, Refined
from model_forensics.rca.settings import overridden
from model_forensics.rca.side_effects import SideEffects
from model_forensics.rca.smallest import SmallFix, site_of, smaller_wins, smallest_fix
from model_forensics.replay import Intervention, Session

__all__ = ["Ablation", "CausalCCA", "FixMember", "FixSet", "gate_threshold"]

MODES = ("auto", "always", "never")


@dataclass
class FixSet:
    """The result of :meth:`CausalCCA.search_fix_set`."""

    members: list[FixMember]
    total_flip_rate: float
    flips: list[bool]
    reached_threshold: bool
    side_effects: SideEffects | None
    forward_passes: int
    candidates: int
    strategy: str
    guidance: str
    seconds: float
    coarse_sites: list[str] = field(default_factory=list)
    implicated: list[dict[str, Any]] = field(default_factory=list)
    noise_floors: dict[str, float] = field(default_factory=dict)  # per level: head, neuron
    note_records: list[Note] = field(default_factory=list)  # what the search did; ``notes`` renders them
    # forward passes per phase: variants (finding the failing variants), ranking (when
    # computed here), search, gating, narrowing, members (necessity/sufficiency), implicated
    # (exact patching), side_effects (the found set's benign KL, which decides gating and
    # narrowing, and the final measurement); they sum to forward_passes
    phase_passes: dict[str, int] = field(default_factory=dict)
    units_before_narrowing: list[str] = field(default_factory=list)  # whole units, when narrowing replaced them
    # analyze: the fix on the search part and on prompts held out of every fit
    # (:mod:`~model_forensics.rca.heldout`); total_flip_rate, flips and side_effects are the search part's
    held_out: HeldOut | None = None

    @property
    def interventions(self) -> list[Intervention]:
        return [m.intervention for m in self.members]

    @property
    def units(self) -> list[str]:
        return [m.unit for m in self.members]

    @property
    def notes(self) -> list[str]:
        """The notes as the sentences the CLI and the report show."""
        return [str(note) for note in self.note_records]

    @property
    def implicated_units(self) -> list[str]:
        """Units confirmed by exact patching to carry the failure (a superset of what a
        minimal fix needs when the mechanism is redundant)."""
        return [e["unit"] for e in self.implicated]

    def to_json(self) -> dict[str, Any]:
        return {
            "interventions": [m.intervention.to_json() for m in self.members],
            **fields_json(
                self,
                members=[m.to_json() for m in self.members],
                side_effects=None if self.side_effects is None else self.side_effects.to_json(),
                notes=self.notes,
                note_records=[note.to_json() for note in self.note_records],
                held_out=None if self.held_out is None else self.held_out.to_json(),
                flip_rate={
                    "search": self.total_flip_rate,
                    "held_out": None if self.held_out is None else self.held_out.held_out.flip_rate,
                },
            ),
        }


class CausalCCA:
    """Causal minimal fix-set search.

    Every knob is read from ``modules.cca`` of ``config``; a keyword given here overrides
    that one value (None: as configured), validated like the config file.

    Args:
        config: YAML path / ForensicsConfig / mapping / None (the defaults).
        search_strategy: ``greedy`` / ``exhaustive``.
        guidance: ``attribution`` (or None with the default config): attribution order (on
            the zoo it ranks the planted units with AUROC 0.92–1.0, while CF ranks their
            sites worse than activation norm, see benchmarks/results/rca_eval.md;
            ``guided_by`` then only annotates members with their CF score); ``cf``:
            attribution re-weighted by CF for flagged units; ``unguided``: every unit in
            forward order, for comparison.
        neurons_per_site: top-ranked neurons of each coarse MLP site that become candidates.
        search_variants: failing variants the search runs on; the result is re-measured
            on all of them.
        refine_rounds: when the set found flips fewer than ``early_stop_threshold`` of all
            variants, search again with up to ``search_variants`` of the missed variants
            added, at most this many times (counterexample-guided).
        confirm_top: top-ranked heads/neurons confirmed by exact patching (``implicated``).
        confirm_variants: failing variants exact patching averages over.
        directions: ``auto``: when the set's benign KL (as reported: over the whole answer
            for generation) still exceeds ``max_side_effect_kl``, search again over heads
            ablated only along their failure direction (:mod:`~model_forensics.rca.narrowing`)
            and keep that set when it flips as much (up to the threshold) with less KL;
            ``always`` / ``never`` force the choice. Greedy search only (``exhaustive``
            stays a pure search over whole units).
        direction_pool: top-ranked heads the direction search draws from.
        gating: ``auto``: when the set's benign KL exceeds ``max_side_effect_kl``, try the
            same set behind a gate (:mod:`~model_forensics.rca.gating`) and keep it when it
            flips as much (up to the threshold) with less KL; ``always`` / ``never`` force
            the choice.
        sweep_smallest: before the greedy search, sweep every head and the top
            ``sweep_neurons`` neurons alone, then pairs of the top ``sweep_pairs``
            (:mod:`~model_forensics.rca.smallest`); a smaller set reaching the threshold with
            no worse side effects wins (greedy search only).
        max_fix_set_size / early_stop_threshold / max_side_effect_kl / max_accuracy_drop: as in
            the config; the side-effect bound reads KL and accuracy together (a fix that keeps
            one and breaks the other is out of bound, and the note names which).
    Raises:
        ConfigError: a value the config does not allow.
    """

    def __init__(
        self,
        config: str | Path | ForensicsConfig | dict[str, Any] | None = None,
        *,
        search_strategy: str | None = None,
        neurons_per_site: int | None = None,
        guidance: str | None = None,
        search_variants: int | None = None,
        confirm_top: int | None = None,
        refine_rounds: int | None = None,
        confirm_variants: int | None = None,
        directions: str | None = None,
        direction_pool: int | None = None,
        gating: str | None = None,
        sweep_smallest: bool | None = None,
        max_fix_set_size: int | None = None,
        early_stop_threshold: float | None = None,
        max_side_effect_kl: float | None = None,
        max_accuracy_drop: float | None = None,
        step_gate: str | None = None,
    ):
        configured = load_config(config).modules.cca
        if search_strategy not in (None, "greedy", "exhaustive"):
            raise ConfigError(f"unknown search strategy '{search_strategy}': use 'greedy' or 'exhaustive'")
        if guidance not in (None, "attribution", "cf", "unguided"):
            raise ConfigError(f"unknown guidance '{guidance}': use None (attribution), 'cf' or 'unguided'")
        if directions not in (None, *MODES):
            raise ConfigError(f"unknown directions mode '{directions}': use 'auto', 'always' or 'never'")
        if gating not in (None, *MODES):
            raise ConfigError(f"unknown gating mode '{gating}': use 'auto', 'always' or 'never'")
        if step_gate not in (None, *MODES):
            raise ConfigError(f"unknown step-gate mode '{step_gate}': use 'auto', 'always' or 'never'")
        self.config: CCAConfig = overridden(
            configured,
            "the CausalCCA(...) keywords",
            search_strategy=search_strategy,
            neurons_per_site=neurons_per_site,
            guidance=guidance,
            search_variants=search_variants,
            confirm_top=confirm_top,
            refine_rounds=refine_rounds,
            confirm_variants=confirm_variants,
            directions=directions,
            direction_pool=direction_pool,
            gating=gating,
            sweep_smallest=sweep_smallest,
            max_fix_set_size=max_fix_set_size,
            early_stop_threshold=early_stop_threshold,
            max_side_effect_kl=max_side_effect_kl,
            max_accuracy_drop=max_accuracy_drop,
            step_gate=step_gate,
        )

    # The knobs read as attributes too; the config is where they live.
    search_strategy = property(lambda self: self.config.search_strategy)
    neurons_per_site = property(lambda self: self.config.neurons_per_site)
    guidance = property(lambda self: self.config.guidance)
    search_variants = property(lambda self: self.config.search_variants)
    confirm_top = property(lambda self: self.config.confirm_top)
    refine_rounds = property(lambda self: self.config.refine_rounds)
    confirm_variants = property(lambda self: self.config.confirm_variants)
    directions = property(lambda self: self.config.directions)
    direction_pool = property(lambda self: self.config.direction_pool)
    gating = property(lambda self: self.config.gating)
    sweep_smallest = property(lambda self: self.config.sweep_smallest)

    def search_fix_set(
        self,
        session: Session,
        guided_by: AnomalyReport | None = None,
        ranking: Ranking | None = None,
        progress: Progress = silent,
    ) -> FixSet:
        """Find a 1-minimal intervention set that flips the incident's failing variants.

        Args:
            session: a replay Session whose bundle has a failure predicate and fails.
            guided_by: CF anomalies that re-weight the attribution ranking.
            ranking: a precomputed attribution ranking (computed here if None).
            progress: called with (phase, done, total) as the search advances
                (:mod:`~model_forensics.rca.progress` lists the phases).
        Raises:
            ForensicsError: no predicate, or nothing fails (nothing to fix).
        """
        cfg = self.config
        start, phases = time.perf_counter(), _PhasePasses(session)
        search = FixSearch(session, cfg, progress)
        phases.mark("variants")
        ablate = Ablation("mean" if session.baselines else "zero")
        unguided = cfg.guidance == "unguided"
        if ranking is None and not unguided:
            ranking = attribution_ranking(session, progress=progress, positions=cfg.positions)
            phases.mark("ranking")
        weighting = guided_by if cfg.guidance == "cf" else None
        scores = search_order(session, ranking, weighting, unguided)
        saturated = None if unguided else saturation_note(ranking, cfg.saturation_tolerance)
        notes: list[Note] = [] if saturated is None else [saturated]

        refined, fix = self._search(search, scores, ablate, unguided, notes, phases)
        found = refined.found
        benign = bool(session.benign())
        over_bound = fix.benign_kl > cfg.max_side_effect_kl
        if benign and fix.units and (cfg.gating == "always" or (cfg.gating == "auto" and over_bound)):
            done = step(progress, "gating")
            fix = gate_if_it_helps(search, fix, refined.flip_rate, notes)
            done()
            phases.mark("gating")
        whole = fix
        if cfg.search_strategy == "greedy" and cfg.directions != "never" and benign and session.adapter.n_heads:
            if cfg.directions == "always" or fix.benign_kl > cfg.max_side_effect_kl:
                done = step(progress, "narrowing")
                fix = narrow_if_it_helps(search, scores, fix, refined.flip_rate, notes)
                done()
            phases.mark("narrowing")

        scored = score_members(
            session, search.failing, fix.units, fix.ablation, guided_by, fix.solo_kl, progress, search.flip_table
        )
        phases.mark("members")
        fine_members = [m.unit for m in scored.members if m.level != "site"]
        done = step(progress, "implicated")
        implicated = implicated_units(
            session, scores, fine_members, fix.ablation.kind, cfg.confirm_top, cfg.confirm_variants
        )
        done()
        phases.mark("implicated")
        effects = search.side_effects(scored.interventions, progress) if benign else None  # measured once per set
        phases.mark("side_effects")
        if effects is not None and "kl" in effects.out_of_bound:
            notes.append(Note("side_effects_exceed_bound", {"kl": effects.mean_kl, "bound": effects.bound}))
        if effects is not None and "accuracy" in effects.out_of_bound:
            drop = max(effects.accuracy_drop, effects.predicate_changed)
            notes.append(Note("accuracy_exceeds_bound", {"drop": drop, "bound": effects.max_accuracy_drop}))
        return FixSet(
            members=scored.members,
            total_flip_rate=scored.flip_rate,
            flips=scored.flips,
            reached_threshold=search.reaches(scored.flip_rate),
            side_effects=effects,
            forward_passes=phases.total,
            candidates=unit_count(session),
            strategy=cfg.search_strategy,
            guidance="unguided (forward order)" if unguided else "attribution" + (" + CF" if weighting else ""),
            seconds=time.perf_counter() - start,
            coarse_sites=found.sites,
            implicated=implicated.units,
            noise_floors=implicated.noise_floors,
            note_records=distinct(notes),
            phase_passes=phases.counts,
            units_before_narrowing=[] if fix is whole else [u.unit for u in whole.units],
        )

    def _search(
        self,
        search: FixSearch,
        scores: list[UnitScore],
        ablate: Ablation,
        unguided: bool,
        notes: list[Note],
        phases: _PhasePasses,
    ) -> tuple[Refined, FixChoice]:
        """The smallest-fix sweep, then (unless it found one unit within the side-effect
        bound) the coarse-to-fine greedy search; the smaller set wins when its side effects
        are no worse (:func:`~model_forensics.rca.smallest.smaller_wins`)."""
        cfg = self.config
        small = smallest_fix(search, scores, ablate) if cfg.sweep_smallest and cfg.search_strategy == "greedy" else None
        phases.mark("smallest")
        small_kl = None
        if small is not None and len(small.units) == 1:
            small_kl = search.benign_kl(ablate.all(small.units))
            phases.mark("side_effects")
            if small_kl <= cfg.max_side_effect_kl:  # nothing smaller exists: no greedy search
                notes.append(Note("smallest_found", _small_numbers(small, small_kl)))
                return _as_refined(small), FixChoice(small.units, ablate, small_kl, small.solo_kl)
        refined = search.refine(lambda vs: search.coarse_to_fine(vs, scores, ablate, unguided, notes), ablate, notes)
        phases.mark("search")
        found = refined.found
        fix = FixChoice(found.units, ablate, search.benign_kl(ablate.all(found.units)), found.solo_kl)
        phases.mark("side_effects")
        reaches = search.reaches(refined.flip_rate)
        if small is None or (len(small.units) >= len(found.units) and reaches):
            return refined, fix
        small_kl = search.benign_kl(ablate.all(small.units)) if small_kl is None else small_kl
        phases.mark("side_effects")
        if smaller_wins(small, small_kl, len(found.units), reaches, fix.benign_kl, cfg.max_side_effect_kl):
            greedy = {
                "greedy_size": len(found.units),
                "greedy_flip_rate": refined.flip_rate,
                "greedy_kl": fix.benign_kl,
            }
            notes.append(Note("smaller_than_greedy", {**_small_numbers(small, small_kl), **greedy}))
            return _as_refined(small), FixChoice(small.units, ablate, small_kl, {**found.solo_kl, **small.solo_kl})
        return refined, fix


def _small_numbers(small: SmallFix, kl: float) -> dict[str, Any]:
    units = ", ".join(u.unit for u in small.units)
    return {"units": units, "size": len(small.units), "flip_rate": small.flip_rate, "kl": kl, "tried": small.tried}


def _as_refined(small: SmallFix) -> Refined:
    sites = sorted({site_of(u.unit) for u in small.units})
    return Refined(Found(small.units, sites, {}), small.flip_rate)


class _PhasePasses:
    """Forward passes spent since the previous mark, per named phase."""

    def __init__(self, session: Session):
        self.session, self.first = session, session.forward_passes
        self.last = self.first
        self.counts: dict[str, int] = {}

    def mark(self, name: str) -> None:
        now = self.session.forward_passes
        self.counts[name] = self.counts.get(name, 0) + now - self.last
        self.last = now

    @property
    def total(self) -> int:
        return self.session.forward_passes - self.first
