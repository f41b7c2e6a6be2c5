"""Head importance: the effect of ablating each attention head, every head in one sweep.

Head ``blocks.L.attn.head.H`` is ablated at ``blocks.L.attn.z`` (B, T, n_heads, d_head),
the per-query-head attention output before the output projection; on grouped-query models
(SmolLM2: 9 query heads sharing 3 key/value heads) that is the one place a single query
head can be removed, so every query head is a unit and :attr:`HeadImportance.kv_groups`
says which key/value head it reads. ``mean`` writes the head's mean output over the
baseline set (over examples and positions), ``zero`` writes zeros.

The effect is ``f(clean) − f(ablated)`` for ``logprob`` / ``logit`` metrics (positive:
the head supports the target) and KL(clean ‖ ablated) at the output position for ``kl``.
Runs are batched: all heads of a model go through one sweep (``session.sweep`` for a
replay session; batches of ``batch_size`` rows for a plain model), and equal the serial
one-head-at-a-time runs (``serial=True``) to float tolerance.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from model_forensics.circuits.subject import Objective, Subject, objective_for, subject_of
from model_forensics.core import plots
from model_forensics.core.errors import ForensicsError, SiteError
from model_forensics.core.metrics import kl_divergence
from model_forensics.core.sites import parse_selector
from model_forensics.models.inputs import ModelInputs
from model_forensics.replay.interventions import Intervention, Prepared, head_names, resolve
from model_forensics.replay.session import Session

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRICS = ("logprob", "logit", "kl")
HEAD_KINDS = ("zero", "mean")
Metric = Callable[[torch.Tensor], torch.Tensor]  # scores (N, V) at the output position → (N,)


@dataclass
class HeadImportance:
    """Every head's ablation effect.

    Attributes:
        heads: head names, ``blocks.L.attn.head.H``, in layer then head order.
        effects: (n_layers, n_heads) effect per head (NaN for heads not measured).
        kind / metric: the ablation and what was measured.
        objective: the target the metric reads (None for ``kl`` or a callable metric).
        n_heads / n_kv_heads: query and key/value heads per layer.
        kv_groups: per query head, the key/value head it reads (h // (n_heads / n_kv_heads)).
        clean: the metric on the unchanged prompt (None for ``kl``).
        forward_passes / seconds: what the sweep cost.
    """

    heads: list[str]
    effects: np.ndarray
    kind: str
    metric: str
    objective: Objective | None
    n_heads: int
    n_kv_heads: int
    clean: float | None
    forward_passes: int
    seconds: float

    @property
    def kv_groups(self) -> list[int]:
        return [h // max(1, self.n_heads // max(1, self.n_kv_heads)) for h in range(self.n_heads)]

    def effect(self, head: str) -> float:
        """The effect of one head, by name."""
        if head not in self.heads:
            raise SiteError(f"head '{head}' was not measured; measured heads: {', '.join(self.heads[:4])} …")
        sel = parse_selector(head)
        return float(self.effects[int(head.split(".")[1]), sel.head])

    def ranking(self) -> list[tuple[str, float]]:
        """(head, effect) for every measured head, largest effect first."""
        pairs = [(name, self.effect(name)) for name in self.heads]
        return sorted(pairs, key=lambda p: -p[1])

    def figure(self) -> Figure:
        """A heatmap of the effects, layers × heads."""
        return plots.heatmap(
            self.effects,
            row_labels=[f"layer {i}" for i in range(self.effects.shape[0])],
            col_labels=[f"head {h}" for h in range(self.effects.shape[1])],
            title=f"Head importance ({self.kind} ablation, {self.metric})",
            colorbar_label=_UNITS.get(self.metric, self.metric),
            xlabel="query head",
            ylabel="layer",
            diverging=self.metric != "kl",
            annotate=self.effects.size <= 100,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "heads": list(self.heads),
            "effects": [[None if np.isnan(v) else float(v) for v in row] for row in self.effects],
            "ranking": [{"head": h, "effect": e} for h, e in self.ranking()],
            "kind": self.kind,
            "metric": self.metric,
            "objective": None if self.objective is None else self.objective.to_json(),
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "kv_groups": self.kv_groups,
            "clean": self.clean,
            "forward_passes": self.forward_passes,
            "seconds": self.seconds,
        }


_UNITS = {"logprob": "drop in log-probability (nats)", "logit": "drop in logit", "kl": "KL(clean ‖ ablated), nats"}


def head_importance(
    model: nn.Module | Session,
    tokenizer: Any = None,
    prompt: str | torch.Tensor | None = None,
    *,
    metric: str | Metric = "logprob",
    target: str | int | None = None,
    kind: str = "mean",
    heads: Sequence[str] | None = None,
    baseline: Sequence[str] | None = None,
    batch_size: int = 64,
    serial: bool = False,
) -> HeadImportance:
    """Ablate each attention head alone and measure the effect at the last prompt position.

    Args:
        model: a replay Session (its prompt, its baseline set for ``mean``, batched through
            ``session.sweep``) or a torch model with ``tokenizer`` and ``prompt``.
        prompt: text or ids (T,) / (1, T); None: the session's incident prompt.
        metric: ``logprob`` / ``logit`` of ``target`` (drop when ablated), ``kl``, or a
            function of the scores (N, V) → (N,) (effect: clean − ablated).
        target: the token whose score is measured (None: a Session's recorded output on
            its own prompt, else the clean top prediction).
        kind: ``mean`` or ``zero`` (a Session takes every intervention kind it knows).
        heads: the heads to measure (default: all).
        baseline: prompts whose mean head outputs ``mean`` writes (plain models; default
            the prompt itself).
        batch_size: rows per forward pass (plain models).
        serial: one head per pass (the reference the batched sweep must equal).
    Raises:
        SiteError: a head that does not exist (the message names the model's heads).
        ForensicsError: an unknown metric or kind, a bad target or prompt.
    """
    start = time.perf_counter()
    subject = subject_of(model, tokenizer)
    names = list(heads) if heads is not None else head_names(subject.adapter)
    if not names:
        raise ForensicsError(f"{type(subject.model).__name__} has no attention heads the adapter knows")
    if isinstance(metric, str) and metric not in METRICS:
        raise ForensicsError(f"metric '{metric}' is unknown; use one of {', '.join(METRICS)} or a function")
    _check_heads(subject, names)
    sets = [[Intervention(name, kind)] for name in names]
    targets = [resolve(s[0], subject.adapter) for s in sets]  # SiteError for heads that do not exist
    inputs = subject.encode(prompt)
    before = subject.session.forward_passes if subject.session is not None else 0
    if subject.session is not None:
        scores = _session_scores(subject.session, sets, prompt, serial)
    else:
        if kind not in HEAD_KINDS:
            raise ForensicsError(f"head ablation kind '{kind}' is unknown here; use one of {', '.join(HEAD_KINDS)}")
        rows = [[Prepared(t)] for t in targets]
        if kind == "mean":
            rows = _with_means(subject, rows, [subject.encode(p) for p in baseline] if baseline else [inputs])
        # only the last position is read: the batched run computes no other scores
        logits = subject.run(inputs, [[], *rows], 1 if serial else batch_size, last_only=not serial)
        scores = logits[:, -1] if logits.dim() == 3 else logits
    recorded = subject.recorded_output() if prompt is None else None  # a bundle's own incident
    fn, objective = _metric(subject, inputs, metric, target, scores[:1], recorded)
    values = fn(scores).double()
    clean = values[0]
    effects = (clean - values[1:]) if metric != "kl" else values[1:]
    table = np.full((subject.adapter.n_layers, int(subject.adapter.n_heads or 0)), np.nan)
    for t, e in zip(targets, effects.tolist(), strict=True):
        table[int(t.site.split(".")[1]), t.heads[0]] = e  # type: ignore[index]
    passes = subject.session.forward_passes - before if subject.session is not None else subject.passes
    return HeadImportance(
        [t.intervention.site for t in targets],
        table,
        kind,
        metric if isinstance(metric, str) else getattr(metric, "__name__", "custom"),
        objective,
        int(subject.adapter.n_heads or 0),
        int(subject.adapter.n_kv_heads or subject.adapter.n_heads or 0),
        None if metric == "kl" else float(clean),
        passes,
        time.perf_counter() - start,
    )


def _session_scores(
    session: Session, sets: list[list[Intervention]], prompt: str | torch.Tensor | None, serial: bool
) -> torch.Tensor:
    """Scores (1 + N, V) at the last prompt position: the clean run, then each set."""
    inputs = None if prompt is None else session.encode(prompt if isinstance(prompt, str) else prompt.view(1, -1))
    with session.first_steps(1):
        if serial:
            runs = [session.run(s, inputs=inputs) for s in [[], *sets]]
        else:
            runs = list(session.sweep([[], *sets], inputs=inputs))
    return torch.stack([r.outputs["logits"][0] for r in runs])


def _with_means(subject: Subject, rows: list[list[Prepared]], baseline: list[ModelInputs]) -> list[list[Prepared]]:
    """Rows whose ``mean`` targets carry the mean of their site over ``baseline`` (over
    examples and positions, as the replay baselines compute it)."""
    sites = sorted({p.target.site for row in rows for p in row})
    captured = [subject.capture(inputs, sites) for inputs in baseline]
    means = {
        site: torch.cat([c[site].double() for c in captured]).mean(0).to(captured[0][site].dtype) for site in sites
    }
    return [[Prepared(p.target, means[p.target.site]) for p in row] for row in rows]


def _check_heads(subject: Subject, names: Sequence[str]) -> None:
    """Every name is one head, ``blocks.L.attn.head.H`` (its index is checked by resolve)."""
    for name in names:
        if not isinstance(name, str) or parse_selector(name).head is None or "@" in name or "[" in name:
            valid = head_names(subject.adapter) or ["none"]
            raise SiteError(
                f"'{name}' is not a head; name heads as blocks.L.attn.head.H (this model: {valid[0]} … {valid[-1]})"
            )


def _metric(
    subject: Subject,
    inputs: ModelInputs,
    metric: str | Metric,
    target: str | int | None,
    clean: torch.Tensor,
    recorded: int | None = None,
) -> tuple[Metric, Objective | None]:
    """The metric as a function of scores (N, V), and the objective it reads."""
    if callable(metric):
        return metric, None
    if metric == "kl":
        return (lambda scores: kl_divergence(clean.expand_as(scores), scores)), None
    objective = objective_for(subject, inputs, target, measure=metric, clean_logits=clean, recorded=recorded)
    return objective, objective  # on scores (N, V) an objective reads the token's column
