"""Gating a fix set: apply it only to runs a detector upstream of it flags.

The detector reads ``blocks.L.resid_post`` (L below every member's block) and projects it
on the failing variants' mean minus the reference prompts' mean, either at the last prompt
position (``reads="last"``) or as the largest projection over the prompt (``reads="max"``,
direction fitted on the mean over positions). The reference prompts are the baselines (the
benign set stands in when there are none) plus the near misses (``extras.near_miss``:
prompts with the trigger on which the model behaves), so the direction separates "will
comply" from "trigger present". It opens a hair above the largest reference score
(:func:`gate_threshold`), so it stays shut on every baseline and every near miss it was
fitted on. Of all sites and readings, the one firing on most failing variants
wins (ties: the larger median margin in score scales). The gated set is kept when it flips
as much as the ungated one (up to the threshold) with less benign KL; it is not run when the
gate opens on fewer failing variants than that (it cannot flip more than it opens on).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from model_forensics.core.sites import block_index
from model_forensics.rca.attribution import UnitScore
from model_forensics.rca.candidates import Ablation
from model_forensics.rca.notes import Note
from model_forensics.rca.runs import Inputs, capture, flip_rate
from model_forensics.rca.search import FixChoice, FixSearch, among
from model_forensics.replay import Gate
from model_forensics.replay.interventions import GATE_READS

GATE_SLACK = 0.01  # a gate opens this many score scales (std of baseline scores) above the largest


@dataclass
class FittedGate:
    """A fix set behind the best gate found."""

    ablation: Ablation  # the set's ablation with the gate attached
    flip_rate: float | None  # of the gated set, on every failing variant (None: not measured)
    detected: float  # fraction of failing variants the gate fires on
    shared: int  # calibration inputs that are also benign prompts (the KL there is in-sample)

    @property
    def gate(self) -> Gate:
        assert self.ablation.gate is not None
        return self.ablation.gate

    def numbers(self) -> dict[str, float | int | str]:
        """The gate's description in a :class:`Note`."""
        gate = self.gate
        return {
            "gate_site": gate.site,
            "gate_reads": gate.reads,
            "gate_above": gate.above,
            "detected": self.detected,
            "shared": self.shared,
        }


def gate_threshold(ref_scores: torch.Tensor) -> tuple[float, float]:
    """(threshold, score scale) of a gate from its baseline scores: a hair above the largest,
    so batch-size rounding cannot open the gate on a baseline. The scale (the scores' std)
    has a floor of 0.1 % of the largest |score|: a prompt-wide maximum is often the same for
    every baseline (a shared template prefix), which gives a spread of zero."""
    scale = max(float(ref_scores.std()), 1e-3 * float(ref_scores.abs().max()), 1e-12)
    return float(ref_scores.max()) + GATE_SLACK * scale, scale


def gate_if_it_helps(search: FixSearch, fix: FixChoice, ungated_flip_rate: float, notes: list[Note]) -> FixChoice:
    """``fix`` behind the best gate when that flips at least min(``ungated_flip_rate``,
    threshold) of the failing variants with less benign KL; else ``fix`` unchanged.

    A "last"/"max" gate decides on the prompt: on a failing variant where it stays shut, the
    run is the unfixed one, which fails. So the gated set flips at most the share of failing
    variants the gate opens on. When that share is already below what the gated set must
    flip, its flips and side effects are not run (the outcome is the same: the fix stays
    ungated)."""
    probed = probe_gate(search, fix.units, fix.ablation)
    if probed is None:
        notes.append(Note("no_gate_site"))
        return fix
    target = min(ungated_flip_rate, search.config.early_stop_threshold)
    if probed.detected < target:
        notes.append(Note("gate_opens_too_rarely", {**probed.numbers(), "needed": target}))
        return fix
    rate = gated_flip_rate(search, fix.units, probed)
    fitted = dataclasses.replace(probed, flip_rate=rate)
    kl = search.benign_kl(fitted.ablation.all(fix.units))
    gated = FixChoice(fix.units, fitted.ablation, kl, fix.solo_kl)
    numbers = {
        **fitted.numbers(),
        "flip_rate": rate,
        "kl": kl,
        "ungated_flip_rate": ungated_flip_rate,
        "ungated_kl": fix.benign_kl,
    }
    if rate >= target and kl < fix.benign_kl:
        notes.append(Note("gated", numbers))
        return gated
    notes.append(Note("gating_did_not_help", numbers))
    return fix


