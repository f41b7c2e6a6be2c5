"""CausalCCA: the smallest set of interventions that fixes the failure (causal minimal fix sets).

Search, coarse to fine, every number from exact replays:
1. Rank units by attribution patching, re-weighted by CF anomaly scores (``guided_by``).
2. Layers: add whole sites (``blocks.L.attn`` / ``blocks.L.mlp``) in rank order until the
   flip rate over the incident's failing variants reaches ``early_stop_threshold``
   (all prefixes evaluated in one batched sweep per variant), then delta-debug to a
   1-minimal set of sites.
3. Heads / neurons inside those sites: the same greedy addition (at most
   ``max_fix_set_size`` members; candidates whose solo benign KL exceeds the side-effect
   bound go last), then delta-debugging removal until removing any member drops the flip
   rate below the threshold (1-minimal). Among removable members, the one with the largest
   benign KL goes first.
4. When the set's benign side effects exceed the bound: gate it (see :meth:`CausalCCA._gate`:
   the members apply only to runs a detector upstream of them flags), and failing that,
   narrow whole heads to their failure directions (:meth:`CausalCCA._narrow`).
5. Side effects of the result on the benign set; necessity (flip-rate loss when a member is
   removed) and sufficiency (flip rate of the member alone) per member.

``search_strategy: exhaustive`` replaces 3 by a search over every subset (by size) of the
top candidates — exponential, for small spaces and for testing greedy's optimality.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from model_forensics.core.config import CCAConfig, ForensicsConfig, load_config
from model_forensics.core.errors import ConfigError, ForensicsError
from model_forensics.core.sites import block_index
from model_forensics.rca.attribution import Ranking, UnitScore, attribution_ranking, exact_effects
from model_forensics.rca.compression import AnomalyReport
from model_forensics.rca.runs import capture
from model_forensics.rca.side_effects import SideEffects, benign_kls, measure
from model_forensics.replay.interventions import GATE_READS, Gate, Intervention

Inputs = dict[str, torch.Tensor]
MAX_EXHAUSTIVE = 12
SEQUENTIAL_FROM = 12  # larger sets get a sequential removal pass before the batched rounds
GATE_SLACK = 0.01  # a gate opens this many score scales (std of baseline scores) above the largest
RELATIVE_FLOOR = 0.01  # implicated units carry ≥ 1 % of their level's largest exact effect


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
        return {
            "intervention": self.intervention.to_json(),
            "unit": self.unit,
            "level": self.level,
            "attribution": self.attribution,
            "cf_score": self.cf_score,
            "necessity": self.necessity,
            "sufficiency": self.sufficiency,
            "benign_kl": self.benign_kl,
        }


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
    notes: list[str] = field(default_factory=list)
    # forward passes per phase: variants (finding the failing variants), ranking (when
    # computed here), search, gating, narrowing, members (necessity/sufficiency), implicated
    # (exact patching), side_effects (the found set's benign KL, which decides gating and
    # narrowing, and the final measurement); they sum to forward_passes
    phase_passes: dict[str, int] = field(default_factory=dict)

    @property
    def interventions(self) -> list[Intervention]:
        return [m.intervention for m in self.members]

    @property
    def units(self) -> list[str]:
        return [m.unit for m in self.members]

    @property
    def implicated_units(self) -> list[str]:
        """Units confirmed by exact patching to carry the failure (a superset of what a
        minimal fix needs when the mechanism is redundant)."""
        return [e["unit"] for e in self.implicated]

    def to_json(self) -> dict[str, Any]:
        return {
            "interventions": [m.intervention.to_json() for m in self.members],
            "members": [m.to_json() for m in self.members],
            "total_flip_rate": self.total_flip_rate,
            "flips": self.flips,
            "reached_threshold": self.reached_threshold,
            "side_effects": None if self.side_effects is None else self.side_effects.to_json(),
            "forward_passes": self.forward_passes,
            "candidates": self.candidates,
            "strategy": self.strategy,
            "guidance": self.guidance,
            "seconds": self.seconds,
            "coarse_sites": self.coarse_sites,
            "implicated": self.implicated,
            "noise_floors": self.noise_floors,
            "notes": self.notes,
            "phase_passes": self.phase_passes,
        }


class CausalCCA:
    """Causal minimal fix-set search.

    Args:
        config: YAML path / ForensicsConfig / None (``modules.cca``).
        search_strategy: overrides the config's ``greedy`` / ``exhaustive``.
        neurons_per_site: top-ranked neurons of each coarse MLP site that become candidates.
        guidance: None: attribution order (the default: on the zoo it ranks the planted
            units with AUROC 0.92–1.0, while CF ranks their sites worse than activation
            norm, see benchmarks/results/rca_eval.md; ``guided_by`` then only annotates
            members with their CF score); ``"cf"``: attribution re-weighted by CF for
            flagged units; ``"unguided"``: every unit in forward order, for comparison.
        search_variants: failing variants the search runs on; the result is re-measured
            on all of them.
        refine_rounds: when the set found flips fewer than ``early_stop_threshold`` of all
            variants, search again with up to ``search_variants`` of the missed variants
            added, at most this many times (counterexample-guided).
        confirm_top: top-ranked heads/neurons confirmed by exact patching (``implicated``).
        confirm_variants: failing variants exact patching averages over.
        directions: ``auto``: when the set's benign KL (as reported: over the whole answer
            for generation) still exceeds ``max_side_effect_kl``, search again over heads ablated only along their failure
            direction (see :meth:`_narrow`) and keep that set when it flips as much (up to
            the threshold) with less KL; ``always`` / ``never`` force the choice. Greedy
            search only (``exhaustive`` stays a pure search over whole units).
        direction_pool: top-ranked heads the direction search draws from.
        gating: ``auto``: when the set's benign KL exceeds ``max_side_effect_kl``,
            try the same set behind a gate (see :meth:`_gate`) and keep it when it flips as
            much (up to the threshold) with less KL; ``always`` / ``never`` force the choice.
    """

    def __init__(
        self,
        config: str | Path | ForensicsConfig | None = None,
        *,
        search_strategy: str | None = None,
        neurons_per_site: int = 48,
        guidance: str | None = None,
        search_variants: int = 12,
        confirm_top: int = 48,
        refine_rounds: int = 2,
        confirm_variants: int = 16,
        directions: str = "auto",
        direction_pool: int = 60,
        gating: str = "auto",
    ):
        full = load_config(config)
        self.config: CCAConfig = full.modules.cca
        if search_strategy is not None:
            try:
                self.config = CCAConfig.model_validate({**self.config.model_dump(), "search_strategy": search_strategy})
            except ValidationError as exc:
                raise ConfigError(f"unknown search strategy '{search_strategy}': use 'greedy' or 'exhaustive'") from exc
        self.neurons_per_site = neurons_per_site
        if guidance not in (None, "cf", "unguided"):
            raise ConfigError(f"unknown guidance '{guidance}': use None (attribution), 'cf' or 'unguided'")
        self.guidance = guidance
        self.search_variants = search_variants
        self.confirm_top = confirm_top
        self.refine_rounds = refine_rounds
        self.confirm_variants = confirm_variants
        if directions not in ("auto", "always", "never"):
            raise ConfigError(f"unknown directions mode '{directions}': use 'auto', 'always' or 'never'")
        self.directions = directions
        self.direction_pool = direction_pool
        if gating not in ("auto", "always", "never"):
            raise ConfigError(f"unknown gating mode '{gating}': use 'auto', 'always' or 'never'")
        self.gating = gating

    def search_fix_set(
        self, session: Any, guided_by: AnomalyReport | None = None, ranking: Ranking | None = None
    ) -> FixSet:
        """Find a 1-minimal intervention set that flips the incident's failing variants.

        Args:
            session: a replay Session whose bundle has a failure predicate and fails.
            guided_by: CF anomalies that re-weight the attribution ranking.
            ranking: a precomputed attribution ranking (computed here if None).
        Raises:
            ForensicsError: no predicate, or nothing fails (nothing to fix).
        """
        start, before = time.perf_counter(), session.forward_passes
        phases = _Phases(session)
        all_variants = self._failing_variants(session)
        phases.mark("variants")
        # Search on a fixed subset; the reported flip rate is re-measured on every variant.
        variants = all_variants[: self.search_variants]
        ablate = Ablation("mean" if session.baselines else "zero")
        unguided = self.guidance == "unguided"
        if ranking is None and not unguided:
            ranking = attribution_ranking(session)
            phases.mark("ranking")
        weighting = guided_by if self.guidance == "cf" else None
        scores = _guided_scores(session, ranking, weighting, unguided)
        notes: list[str] = []
        guidance = "unguided (forward order)" if unguided else "attribution" + (" + CF" if weighting else "")

        found = self._refined(
            session,
            all_variants,
            variants,
            lambda vs: self._search(session, vs, scores, ablate, unguided, notes),
            ablate,
            notes,
        )
        _, sites, chosen, solo_kl = found
        phases.mark("search")
        greedy = self.config.search_strategy == "greedy"
        bound = self.config.max_side_effect_kl
        unit_kl = self._kl(session, [ablate(u) for u in chosen])
        phases.mark("side_effects")
        if session.benign() and chosen and (self.gating == "always" or (self.gating == "auto" and unit_kl > bound)):
            ablate, unit_kl = self._gated(session, all_variants, variants, chosen, ablate, (found[0], unit_kl), notes)
            phases.mark("gating")
        if greedy and self.directions != "never" and session.benign() and session.adapter.n_heads:
            if self.directions == "always" or unit_kl > bound:
                narrowed = self._narrow(session, all_variants, variants, scores, ablate, notes)
                narrowed_kl = self._kl(session, [narrowed[1](u) for u in narrowed[0][2]])
                if narrowed[0][0] >= min(found[0], self.config.early_stop_threshold) and narrowed_kl < unit_kl:
                    notes.append(
                        f"narrowed to failure directions: benign KL {unit_kl:.3g} → {narrowed_kl:.3g} "
                        f"nats at flip rate {narrowed[0][0]:.0%} (whole units: {found[0]:.0%})"
                    )
                    (_, _, chosen, solo_kl), ablate = narrowed
                else:
                    notes.append(
                        f"narrowing to failure directions did not help (flip rate {narrowed[0][0]:.0%}, benign "
                        f"KL {narrowed_kl:.3g} vs {unit_kl:.3g} nats for whole units); whole units kept"
                    )
            phases.mark("narrowing")
        members, flips, rate = self._members(session, all_variants, chosen, ablate, guided_by, solo_kl)
        phases.mark("members")
        implicated, floors = self._implicated(session, scores, members, ablate)
        phases.mark("implicated")
        effects = (
            measure(session, [m.intervention for m in members], self.config.max_side_effect_kl)
            if session.benign()
            else None
        )
        phases.mark("side_effects")
        if effects is not None and not effects.within_bound:
            notes.append(
                f"side effects exceed the bound: mean benign KL {effects.mean_kl:.3g} > {effects.bound:g} nats"
            )
        return FixSet(
            members=members,
            total_flip_rate=rate,
            flips=flips,
            reached_threshold=rate >= self.config.early_stop_threshold,
            side_effects=effects,
            forward_passes=session.forward_passes - before,
            candidates=_unit_count(session),
            strategy=self.config.search_strategy,
            guidance=guidance,
            seconds=time.perf_counter() - start,
            coarse_sites=sites,
            implicated=implicated,
            noise_floors=floors,
            notes=list(dict.fromkeys(notes)),
            phase_passes=phases.counts,
        )

    def _refined(
        self,
        session: Any,
        all_variants: list[Inputs],
        variants: list[Inputs],
        search: Any,
        ablate: Ablation,
        notes: list[str],
    ) -> tuple[float, list[str], list[UnitScore], dict[str, float]]:
        """Counterexample-guided: ``search(variants)`` on a subset, re-measure the set on every
        failing variant, and search again with the variants it does not flip added (at most
        ``refine_rounds`` times). Returns (flip rate on all variants, sites, units, solo KLs)."""
        best: tuple[float, list[str], list[UnitScore], dict[str, float]] | None = None
        for round_ in range(self.refine_rounds + 1):
            found = search(variants)
            (flipped,) = self._flip_rates(session, all_variants, [[ablate(u) for u in found[1]]])
            rate = sum(flipped) / len(flipped)
            if best is None or rate > best[0]:
                best = (rate, *found)
            missed = [v for v, f in zip(all_variants, flipped, strict=True) if not f and not _among(v, variants)]
            if rate >= self.config.early_stop_threshold or not missed or round_ == self.refine_rounds:
                break
            added = missed[: self.search_variants]
            notes.append(
                f"round {round_ + 1}: the set found on {len(variants)} variants flips {rate:.0%} of all "
                f"{len(all_variants)}; searching again with {len(added)} of the variants it misses added"
            )
            variants = variants + added
        assert best is not None  # the loop runs at least once
        return best

    def _narrow(
        self,
        session: Any,
        all_variants: list[Inputs],
        variants: list[Inputs],
        scores: list[UnitScore],
        ablate: Ablation,
        notes: list[str],
    ) -> tuple[tuple[float, list[str], list[UnitScore], dict[str, float]], Ablation]:
        """The same greedy search over the top ``direction_pool`` heads, each ablated only along
        its failure direction (rank 1 of d_head): failing variants minus baselines, mean head
        output at the last prompt position. Benign inputs sit near the baseline along that
        direction, so the ablation barely moves them."""
        pool = [u for u in scores if u.level == "head"][: self.direction_pool]
        narrowed = Ablation(ablate.kind, _failure_directions(session, all_variants, [u.unit for u in pool]))
        solo_kl = self._solo_kl(session, pool, narrowed)

        def search(vs: list[Inputs]) -> tuple[list[str], list[UnitScore], dict[str, float]]:
            chosen, rate = self._greedy(session, vs, pool, narrowed, self.config.max_fix_set_size)
            if rate >= self.config.early_stop_threshold:
                chosen = self._minimise(session, vs, chosen, narrowed, solo_kl)
            return sorted({u.unit.rsplit(".head.", 1)[0] for u in chosen}), chosen, solo_kl

        return self._refined(session, all_variants, variants, search, narrowed, notes), narrowed

    def _gated(
        self,
        session: Any,
        all_variants: list[Inputs],
        variants: list[Inputs],
        chosen: list[UnitScore],
        ablate: Ablation,
        ungated: tuple[float, float],
        notes: list[str],
    ) -> tuple[Ablation, float]:
        """The ablation to keep, gated or not, and its benign KL. ``ungated``: the
        set's flip rate on all variants and its KL."""
        gated = self._gate(session, all_variants, variants, chosen, ablate)
        if gated is None:
            notes.append("no site upstream of the fix set can carry a gate; the fix stays ungated")
            return ablate, ungated[1]
        rate, gate_ablate, detected, shared = gated
        gate_kl = self._kl(session, [gate_ablate(u) for u in chosen])
        gate = gate_ablate.gate
        assert gate is not None
        what = (
            f"a gate at {gate.site} ({'last prompt position' if gate.reads == 'last' else 'largest over the prompt'}, "
            f"along the failure direction, above {gate.above:.4g}) "
            f"fires on {detected:.0%} of the failing variants and on none of the baselines"
            + (
                f" ({shared} of which are benign prompts, so the gate's side effects on those are in-sample; "
                "check it on held-out prompts with side_effects.measure(..., benign=[…]))"
                if shared
                else ""
            )
        )
        if rate >= min(ungated[0], self.config.early_stop_threshold) and gate_kl < ungated[1]:
            notes.append(
                f"gated: {what}; benign KL {ungated[1]:.3g} → {gate_kl:.3g} nats at flip rate {rate:.0%} "
                f"(ungated: {ungated[0]:.0%})"
            )
            return gate_ablate, gate_kl
        notes.append(
            f"gating did not help ({what}; flip rate {rate:.0%}, benign KL {gate_kl:.3g} vs "
            f"{ungated[1]:.3g} nats ungated); the fix stays ungated"
        )
        return ablate, ungated[1]

    def _gate(
        self,
        session: Any,
        all_variants: list[Inputs],
        variants: list[Inputs],
        chosen: list[UnitScore],
        ablate: Ablation,
    ) -> tuple[float, Ablation, float, int] | None:
        """The set behind a gate: a detector on ``blocks.L.resid_post`` (L below every member's
        block), along the failing variants' mean minus the baselines' mean (at the last
        prompt position, or over positions for a gate that reads the largest projection over
        the prompt), opening above the largest baseline score, so it stays shut on every
        baseline (the benign set stands in when there are none). The site and reading whose
        gate fires on most failing variants are chosen. Returns (flip rate on all variants, the gated
        ablation, fraction of failing variants the gate fires on, how many calibration inputs
        are benign prompts), or None when no block sits below the members."""
        layers = [block_index(u.unit) for u in chosen]
        lowest = min(-1 if layer is None else layer for layer in layers)
        sites = [f"blocks.{layer}.resid_post" for layer in range(lowest)]
        sites = [site for site in sites if site in session.adapter.points]
        if not sites:
            return None
        reference = list(session.baselines or session.benign())
        shared = sum(any(torch.equal(r["input_ids"], b["input_ids"]) for b in session.benign()) for r in reference)

        def prompts(batches: list[Inputs]) -> dict[str, list[torch.Tensor]]:
            rows = [capture(session, batch, granularity="layer", sites=sites) for batch in batches]
            return {site: [r[site] for r in rows] for site in sites}

        # The search variants are among all variants: capture each input once.
        ref, every = prompts(reference), prompts(all_variants)
        fitted = [i for i, v in enumerate(all_variants) if _among(v, variants)]
        fit = {site: [xs[i] for i in fitted] for site, xs in every.items()}
        best: tuple[float, float, Gate] | None = None
        for site, reads in itertools.product(sites, GATE_READS):
            # "last": the last prompt position; "max": any position (mean over positions fits it).
            pick = (lambda x: x[-1]) if reads == "last" else (lambda x: x.mean(0))
            direction = _mean_of(pick, fit[site]) - _mean_of(pick, ref[site])
            if not bool(direction.abs().max() > 0):
                continue
            probe = Gate(site, tuple(direction.tolist()), 0.0, reads)
            ref_scores = torch.tensor([probe.score(x) for x in ref[site]])
            scores = torch.tensor([probe.score(x) for x in every[site]])
            above, scale = gate_threshold(ref_scores)
            detected = float((scores > above).double().mean())
            margin = float(scores.median() - above) / scale
            if best is None or (detected, margin) > best[:2]:
                best = (detected, margin, dataclasses.replace(probe, above=above))
        if best is None:
            return None
        gated = Ablation(ablate.kind, ablate.directions, best[2])
        (flipped,) = self._flip_rates(session, all_variants, [[gated(u) for u in chosen]])
        return sum(flipped) / len(flipped), gated, best[0], shared

    def _search(
        self,
        session: Any,
        variants: list[Inputs],
        scores: list[UnitScore],
        ablate: Ablation,
        unguided: bool,
        notes: list[str],
    ) -> tuple[list[str], list[UnitScore], dict[str, float]]:
        """Coarse sites, then heads/neurons inside them, on ``variants``: (sites, chosen units, solo KLs)."""
        coarse = [u for u in scores if u.level == "site"]
        coarse_set, rate = self._greedy(session, variants, coarse, ablate, len(coarse))
        if rate < self.config.early_stop_threshold:
            notes.append(f"ablating every attention and MLP site flips only {rate:.0%}; reporting the best set found")
        coarse_set = self._minimise(session, variants, coarse_set, ablate, {})
        sites = [u.unit for u in coarse_set]

        fine = _fine_candidates(scores, sites, self.neurons_per_site)
        solo_kl = self._solo_kl(session, fine, ablate)
        fine.sort(
            key=lambda u: (
                (solo_kl.get(u.unit, 0.0) > self.config.max_side_effect_kl, -u.score) if not unguided else (0, 0)
            )
        )
        if self.config.search_strategy == "exhaustive":
            chosen, rate = self._exhaustive(session, variants, fine, ablate)
        else:
            chosen, rate = self._greedy(session, variants, fine, ablate, self.config.max_fix_set_size)
            if rate >= self.config.early_stop_threshold:
                chosen = self._minimise(session, variants, chosen, ablate, solo_kl)
        if rate < self.config.early_stop_threshold or not chosen:
            notes.append("heads/neurons alone do not reach the threshold; the fix set is the coarse (site-level) set")
            chosen = coarse_set
            if len(chosen) > self.config.max_fix_set_size:
                notes.append(
                    f"the site-level set needs {len(chosen)} sites; reporting the top {self.config.max_fix_set_size} "
                    "(max_fix_set_size)"
                )
                chosen = chosen[: self.config.max_fix_set_size]
        return sites, chosen, solo_kl

    def _implicated(
        self, session: Any, scores: list[UnitScore], members: list[FixMember], ablate: Ablation
    ) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """Exact patching of the top-ranked heads/neurons (and the fix members), each against
        a noise floor of its own level: the largest |effect| of as many random units of that
        level (at least 16), so generally important heads do not hide failure-specific
        neurons, and at least ``RELATIVE_FLOOR`` of the level's largest effect. A unit is
        implicated when its effect exceeds its level's floor."""
        fine = [u for u in scores if u.level in ("head", "neuron")]
        if not fine:
            return [], {}
        names = [u.unit for u in fine]
        top = list(dict.fromkeys([m.unit for m in members if m.level != "site"] + names[: self.confirm_top]))
        level = {u.unit: u.level for u in fine}
        generator = torch.Generator().manual_seed(0)
        random_units: dict[str, list[str]] = {}
        for lvl in ("head", "neuron"):
            rest = [u for u in names if level[u] == lvl and u not in top]
            count = max(16, sum(level[u] == lvl for u in top))
            random_units[lvl] = [rest[i] for i in torch.randperm(len(rest), generator=generator)[:count].tolist()]
        effects = exact_effects(
            session,
            top + random_units["head"] + random_units["neuron"],
            ablate.kind,
            max_variants=self.confirm_variants,
        )
        # A level's floor: the largest random |effect|, and at least RELATIVE_FLOOR of the
        # level's largest effect (when random units are all ~0, tiny effects are not evidence).
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
        return implicated, floors

    # -- evaluation ------------------------------------------------------------------------
    def _failing_variants(self, session: Any) -> list[Inputs]:
        if session.predicate is None:
            raise ForensicsError(
                "the bundle has no failure predicate, so there is nothing to fix; record one with --predicate"
            )
        failing = [v for v in session.variants() if session.sweep([[]], inputs=v)[0].failed]
        if not failing:
            raise ForensicsError(
                "the model does not fail on this incident (the predicate does not hold): nothing to fix"
            )
        return failing

    def _flip_rates(self, session: Any, variants: list[Inputs], sets: list[list[Intervention]]) -> list[list[bool]]:
        """flips[set][variant] from one batched sweep per variant."""
        flips: list[list[bool]] = [[] for _ in sets]
        for batch in variants:
            results = session.sweep(sets, inputs=batch)
            for i, r in enumerate(results):
                flips[i].append(not r.failed)
        return flips

    def _greedy(
        self, session: Any, variants: list[Inputs], ranked: list[UnitScore], ablate: Ablation, limit: int
    ) -> tuple[list[UnitScore], float]:
        """The shortest rank-order prefix reaching the threshold (or the best prefix)."""
        best: tuple[list[UnitScore], float] = ([], 0.0)
        chunk = 8
        for lo in range(0, min(limit, len(ranked)), chunk):
            sizes = list(range(lo + 1, min(limit, len(ranked), lo + chunk) + 1))
            sets = [[ablate(u) for u in ranked[:k]] for k in sizes]
            for k, flips in zip(sizes, self._flip_rates(session, variants, sets), strict=True):
                rate = sum(flips) / len(flips)
                if rate > best[1]:
                    best = (ranked[:k], rate)
                if rate >= self.config.early_stop_threshold:
                    return ranked[:k], rate
        return best

    def _minimise(
        self, session: Any, variants: list[Inputs], chosen: list[UnitScore], ablate: Ablation, solo_kl: dict[str, float]
    ) -> list[UnitScore]:
        """Delta-debugging removal to a 1-minimal set: drop members while the rest still flips.

        Each round replays every one-member-removed set and drops the removable member with
        the largest benign KL. Sets larger than ``SEQUENTIAL_FROM`` first get one sequential
        pass in that order (one set per check, so the pass costs O(n) runs, not O(n²)); the
        rounds then confirm 1-minimality."""
        current = list(chosen)
        if len(current) > SEQUENTIAL_FROM:
            for member in sorted(current, key=lambda m: (-solo_kl.get(m.unit, 0.0), m.score)):
                rest = [u for u in current if u is not member]
                (flipped,) = self._flip_rates(session, variants, [[ablate(u) for u in rest]])
                if sum(flipped) / len(flipped) >= self.config.early_stop_threshold:
                    current = rest
        while len(current) > 1:
            without = [[ablate(u) for u in current if u is not m] for m in current]
            flips = self._flip_rates(session, variants, without)
            removable = [
                m for m, f in zip(current, flips, strict=True) if sum(f) / len(f) >= self.config.early_stop_threshold
            ]
            if not removable:
                break
            drop = max(removable, key=lambda m: (solo_kl.get(m.unit, 0.0), -m.score))
            current.remove(drop)
        return current

    def _exhaustive(
        self, session: Any, variants: list[Inputs], ranked: list[UnitScore], ablate: Ablation
    ) -> tuple[list[UnitScore], float]:
        pool = ranked[:MAX_EXHAUSTIVE]
        best: tuple[list[UnitScore], float] = ([], 0.0)
        for size in range(1, min(len(pool), self.config.max_fix_set_size) + 1):
            combos = [list(c) for c in itertools.combinations(pool, size)]
            flips = self._flip_rates(session, variants, [[ablate(u) for u in c] for c in combos])
            rates = [sum(f) / len(f) for f in flips]
            top = max(range(len(combos)), key=lambda i: rates[i])
            if rates[top] > best[1]:
                best = (combos[top], rates[top])
            if rates[top] >= self.config.early_stop_threshold:
                return best
        return best

    def _kl(self, session: Any, fix: list[Intervention]) -> float:
        """The side-effect KL the result reports (over the whole clean answer for generation)."""
        if not session.benign():
            return 0.0
        return measure(session, fix, self.config.max_side_effect_kl).mean_kl

    def _solo_kl(self, session: Any, fine: list[UnitScore], ablate: Ablation) -> dict[str, float]:
        if not session.benign() or not fine:
            return {}
        pool = fine[: max(self.config.max_fix_set_size, 16)]
        kls = benign_kls(session, [[ablate(u)] for u in pool])
        return {u.unit: sum(k) / len(k) for u, k in zip(pool, kls, strict=True)}

    def _members(
        self,
        session: Any,
        variants: list[Inputs],
        chosen: list[UnitScore],
        ablate: Ablation,
        guided_by: AnomalyReport | None,
        solo_kl: dict[str, float],
    ) -> tuple[list[FixMember], list[bool], float]:
        full = [ablate(u) for u in chosen]
        sets = [full] + [[iv for iv in full if iv is not full[i]] for i in range(len(full))] + [[iv] for iv in full]
        flips = self._flip_rates(session, variants, sets)
        rates = [sum(f) / len(f) for f in flips]
        n = len(full)
        members = [
            FixMember(
                intervention=full[i],
                unit=u.unit,
                level=u.level,
                attribution=u.score,
                cf_score=_cf(guided_by, u.unit),
                necessity=rates[0] - rates[1 + i],
                sufficiency=rates[1 + n + i],
                benign_kl=solo_kl.get(u.unit),
            )
            for i, u in enumerate(chosen)
        ]
        return members, flips[0], rates[0]


