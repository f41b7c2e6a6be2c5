"""Notes: what an analysis did or found that its reader should know, as data.

A :class:`Note` is an event name and the numbers behind it; ``str(note)`` renders the one
sentence the CLI, the HTML report and ``to_json()["notes"]`` show, from the templates
below (the only place that text lives)::

    Note("side_effects_exceed_bound", {"kl": 0.21, "bound": 0.05})
    # side effects exceed the bound: mean benign KL 0.21 > 0.05 nats
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

_GATE = (
    "a gate at {gate_site} ({gate_reading}, along the failure direction, above {gate_above:.4g}) "
    "fires on {detected:.0%} of the failing variants and on none of the baselines{gate_in_sample}"
)
_GATE_IN_SAMPLE = (
    " ({shared} of which are benign prompts, so the gate's side effects on those are in-sample; "
    "check it on held-out prompts with side_effects.measure(..., benign=[…]))"
)
_READINGS = {"last": "last prompt position", "max": "largest over the prompt"}

TEMPLATES: dict[str, str] = {
    # CausalCCA's search
    "refine_round": "round {round}: the set found on {searched} variants flips {flip_rate:.0%} of all "
    "{variants}; searching again with {added} of the variants it misses added",
    "sites_below_threshold": "ablating every attention and MLP site flips only {flip_rate:.0%}; "
    "reporting the best set found",
    "fell_back_to_sites": "heads/neurons alone do not reach the threshold; the fix set is the coarse (site-level) set",
    "sites_truncated": "the site-level set needs {sites} sites; reporting the top {limit} (max_fix_set_size)",
    "smallest_found": "{units} alone flips {flip_rate:.0%} of the failing variants (benign KL {kl:.2g} nats): "
    "the smallest fix, found by trying {tried} sets of one or two units before the greedy search",
    "smaller_than_greedy": "{units} ({size} unit(s), flip rate {flip_rate:.0%}, benign KL {kl:.2g} nats) replaces "
    "the greedy search's {greedy_size} units (flip rate {greedy_flip_rate:.0%}, benign KL {greedy_kl:.2g} nats): "
    "smaller, with no worse side effects",
    "attribution_saturated": "attribution scores are saturated (largest |score| {max_abs_score:.2g} ≤ {tolerance:g} "
    "over {units} units): the ranking is uninformative and the guided order is arbitrary; compare with "
    "guidance=unguided",
    # gating and narrowing (side effects above the bound)
    "no_gate_site": "no site upstream of the fix set can carry a gate; the fix stays ungated",
    "gated": "gated: " + _GATE + "; benign KL {ungated_kl:.3g} → {kl:.3g} nats at flip rate {flip_rate:.0%} "
    "(ungated: {ungated_flip_rate:.0%})",
    "gating_did_not_help": "gating did not help (" + _GATE + "; flip rate {flip_rate:.0%}, benign KL {kl:.3g} "
    "vs {ungated_kl:.3g} nats ungated); the fix stays ungated",
    "gate_opens_too_rarely": "gating did not help (" + _GATE + "; a gated fix flips at most the variants its gate "
    "opens on, fewer than the {needed:.0%} it would need, so it was not run); the fix stays ungated",
    "narrowed": "narrowed to failure directions: benign KL {whole_kl:.3g} → {kl:.3g} nats at flip rate "
    "{flip_rate:.0%} (whole units: {whole_flip_rate:.0%})",
    "narrowing_did_not_help": "narrowing to failure directions did not help (flip rate {flip_rate:.0%}, "
    "benign KL {kl:.3g} vs {whole_kl:.3g} nats for whole units); whole units kept",
    "side_effects_exceed_bound": "side effects exceed the bound: mean benign KL {kl:.3g} > {bound:g} nats",
    "accuracy_exceeds_bound": "side effects exceed the bound: benign accuracy / predicate change {drop:.1%} > "
    "max_accuracy_drop {bound:.1%}",
    # held-out evaluation and near misses (rca/heldout.py)
    "held_out_too_small": "{kind}: {groups} prompt group(s), too few to hold out {min_part} and keep {min_part} "
    "for the search; all are searched, so their figures are in-sample",
    "held_out_flip_rate": "held out: the fix flips {flip_rate:.0%} of {failing} failing variants it was not fitted "
    "on (search part: {search_flip_rate:.0%}), so it {verdict} the {threshold:.0%} threshold",
    "held_out_out_of_bound": "held out: side effects exceed the bound ({which}) on {n} benign prompts the fix was "
    "not fitted on (mean KL {kl:.3g} nats)",
    "near_miss_changed": "{part} near misses (prompts with the trigger on which the model behaves): the fix changes "
    "{changed:.0%} of {n} answers (bound {bound:.0%}), a side effect",
    "gate_fires_on_near_misses": "the gate fires on {fired:.0%} of {n} {part} near misses: it detects the trigger, "
    "not the failure",
    # step-gated steering (rca/stepgate.py)
    "step_gate_out_of_bound": "step gate: no configuration keeps {benign:.0%} of the benign and {near_miss:.0%} of "
    "the near-miss answers on the search part; the best sum of its rates is reported, out of bound",
    "step_gate_not_applicable": "step gate not tried: {why}",
    "step_gate_no_fit": "step gate not fitted: the search part has no failing reply with a match or no benign prompt",
    # Compression Forensics' calibration
    "too_few_baselines": "{baselines} baseline runs: the smallest possible p-value is {min_p_value:.3f} > "
    "α = {alpha:.4f}, so nothing can be flagged; give at least {needed} benign runs",
    "false_positive_rate_not_measured": "false-positive rate not measured: each half of the {baselines} "
    "baseline runs needs at least {needed} runs for a unit to be flaggable",
}


@dataclass(frozen=True)
class Note:
    """One event of an analysis and its numbers (flip rates as fractions, KLs in nats).

    Attributes:
        event: a key of :data:`TEMPLATES` (``"gated"``, ``"refine_round"`` …).
        numbers: the template's fields; a gate is described by ``gate_site``,
            ``gate_reads`` (``last`` / ``max``), ``gate_above``, ``detected`` (fraction of
            failing variants it fires on) and ``shared`` (calibration inputs that are
            benign prompts).
    """

    event: str
    numbers: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.event not in TEMPLATES:
            raise ValueError(f"unknown note event '{self.event}'; known: {', '.join(TEMPLATES)}")

    def __str__(self) -> str:
        fields = dict(self.numbers)
        if "gate_reads" in fields:
            fields["gate_reading"] = _READINGS[fields["gate_reads"]]
            fields["gate_in_sample"] = _GATE_IN_SAMPLE.format(**fields) if fields.get("shared") else ""
        return TEMPLATES[self.event].format(**fields)

    def to_json(self) -> dict[str, Any]:
        return {"event": self.event, **self.numbers, "text": str(self)}


def distinct(notes: Iterable[Note]) -> list[Note]:
    """The notes in order, each text once (a repeated search round repeats its notes)."""
    first: dict[str, Note] = {}
    for note in notes:
        first.setdefault(str(note), note)
    return list(first.values())