def fit_gate(search: FixSearch, units: list[UnitScore], ablate: Ablation) -> FittedGate | None:
    """The set behind the gate (site × reading) that fires on most failing variants,
    fitted on the search variants, with its flip rate on every failing variant; None when
    no block sits below the members."""
    probed = probe_gate(search, units, ablate)
    if probed is None:
        return None
    return dataclasses.replace(probed, flip_rate=gated_flip_rate(search, units, probed))


def gated_flip_rate(search: FixSearch, units: list[UnitScore], probed: FittedGate) -> float:
    """The flip rate of ``units`` behind ``probed``'s gate on every failing variant."""
    return flip_rate(search.flips(search.failing, probed.ablation.all(units)))


def probe_gate(search: FixSearch, units: list[UnitScore], ablate: Ablation) -> FittedGate | None:
    """:func:`fit_gate` without running the gated set: its ``flip_rate`` is None (not measured)."""
    session = search.session
    lowest = min(-1 if layer is None else layer for layer in (block_index(u.unit) for u in units))
    sites = [f"blocks.{layer}.resid_post" for layer in range(lowest)]
    sites = [site for site in sites if site in session.adapter.points]
    if not sites:
        return None
    near_misses = [session.encode(entry) for entry in session.extras.get("near_miss") or []]
    reference = [*(session.baselines or session.benign()), *near_misses]
    shared = sum(any(torch.equal(r["input_ids"], b["input_ids"]) for b in session.benign()) for r in reference)

    def prompts(batches: Sequence[Inputs]) -> dict[str, list[torch.Tensor]]:
        rows = [capture(session, batch, "layer", sites, only_sites=True) for batch in batches]
        return {site: [r[site] for r in rows] for site in sites}  # (T, d) per input

    # The search variants are among the failing variants: capture each input once.
    ref, every = prompts(reference), prompts(search.failing)
    fitted = [i for i, v in enumerate(search.failing) if among(v, search.search_variants)]
    fit = {site: [xs[i] for i in fitted] for site, xs in every.items()}
    probes: list[_Probe] = []
    for site, reads in itertools.product(sites, GATE_READS):
        # "last": the last prompt position; "max": any position (mean over positions fits it).
        pick: Callable[[torch.Tensor], torch.Tensor] = (lambda x: x[-1]) if reads == "last" else (lambda x: x.mean(0))
        direction = _mean_of(pick, fit[site]) - _mean_of(pick, ref[site])  # (d,)
        if not bool(direction.abs().max() > 0):
            continue
        probe = Gate(site, tuple(direction.tolist()), 0.0, reads)
        ref_scores = torch.tensor([probe.score(x) for x in ref[site]])
        scores = torch.tensor([probe.score(x) for x in every[site]])
        above, scale = gate_threshold(ref_scores)
        detected = float((scores > above).double().mean())
        margin = float(scores.median() - above) / scale
        probes.append(_Probe(dataclasses.replace(probe, above=above), detected, margin))
    if not probes:
        return None
    best = max(probes, key=lambda p: (p.detected, p.margin))  # the first of equals
    return FittedGate(Ablation(ablate.kind, ablate.directions, best.gate), None, best.detected, shared)


@dataclass
class _Probe:
    gate: Gate
    detected: float  # fraction of failing variants it fires on
    margin: float  # median failing score above the threshold, in score scales


def _mean_of(pick: Callable[[torch.Tensor], torch.Tensor], tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([pick(x).double() for x in tensors]).mean(0)