@dataclass(frozen=True)
class Ablation:
    """How a unit is ablated: ``kind`` (mean over the baseline set, or zero), restricted to
    the unit's failure direction where ``directions`` holds one, behind ``gate`` if any."""

    kind: str
    directions: dict[str, tuple[float, ...]] = field(default_factory=dict)
    gate: Gate | None = None

    def __call__(self, unit: UnitScore) -> Intervention:
        # Along a direction, ``mean`` writes the baseline mean over all positions: on SmolLM2
        # it moved benign answers less than the mean at the last prompt position (align='last').
        return Intervention(site=unit.unit, kind=self.kind, direction=self.directions.get(unit.unit), gate=self.gate)


class _Phases:
    """Forward passes spent since the previous mark, per named phase."""

    def __init__(self, session: Any):
        self.session, self.last = session, session.forward_passes
        self.counts: dict[str, int] = {}

    def mark(self, name: str) -> None:
        now = self.session.forward_passes
        self.counts[name] = self.counts.get(name, 0) + now - self.last
        self.last = now


def gate_threshold(ref_scores: torch.Tensor) -> tuple[float, float]:
    """(threshold, score scale) of a gate from its baseline scores: a hair above the largest,
    so batch-size rounding cannot open the gate on a baseline. The scale (the scores' std)
    has a floor of 0.1 % of the largest |score|: a prompt-wide maximum is often the same for
    every baseline (a shared template prefix), which gives a spread of zero."""
    scale = max(float(ref_scores.std()), 1e-3 * float(ref_scores.abs().max()), 1e-12)
    return float(ref_scores.max()) + GATE_SLACK * scale, scale


