"""Attribution ranking: attribution patching (activation difference × gradient).

For a failing input, ``m`` is a scalar that measures the failure (log-probability of the
target tokens a text predicate looks for; the failing class's margin; the logit
difference of a ``logit_diff`` predicate). One forward and one backward pass give, for
every unit u (a site, an attention head's slice of z, or an MLP neuron), the first-order
estimate of how much mean-ablating it would change m:

    Δm_u ≈ Σ_{positions, dims of u} (ā_u − a_u) · ∂m/∂a_u

where ā is the unit's mean over the benign baseline set (0 when there is none). A unit's
score is −Δm_u averaged over the failing variants: positive = ablating it should reduce
the failure. The estimates are only a ranking; :mod:`model_forensics.rca.cca` confirms
every candidate by exact replay.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from model_forensics.core.errors import ForensicsError
from model_forensics.core.predicates import Predicate
from model_forensics.core.records import fields_json
from model_forensics.models.adapters import conv_sites
from model_forensics.models.hooks import SiteCall, hooks, logits_of
from model_forensics.models.inputs import ModelInputs
from model_forensics.rca.flips import clean_run, rows_cost
from model_forensics.rca.progress import Progress, silent
from model_forensics.rca.runs import Inputs, capture
from model_forensics.replay import Intervention, Session
from model_forensics.replay.interventions import Prepared
from model_forensics.replay.sweep import forced_scores

Metric = Callable[[torch.Tensor], torch.Tensor]  # logits (1, T, V) or (1, C) → the failure metric m (scalar)


@dataclass
class UnitScore:
    unit: str  # "blocks.2.mlp", "blocks.1.attn.head.3", "blocks.0.mlp.post[17]"
    level: str  # site | head | neuron
    score: float

    def to_json(self) -> dict[str, Any]:
        return {"unit": self.unit, "level": self.level, "score": self.score}


@dataclass
class Ranking:
    """Units ranked by estimated failure reduction under mean ablation (best first)."""

    units: list[UnitScore]
    variants_used: int
    forward_passes: int
    backward_passes: int
    notes: list[str] = field(default_factory=list)

    def level(self, level: str) -> list[UnitScore]:
        return [u for u in self.units if u.level == level]

    def score(self, unit: str) -> float:
        return next((u.score for u in self.units if u.unit == unit), 0.0)

    def to_json(self) -> dict[str, Any]:
        return fields_json(self, units=[u.to_json() for u in self.units])


def attribution_ranking(
    session: Session,
    inputs: list[Inputs] | None = None,
    max_variants: int = 16,
    progress: Progress = silent,
    positions: bool = False,
) -> Ranking:
    """Rank every site, head and neuron of ``session``'s model for the incident's failure.

    Args:
        session: a replay Session with a failure predicate.
        inputs: failing inputs to attribute (default: the incident and its variants, up to
            ``max_variants``; inputs on which the model does not fail are skipped).
        progress: called with ("attribution", inputs done, inputs).
        positions: also score every prompt position of ``embed`` and of each block's
            ``resid_post`` (units ``embed@pos=3``, level ``position``; the position's
            whole vector mean-ablated).
    """
    if session.predicate is None:
        raise ForensicsError(
            "the bundle has no failure predicate; record it with one (e.g. --predicate contains:HACKED)"
        )
    adapter = session.adapter
    channels = {site for site, _ in conv_sites(adapter)}  # a CNN: its convolutions' channels
    sites = [s for s in adapter.sites() if _kind(s) in ("attn", "mlp", "attn.z", "mlp.post") or s in channels]
    if positions and adapter.n_layers:
        sites += [s for s in adapter.sites() if _kind(s) in ("embed", "resid_post")]
    before = session.forward_passes
    means = _baseline_means(session, sites)
    totals: dict[tuple[str, str], float] = defaultdict(float)
    used = backward = 0
    notes: list[str] = []
    batches = (inputs if inputs is not None else session.variants())[:max_variants]
    for done, batch in enumerate(batches):
        progress("attribution", done, len(batches))
        prepared = _teacher_forced(session, batch)
        if prepared is None:
            continue
        ids, metric, _ = prepared
        grads, acts = _grad_pass(session, ids, sites, metric)
        backward += 1
        used += 1
        for site in sites:
            a, g = acts[site], grads[site]
            if g is None:
                continue
            delta = (means.get(site, torch.zeros(())) - a) * g  # (T, ...) first-order Δm per entry
            kind = _kind(site)
            if kind in ("attn", "mlp"):
                totals[(site, "site")] -= float(delta.sum())
            elif kind in ("embed", "resid_post"):  # (T, d) → one unit per prompt position
                length = ModelInputs.of(batch).length if "input_ids" in batch else 0
                for t, v in enumerate(delta.sum(dim=-1)[:length].tolist()):
                    totals[(f"{site}@pos={t}", "position")] -= v
            elif kind == "attn.z":
                per_head = delta.sum(dim=(0, 2))  # (T, H, dh) → (H,)
                base = site.removesuffix(".z")
                for h, v in enumerate(per_head.tolist()):
                    totals[(f"{base}.head.{h}", "head")] -= v
            else:  # mlp.post (T, d_mlp), or an image site (H·W, C): per neuron / channel
                per_neuron = delta.sum(dim=0)
                for i, v in enumerate(per_neuron.tolist()):
                    totals[(f"{site}[{i}]", "neuron")] -= v
    progress("attribution", len(batches), len(batches))
    if used == 0:
        raise ForensicsError("the model does not fail on the incident or any variant; nothing to attribute")
    units = [UnitScore(u, level, score / used) for (u, level), score in totals.items()]
    units.sort(key=lambda u: -u.score)
    return Ranking(units, used, session.forward_passes - before, backward, notes)


def _kind(site: str) -> str:
    return site.split(".", 2)[-1] if site.startswith("blocks.") else site


def _baseline_means(session: Session, sites: list[str]) -> dict[str, torch.Tensor]:
    """Per site, the mean over baseline runs and positions (the ``mean`` ablation value)."""
    refs = list(session.baselines) or list(session.benign())
    if not refs:
        return {}
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for batch in refs:
        got = capture(session, batch, granularity="neuron", sites=["blocks.*.attn.z"])
        count += 1
        for site in sites:
            m = got[site].float().mean(dim=0)
            sums[site] = sums[site] + m if site in sums else m
    return {site: s / count for site, s in sums.items()}


def _teacher_forced(session: Session, batch: Inputs) -> tuple[torch.Tensor | Inputs, Metric, int] | None:
    """The ids to run with gradients, the failure metric on their logits and how many of
    the last positions it reads (it reads them counted from the end, so scores kept at those
    positions only do as well as the full logits), or None if the model does not fail on
    ``batch``."""
    predicate = session.predicate
    assert predicate is not None  # callers check
    result = clean_run(session, batch)  # run once per input: ranking and exact patching both read it
    if not result.failed:
        return None
    if "input_ids" not in batch:  # a model fed tensors (pixel_values): one forward pass
        return dict(batch), _logit_metric(predicate, result.prediction), 1
    prompt = batch["input_ids"]  # (1, T)
    if session.mode == "generate":
        length = ModelInputs.of(batch).length
        full = result.outputs["generated_ids"].reshape(1, -1)  # (1, T + new)
        span = _target_span(session, full[0, length:], predicate)
        start, end = length + span[0], length + span[1]
        ids = full[:, :end]
        targets = full[0, start:end]

        def metric(logits: torch.Tensor) -> torch.Tensor:  # (1, T, V): positions start − 1 … end − 2
            logp = logits[0, start - 1 - end : -1].log_softmax(-1)
            return logp.gather(-1, targets.unsqueeze(-1)).sum()

        return ids, metric, end - start + 1
    return prompt, _logit_metric(predicate, result.prediction), 1


def _target_span(session: Session, generated: torch.Tensor, predicate: Predicate) -> tuple[int, int]:
    """Token span [start, end) of the generated ids whose text first satisfies the predicate."""
    tok = session.tokenizer
    if predicate.kind not in ("contains", "regex") or tok is None:
        return 0, len(generated)

    def hit(text: str) -> bool:
        if predicate.kind == "contains":
            return str(predicate.args["text"]) in text
        return re.search(str(predicate.args["pattern"]), text) is not None

    end = next((k + 1 for k in range(len(generated)) if hit(tok.decode(generated[: k + 1]))), len(generated))
    start = max((j for j in range(end) if hit(tok.decode(generated[j:end]))), default=0)
    return start, end


def _logit_metric(predicate: Predicate, prediction: int) -> Metric:
    def metric(logits: torch.Tensor) -> torch.Tensor:
        scores = logits[0, -1] if logits.dim() == 3 else logits[0]
        if predicate.kind == "class_is":
            label = int(predicate.args["label"])
            others = torch.cat([scores[:label], scores[label + 1 :]])
            return scores[label] - torch.logsumexp(others, dim=0)
        if predicate.kind == "token_is":
            return scores.log_softmax(-1)[int(predicate.args["token"])]
        if predicate.kind == "logit_diff":
            return scores[int(predicate.args["a"])] - scores[int(predicate.args["b"])]
        return scores.log_softmax(-1)[prediction]

    return metric


def _grad_pass(
    session: Session, ids: torch.Tensor | Inputs, sites: list[str], metric: Metric
) -> tuple[dict[str, torch.Tensor | None], dict[str, torch.Tensor]]:
    """One forward + backward: every site's activation (T, …) and ∂metric/∂activation."""
    kept: dict[str, torch.Tensor] = {}

    def keep(tensor: torch.Tensor, call: SiteCall) -> torch.Tensor:
        # Handing the same tensor back makes the model compute on it (a view such as the
        # per-head split of z is folded back in), so the gradient w.r.t. it is ∂m/∂site.
        kept[call.site] = tensor
        return tensor

    with session.environment(), torch.enable_grad(), hooks(session.adapter, dict.fromkeys(sites, keep)):
        logits = _logits(session.model(**_inputs(ids)))
        grads = torch.autograd.grad(metric(logits), [kept[s] for s in sites], allow_unused=True)
    return (
        {s: (None if g is None else g.detach()[0]) for s, g in zip(sites, grads, strict=True)},
        {s: kept[s].detach()[0] for s in sites},
    )


