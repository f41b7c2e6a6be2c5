"""Claim evaluation: does ablating the claimed units change the behaviour on a prompt set?

A claim names units (``blocks.1.attn.head.3``, ``blocks.1.mlp.post[7]``, ``blocks.0.mlp``)
said to carry a behaviour. For each prompt of a JSONL set the clean run and the run with
every claimed unit ablated together (one batch of two rows) give

    effect_i  = f(clean) − f(ablated)   f: logprob or logit of the prompt's target at its
                                        last position (the record's ``target``, the call's
                                        ``target``, or the clean top prediction)
    changed_i = the top prediction at that position differs

and the set gives the mean effect with a seeded percentile-bootstrap confidence interval
and the fraction of prompts whose output changed. ``mean`` writes each unit's mean over
the whole prompt set (examples and positions), ``zero`` zeros, ``resample`` the unit's
activation on another prompt of the set (seeded), position by position — which needs
prompts of one length.

Prompts run one after another on one process, or — with ``ray=`` — as Ray tasks, one
contiguous shard of prompts per cluster CPU (:mod:`~model_forensics.core.distributed`).
The baselines (``mean`` over the whole set, ``resample`` donors) are captured here first,
so every shard ablates with exactly the values the local run uses; each prompt's effect
depends on that prompt and those values only, and the effects are gathered in prompt
order before the bootstrap: the result equals the local run's.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from model_forensics.circuits.subject import MEASURES, Subject, objective_for, subject_of
from model_forensics.core import plots
from model_forensics.core import prompts as prompt_files
from model_forensics.core.distributed import cluster_cpus, map_tasks, ray_session, shard_spans
from model_forensics.core.errors import ForensicsError
from model_forensics.models.inputs import ModelInputs
from model_forensics.replay.interventions import Intervention, Prepared, Target, resolve
from model_forensics.replay.session import Session

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CLAIM_KINDS = ("zero", "mean", "resample")


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a set: its text and, optionally, the target token it is scored on."""

    text: str
    target: str | int | None = None


def read_prompts(path: str | Path) -> list[PromptRecord]:
    """Read a prompt set (``.jsonl``: strings or ``{"prompt": …, "target": …}`` objects;
    ``.txt``: one prompt per line) with the project's prompt-file reader
    (:func:`model_forensics.core.prompts.read_prompts`: hostile input, capped).

    Raises:
        ForensicsError: the file cannot be read as prompts, or a ``target`` is neither a
            token string nor an id (the message names the line).
    """
    records = []
    for line in prompt_files.read_prompts(path):
        target = line.fields.get("target")
        if target is not None and (isinstance(target, bool) or not isinstance(target, str | int)):
            raise ForensicsError(f"{line.where}: 'target' must be a token string or id, got {target!r}")
        records.append(PromptRecord(line.text, target))
    return records


@dataclass
class ClaimEvaluation:
    """What ablating the claimed units does on a prompt set.

    Attributes:
        units / kind / measure: the claim, the ablation and what was scored.
        prompts: the prompt texts; targets: the token each was scored on.
        effects: per prompt, f(clean) − f(ablated) (positive: the units support the target).
        changed: per prompt, whether the top prediction changed.
        mean_effect / ci: the mean effect and its bootstrap interval (``confidence``).
        fraction_changed: the share of prompts whose output changed.
        seed / n_boot: the bootstrap's settings.
    """

    units: list[str]
    kind: str
    measure: str
    prompts: list[str]
    targets: list[str]
    effects: np.ndarray
    changed: np.ndarray
    mean_effect: float
    ci: tuple[float, float]
    confidence: float
    fraction_changed: float
    seed: int
    n_boot: int
    forward_passes: int
    notes: list[str] = field(default_factory=list)

    def figure(self) -> Figure:
        """Per-prompt effects as bars, with the mean's bootstrap interval shaded."""
        return plots.token_bars(
            [f"{i}" for i in range(len(self.prompts))],
            self.effects,
            title=f"{self.kind}-ablating {', '.join(self.units)[:80]}: effect per prompt",
            ylabel=f"drop in {self.measure}",
            interval=self.ci,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "units": list(self.units),
            "kind": self.kind,
            "measure": self.measure,
            "mean_effect": self.mean_effect,
            "ci": list(self.ci),
            "confidence": self.confidence,
            "fraction_changed": self.fraction_changed,
            "seed": self.seed,
            "n_boot": self.n_boot,
            "forward_passes": self.forward_passes,
            "per_prompt": [
                {"prompt": p, "target": t, "effect": float(e), "changed": bool(c)}
                for p, t, e, c in zip(self.prompts, self.targets, self.effects, self.changed, strict=True)
            ],
            "notes": list(self.notes),
        }