def _mean_of(pick: Any, tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([pick(x).double() for x in tensors]).mean(0)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _failure_directions(
    session: Any, failing: list[Inputs], heads: list[str], limit: int = 16
) -> dict[str, tuple[float, ...]]:
    """Per head: its mean output (z) at the last prompt position over up to ``limit``
    failing variants minus the same over the baseline set (the benign set when there is none)."""
    where = {h: (h.rsplit(".head.", 1)[0] + ".z", int(h.rsplit(".head.", 1)[1])) for h in heads}
    sites = list(dict.fromkeys(site for site, _ in where.values()))
    reference = list(session.baselines or session.benign())[:limit]

    def mean_last(batches: list[Inputs]) -> dict[str, torch.Tensor]:
        total: dict[str, torch.Tensor] = {}
        for batch in batches:
            got = capture(session, batch, granularity="layer", sites=sites)
            for site in sites:
                total[site] = total.get(site, 0) + got[site][-1].double()
        return {site: t / len(batches) for site, t in total.items()}

    bad, good = mean_last(failing[:limit]), mean_last(reference)
    out = {}
    for head, (site, index) in where.items():
        diff = bad[site][index] - good[site][index]
        if bool(diff.abs().max() > 0):
            out[head] = tuple(diff.tolist())
    return out


def _among(batch: Inputs, batches: list[Inputs]) -> bool:
    return any(batch is other for other in batches)


def _cf(report: AnomalyReport | None, unit: str) -> float:
    if report is None:
        return 0.0
    site = unit.split("[")[0].removesuffix(".post")
    return max(report.score(unit), report.score(site))


def _guided_scores(
    session: Any, ranking: Ranking | None, guided_by: AnomalyReport | None, unguided: bool
) -> list[UnitScore]:
    """Units in search order. Guided: attribution × (1 + CF score / threshold) for flagged
    units; unguided: every site/head/neuron in forward order."""
    if unguided or ranking is None:
        return _forward_order_units(session)
    out = []
    for u in ranking.units:
        weight = 1.0
        if guided_by is not None:
            cf = _cf(guided_by, u.unit)
            if cf > guided_by.threshold:
                weight += cf / guided_by.threshold
        out.append(UnitScore(u.unit, u.level, u.score * weight if u.score > 0 else u.score))
    out.sort(key=lambda u: -u.score)
    return out


def _forward_order_units(session: Any) -> list[UnitScore]:
    adapter = session.adapter
    units = []
    for layer in range(adapter.n_layers):
        units += [UnitScore(f"blocks.{layer}.attn", "site", 0.0), UnitScore(f"blocks.{layer}.mlp", "site", 0.0)]
        units += [UnitScore(f"blocks.{layer}.attn.head.{h}", "head", 0.0) for h in range(adapter.n_heads or 0)]
        d_mlp = _d_mlp(session, layer)
        units += [UnitScore(f"blocks.{layer}.mlp.post[{i}]", "neuron", 0.0) for i in range(d_mlp)]
    return units


def _d_mlp(session: Any, layer: int) -> int:
    cfg = getattr(session.model, "config", None)
    for name in ("intermediate_size", "n_inner"):
        value = getattr(cfg, name, None)
        if value:
            return int(value)
    return 4 * int(session.adapter.d_model or 0)


def _fine_candidates(scores: list[UnitScore], sites: Sequence[str], per_site: int) -> list[UnitScore]:
    fine: list[UnitScore] = []
    for site in sites:
        if site.endswith(".attn"):
            fine += [u for u in scores if u.level == "head" and u.unit.startswith(site + ".head.")]
        elif site.endswith(".mlp"):
            fine += [u for u in scores if u.level == "neuron" and u.unit.startswith(site + ".post[")][:per_site]
    return fine


def _unit_count(session: Any) -> int:
    adapter = session.adapter
    return sum((adapter.n_heads or 0) + _d_mlp(session, layer) for layer in range(adapter.n_layers))