def _inputs(ids: torch.Tensor | Inputs) -> ModelInputs:
    """Teacher-forced inputs: token ids (1, T), or a tensor-fed model's own inputs."""
    return ModelInputs(ids) if isinstance(ids, dict) else ModelInputs.of_ids(ids)


def _logits(output: Any) -> torch.Tensor:
    logits = logits_of(output)
    if logits is None:
        raise ForensicsError(f"the model returned no logits ({type(output).__name__}); attribution needs scores")
    return logits


def exact_effects(
    session: Session,
    units: list[str],
    kind: str,
    max_variants: int = 4,
    chunk: int = 32,
    share_prefix: bool | None = None,
) -> dict[str, float]:
    """Exact activation patching: how much ablating each unit *alone* lowers the failure
    metric m (teacher-forced on each failing variant's recorded continuation), averaged
    over up to ``max_variants`` failing variants. Positive = the unit carries the failure.

    Each chunk of units runs as one batched forward pass (one row per unit). On a model
    large enough that a pass costs by its rows (:func:`~model_forensics.rca.flips.rows_cost`),
    each unit's row enters at its block, on the clean computation of the blocks before it,
    and the scores are kept at the positions the metric reads
    (:func:`~model_forensics.replay.sweep.forced_scores`); the effects equal those of whole
    passes to float tolerance (the kernels see other batch shapes). ``share_prefix``: None
    decides by that size rule, True / False force it.
    """
    totals = dict.fromkeys(units, 0.0)
    used = 0
    session.prepare_sets([[Intervention(u, kind) for u in units]])  # every baseline site in one pass per input
    shared = rows_cost(session) if share_prefix is None else share_prefix
    for batch in session.variants()[:max_variants]:
        prepared = _teacher_forced(session, batch)
        if prepared is None:
            continue
        ids, metric, keep = prepared
        forced = _inputs(ids)
        with session.environment(), torch.no_grad():
            clean = float(metric(_logits(session.model(**forced))))
        for lo in range(0, len(units), chunk):
            part = units[lo : lo + chunk]
            rows = session.prepare_sets([[Intervention(u, kind)] for u in part], forced)
            for unit, value in zip(part, _forced_metrics(session, forced, rows, metric, keep, shared), strict=True):
                totals[unit] += clean - value
        used += 1
    return {u: v / max(1, used) for u, v in totals.items()}


def _forced_metrics(
    session: Session, forced: ModelInputs, rows: list[list[Prepared]], metric: Metric, keep: int, shared: bool
) -> list[float]:
    """The metric of each row of one teacher-forced pass of ``forced``: rows entering at
    their blocks where ``shared`` and the prefix can be shared, whole-model rows otherwise."""
    scores = (
        forced_scores(session, rows, forced, keep, forced.length, session.prefixes, len(rows))
        if shared and "input_ids" in forced
        else None
    )
    if scores is not None:
        return [float(metric(s.unsqueeze(0))) for s in scores]
    logits = session.forced(forced, rows)
    return [float(metric(logits[i : i + 1])) for i in range(len(rows))]