def evaluate_claim(
    model: nn.Module | Session,
    tokenizer: Any = None,
    prompts: str | Path | Sequence[str | PromptRecord] = (),
    *,
    units: Sequence[str],
    kind: str = "mean",
    measure: str = "logprob",
    target: str | int | None = None,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    ray: str | None = None,
) -> ClaimEvaluation:
    """Ablate ``units`` together on every prompt and measure the effect.

    Args:
        model: a torch model (with ``tokenizer``) or a replay Session (its model).
        prompts: a JSONL path (see :func:`read_prompts`), or texts / records.
        units: the claimed units (sites or selectors).
        kind: ``mean`` (over the prompt set), ``zero`` or ``resample`` (same-length prompts).
        measure: ``logprob`` or ``logit`` of each prompt's target.
        target: the target of prompts whose record names none (None: the clean top token).
        n_boot / confidence / seed: the percentile bootstrap of the mean effect.
        progress: called with (prompts done, total) after each prompt (each shard, on Ray).
        ray: evaluate shards of prompts as Ray tasks: ``"local"``, ``"auto"`` or a cluster
            address; needs a torch model (a replay Session stays local).
    Returns:
        A :class:`ClaimEvaluation`.
    Raises:
        SiteError: a unit that does not exist (names the nearest).
        ForensicsError: a bad prompt file, kind, measure or target, or ``resample`` on
            prompts of different lengths, or ``ray`` with a replay Session.
        RayUnavailable: ``ray`` given but Ray is missing or the address unreachable.
    """
    if kind not in CLAIM_KINDS:
        raise ForensicsError(f"claim ablation kind '{kind}' is unknown; use one of {', '.join(CLAIM_KINDS)}")
    if measure not in MEASURES:
        raise ForensicsError(f"measure '{measure}' is unknown; use one of {', '.join(MEASURES)}")
    if not units:
        raise ForensicsError("the claim names no units; pass units=['blocks.1.attn.head.3', …]")
    if n_boot < 1 or not 0 < confidence < 1:
        raise ForensicsError(f"n_boot must be ≥ 1 and confidence in (0, 1); got {n_boot} and {confidence}")
    if ray is not None and isinstance(model, Session):
        raise ForensicsError(
            "ray= evaluates a claim on a torch model and its tokenizer; for a bundle's Session run without ray"
        )
    subject = subject_of(model, tokenizer)
    records = _records(prompts)
    targets = [resolve(Intervention(unit, kind), subject.adapter) for unit in units]
    inputs = [subject.encode(r.text) for r in records]
    baselines = _baselines(subject, targets, inputs, kind, seed)
    claim = _Claim(records, list(units), kind, measure, target, baselines)
    if ray is None:
        part = _evaluate(claim, subject, inputs, targets, 0, progress)
    else:
        part = _evaluate_on_ray(ray, claim, subject.model, tokenizer, progress)
    effects, changed, labels, passes = part
    effect = np.asarray(effects)
    low, high = bootstrap_ci(effect, n_boot, confidence, seed)
    return ClaimEvaluation(
        list(units),
        kind,
        measure,
        [r.text for r in records],
        labels,
        effect,
        np.asarray(changed),
        float(effect.mean()),
        (low, high),
        confidence,
        float(np.mean(changed)),
        seed,
        n_boot,
        subject.passes + passes,
    )


@dataclass
class _Claim:
    """What every prompt's evaluation reads (shipped once to each Ray task)."""

    records: list[PromptRecord]
    units: list[str]
    kind: str
    measure: str
    target: str | int | None
    baselines: Baseline


Part = tuple[list[float], list[bool], list[str], int]  # effects, changed, labels, extra passes


def _evaluate(
    claim: _Claim,
    subject: Subject,
    inputs: Sequence[ModelInputs],
    targets: list[Target],
    first: int,
    progress: Callable[[int, int], None] | None = None,
) -> Part:
    """Prompts ``first … first + len(inputs) − 1``: clean and ablated, one batch of two rows each."""
    effects, changed, labels = [], [], []
    for k, batch in enumerate(inputs):
        i = first + k
        record = claim.records[i]
        rows = [[Prepared(t, *claim.baselines(i, t)) for t in targets]]
        logits = subject.run(batch, [[], *rows], 2)
        scores = logits[:, -1] if logits.dim() == 3 else logits  # (2, V)
        wanted = record.target if record.target is not None else claim.target
        objective = objective_for(subject, batch, wanted, measure=claim.measure, clean_logits=scores[:1])
        values = objective(scores).double()
        effects.append(float(values[0] - values[1]))
        changed.append(bool(scores[0].argmax() != scores[1].argmax()))
        labels.append(objective.label)
        if progress is not None:
            progress(i + 1, len(claim.records))
    return effects, changed, labels, 0


def _evaluate_on_ray(
    address: str,
    claim: _Claim,
    model: nn.Module,
    tokenizer: Any,
    progress: Callable[[int, int], None] | None,
) -> Part:
    n = len(claim.records)
    with ray_session(address) as ray:
        spans = shard_spans(n, cluster_cpus(ray))
        done = [0]

        def finished(i: int, _part: Part) -> None:
            done[0] += spans[i][1] - spans[i][0]
            if progress is not None:
                progress(done[0], n)

        parts = map_tasks(_claim_shard, spans, address, shared=(claim, model, tokenizer), on_done=finished)
    out: Part = ([], [], [], 0)
    for effects, changed, labels, passes in parts:
        out = (out[0] + effects, out[1] + changed, out[2] + labels, out[3] + passes)
    return out


def _claim_shard(shared: tuple[_Claim, nn.Module, Any], span: tuple[int, int]) -> Part:
    """One Ray task: prompts ``start:stop`` on this worker's copy of the model."""
    claim, model, tokenizer = shared
    subject = subject_of(model, tokenizer)
    targets = [resolve(Intervention(unit, claim.kind), subject.adapter) for unit in claim.units]
    start, stop = span
    inputs = [subject.encode(r.text) for r in claim.records[start:stop]]
    effects, changed, labels, _ = _evaluate(claim, subject, inputs, targets, start)
    return effects, changed, labels, subject.passes


def bootstrap_ci(values: np.ndarray, n_boot: int, confidence: float, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (n,), seeded."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(1)
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def _records(prompts: str | Path | Sequence[str | PromptRecord]) -> list[PromptRecord]:
    if isinstance(prompts, str | Path):
        return read_prompts(prompts)
    records = [p if isinstance(p, PromptRecord) else PromptRecord(str(p)) for p in prompts]
    if not records:
        raise ForensicsError("the prompt set is empty; pass a JSONL file or a list of prompts")
    return records


Baseline = Callable[[int, Target], tuple[torch.Tensor | None, int]]


def _baselines(subject: Subject, targets: list[Target], inputs: list[ModelInputs], kind: str, seed: int) -> Baseline:
    """What each prompt's interventions read: (tensor, baseline prompt length)."""
    if kind == "zero":
        return lambda i, t: (None, 0)
    sites = sorted({t.site for t in targets})
    if kind == "resample":
        lengths = sorted({b.length for b in inputs})
        if len(lengths) > 1:
            raise ForensicsError(
                f"resample aligns positions, but the prompts have {len(lengths)} different lengths "
                f"({', '.join(map(str, lengths[:6]))} tokens); use prompts of one length or kind='mean' / 'zero'"
            )
        if len(inputs) < 2:
            raise ForensicsError("resample needs at least two prompts (each reads another's activations)")
    captured = [subject.capture(b, sites) for b in inputs]
    if kind == "mean":
        means = {s: torch.cat([c[s].double() for c in captured]).mean(0).to(captured[0][s].dtype) for s in sites}
        return lambda i, t: (means[t.site], 0)
    rng = random.Random(seed)
    donors = [rng.choice([j for j in range(len(inputs)) if j != i]) for i in range(len(inputs))]
    return lambda i, t: (captured[donors[i]][t.site], inputs[i].length)
