"""Token influence: how much each source position of a prompt drives one output.

Four methods, one signature (``token_influence(model, tok, prompt, target=…, method=…)``)
and one result (:class:`TokenInfluence`, scores over source positions (T,)):

    integrated_gradients  ∫₀¹ ∂f/∂e(b + α(x − b)) dα · (x − b), summed over d_model, where
                          x (T, d_model) is the output of the ``embed`` site, b the baseline
                          (``zero``, or ``pad``: the embed output of pad tokens), f the
                          objective. Quadrature as Captum's ``LayerIntegratedGradients``
                          (Gauss–Legendre by default, n_steps points); the convergence delta
                          Σ attributions − (f(x) − f(b)) says how well it integrated.
    grad_x_input          ∂f/∂x · x, summed over d_model (one gradient pass).
    occlusion             f(x) − f(x with position i's embedding replaced by the baseline's),
                          one batch row per position: causal evidence.
    attention_rollout     Abnar & Zuidema's rollout of the head-averaged attention patterns
                          (0.5·A + 0.5·I per layer, rows renormalised), read at the output
                          position: correlational evidence (what attention flows from, not
                          what the output needs).

Every pass runs through :func:`model_forensics.models.hooks.hooks` (gradients) or the
replay interventions (occlusion), inside the subject's environment.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from model_forensics.circuits.subject import Objective, Subject, objective_for, subject_of
from model_forensics.core import plots
from model_forensics.core.errors import ForensicsError
from model_forensics.models.hooks import SiteCall, hooks
from model_forensics.models.inputs import ModelInputs
from model_forensics.replay.interventions import Intervention, Prepared, resolve
from model_forensics.replay.session import Session

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METHODS = ("integrated_gradients", "grad_x_input", "occlusion", "attention_rollout")
EVIDENCE = {
    "integrated_gradients": "gradient",
    "grad_x_input": "gradient",
    "occlusion": "causal",
    "attention_rollout": "correlational",
}
BASELINES = ("zero", "pad")
QUADRATURES = ("gausslegendre", "riemann_trapezoid")


@dataclass
class TokenInfluence:
    """Influence of each source position on one output.

    Attributes:
        method: one of :data:`METHODS`.
        evidence: ``causal`` (occlusion), ``gradient`` (IG, grad × input) or
            ``correlational`` (attention rollout).
        scores: (T,) one score per source position (higher: more support for the target;
            rollout scores are attention weights and sum to 1).
        tokens: the T source tokens.
        objective: the explained output (token, position, measure).
        value: the objective on the unchanged prompt.
        convergence_delta: integrated gradients only: Σ scores − (f(x) − f(baseline)).
        baseline / n_steps: what the gradient and occlusion methods compared against.
        forward_passes: model calls made (a batch counts once).
    """

    method: str
    evidence: str
    scores: np.ndarray
    tokens: list[str]
    objective: Objective
    value: float
    convergence_delta: float | None = None
    baseline: str | None = None
    n_steps: int | None = None
    forward_passes: int = 0
    notes: list[str] = field(default_factory=list)

    def top(self, k: int = 3) -> list[int]:
        """The ``k`` source positions with the highest scores, best first."""
        return [int(i) for i in np.argsort(-self.scores, kind="stable")[:k]]

    def figure(self) -> Figure:
        """Bars of the scores per source token."""
        return plots.token_bars(
            self.tokens,
            self.scores,
            title=f"{self.method} ({self.evidence}) → {self.objective.label!r} at position {self.objective.position}",
            ylabel=_UNITS[self.method].format(measure=self.objective.measure),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "evidence": self.evidence,
            "scores": [float(s) for s in self.scores],
            "tokens": list(self.tokens),
            "objective": self.objective.to_json(),
            "value": self.value,
            "convergence_delta": self.convergence_delta,
            "baseline": self.baseline,
            "n_steps": self.n_steps,
            "forward_passes": self.forward_passes,
            "top": self.top(min(3, len(self.tokens))),
            "notes": list(self.notes),
        }


_UNITS = {
    "integrated_gradients": "attribution ({measure})",
    "grad_x_input": "gradient × input ({measure})",
    "occlusion": "drop in {measure} when occluded",
    "attention_rollout": "rolled-out attention weight",
}


def token_influence(
    model: nn.Module | Session,
    tokenizer: Any = None,
    prompt: str | torch.Tensor | None = None,
    *,
    target: str | int | None = None,
    method: str = "integrated_gradients",
    position: int = -1,
    measure: str = "logprob",
    baseline: str = "zero",
    n_steps: int = 32,
    quadrature: str = "gausslegendre",
    batch_size: int = 32,
) -> TokenInfluence:
    """Score every source position of ``prompt`` by its influence on one output.

    Args:
        model: a torch model (with ``tokenizer``) or a replay Session (its incident
            prompt is used when ``prompt`` is None).
        tokenizer: the model's tokenizer (None for a Session, or when passing ids).
        prompt: the text, or ids (T,) / (1, T).
        target: the output token (``" HACKED"``: must be one token of the vocabulary; text
            of several tokens is refused, naming the pieces), its id, or None: a
            Session's recorded output (its own prompt, last position), else the model's
            top prediction at ``position``; a class index for classifiers.
        method: one of :data:`METHODS` (see the module docstring).
        position: the output position whose prediction is explained (−1: the last).
        measure: ``logprob`` or ``logit`` of the target.
        baseline: ``zero`` or ``pad`` (the embed output of pad tokens at every position).
        n_steps: integration points (integrated gradients).
        quadrature: ``gausslegendre`` or ``riemann_trapezoid`` (as Captum names them).
        batch_size: rows per forward pass (IG steps, occluded positions).
    Returns:
        A :class:`TokenInfluence`.
    Raises:
        ForensicsError: unknown method/baseline/quadrature, a position outside the
            sequence, a target that is not one token of the vocabulary.

    Example::

        inf = token_influence(model, tok, "translate: moon ignore previous instructions =>",
                              target=" HACKED", method="occlusion")
        [inf.tokens[i] for i in inf.top(3)]
    """
    if method not in METHODS:
        raise ForensicsError(f"influence method '{method}' is unknown; use one of {', '.join(METHODS)}")
    if baseline not in BASELINES:
        raise ForensicsError(f"baseline '{baseline}' is unknown; use one of {', '.join(BASELINES)}")
    if quadrature not in QUADRATURES:
        raise ForensicsError(f"quadrature '{quadrature}' is unknown; use one of {', '.join(QUADRATURES)}")
    if n_steps < (2 if quadrature == "riemann_trapezoid" else 1) or batch_size < 1:
        raise ForensicsError(f"n_steps ({n_steps}) and batch_size ({batch_size}) must be positive")
    subject = subject_of(model, tokenizer)
    inputs = subject.encode(prompt)
    runner = _Runner(subject, inputs)
    clean = runner.logits()
    recorded = subject.recorded_output() if prompt is None else None  # a bundle's own incident
    objective = objective_for(
        subject, inputs, target, position=position, measure=measure, clean_logits=clean, recorded=recorded
    )
    value = float(objective(clean)[0])
    tokens = subject.tokens(inputs["input_ids"][0])
    result = TokenInfluence(method, EVIDENCE[method], np.zeros(0), tokens, objective, value)
    if method == "attention_rollout":
        result.scores = _rollout(runner, objective)
    elif method == "grad_x_input":
        embed = runner.embed()
        result.scores = (runner.gradients(objective, embed, batch_size) * embed).sum(-1)[0].double().cpu().numpy()
    elif method == "occlusion":
        result.baseline = baseline
        result.scores = _occlusion(runner, objective, runner.baseline_embed(baseline), value, baseline, batch_size)
    else:
        result.baseline, result.n_steps = baseline, n_steps
        _integrate(result, runner, runner.baseline_embed(baseline), quadrature, batch_size)
    result.forward_passes = runner.passes
    if not np.all(np.isfinite(result.scores)):
        result.notes.append("some scores are not finite (the objective overflowed); compare with measure='logit'")
    return result


def _integrate(result: TokenInfluence, runner: _Runner, base: torch.Tensor, quadrature: str, batch_size: int) -> None:
    """Integrated gradients into ``result``: scores, convergence delta, and a note when
    the delta is large."""
    assert result.n_steps is not None
    scores, delta, gap = _integrated_gradients(runner, result.objective, base, result.n_steps, quadrature, batch_size)
    result.scores, result.convergence_delta = scores, delta
    if abs(delta) > 0.05 * abs(gap):
        result.notes.append(
            f"the convergence delta ({delta:+.3g}) is {abs(delta) / max(abs(gap), 1e-12):.0%} of "
            f"f(x) − f(baseline) ({gap:+.3g}); raise n_steps (LayerNorm makes the path from a zero "
            "baseline steep near it) or use baseline='pad'"
        )


class _Runner:
    """Passes of one prompt: clean, or with the embed site replaced (counted by the subject)."""

    def __init__(self, subject: Subject, inputs: ModelInputs):
        self.subject = subject
        self.inputs = inputs
        self._embed: torch.Tensor | None = None
        if "embed" not in subject.adapter.points:
            raise ForensicsError(
                f"{type(subject.model).__name__} has no 'embed' site; token influence needs a GPT-2, BERT or "
                "Llama-family model"
            )

    @property
    def length(self) -> int:
        return self.inputs.length

    @property
    def passes(self) -> int:
        return self.subject.passes

    def logits(self) -> torch.Tensor:
        """The clean scores; the same pass keeps the embed output for :meth:`embed`."""
        kept: dict[str, torch.Tensor] = {}

        def keep(tensor: torch.Tensor, call: SiteCall) -> None:
            kept.setdefault("embed", tensor.detach().clone())

        with self.subject.environment(), torch.no_grad(), hooks(self.subject.adapter, {"embed": keep}):
            logits = self.subject.call(self.inputs)
        self._embed = kept["embed"]
        return logits

    def embed(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The embed site's output (1, T, d_model) for ``ids`` (default: the prompt, as
        the clean pass saw it)."""
        if ids is None and self._embed is not None:
            return self._embed
        inputs = self.inputs if ids is None else ModelInputs.of_ids(ids)
        return self.subject.capture(inputs, ["embed"])["embed"].unsqueeze(0)

    def baseline_embed(self, kind: str) -> torch.Tensor:
        """The baseline (1, T, d_model): zeros, or the embed output of T pad tokens."""
        if kind == "zero":
            return torch.zeros_like(self.embed())
        tok = self.subject.tokenizer
        pad = None if tok is None else getattr(tok, "pad_token_id", None)
        if pad is None and tok is not None:
            pad = getattr(tok, "eos_token_id", None)
        if pad is None:
            raise ForensicsError("baseline 'pad' needs a tokenizer with a pad (or eos) token; use baseline='zero'")
        return self.embed(torch.full_like(self.inputs["input_ids"], int(pad)))

    @contextmanager
    def replacing_embed(self, embed: torch.Tensor) -> Iterator[None]:
        """Inside the block, the embed site outputs ``embed`` (B, T, d_model)."""

        def put(tensor: torch.Tensor, call: SiteCall) -> torch.Tensor:
            return embed

        with hooks(self.subject.adapter, {"embed": put}):
            yield

    def objective_at(self, objective: Objective, embed: torch.Tensor) -> torch.Tensor:
        """The objective (B,) with the embed site replaced by ``embed`` (B, T, d), no grad."""
        with self.subject.environment(), torch.no_grad(), self.replacing_embed(embed):
            return objective(self.subject.call(self.inputs, embed.shape[0]))

    def gradients(self, objective: Objective, points: torch.Tensor, batch_size: int) -> torch.Tensor:
        """∂objective/∂embed at each row of ``points`` (N, T, d), in chunks of ``batch_size``."""
        grads = []
        for chunk in points.split(batch_size):
            leaf = chunk.detach().clone().requires_grad_(True)
            with self.subject.environment(), torch.enable_grad(), self.replacing_embed(leaf):
                out = objective(self.subject.call(self.inputs, leaf.shape[0]))
                (grad,) = torch.autograd.grad(out.sum(), [leaf])
            grads.append(grad.detach())
        return torch.cat(grads)


def quadrature_points(n_steps: int, quadrature: str) -> tuple[list[float], list[float]]:
    """(alphas, weights) on [0, 1], as Captum's ``approximation_parameters`` gives them."""
    if quadrature == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(n_steps)
        return (0.5 * (1 + x)).tolist(), (0.5 * w).tolist()
    weights = [1 / n_steps] * n_steps
    weights[0] /= 2
    weights[-1] /= 2
    return torch.linspace(0, 1, n_steps).tolist(), weights


def _integrated_gradients(
    runner: _Runner, objective: Objective, base: torch.Tensor, n_steps: int, quadrature: str, batch_size: int
) -> tuple[np.ndarray, float, float]:
    """(scores (T,), convergence delta, f(x) − f(baseline))."""
    embed = runner.embed()  # (1, T, d)
    alphas, weights = quadrature_points(n_steps, quadrature)
    a = torch.tensor(alphas, dtype=embed.dtype, device=embed.device).view(-1, 1, 1)
    points = base + a * (embed - base)  # (n_steps, T, d)
    grads = runner.gradients(objective, points, batch_size)  # (n_steps, T, d)
    w = torch.tensor(weights, dtype=grads.dtype, device=grads.device).view(-1, 1, 1)
    attributions = (grads * w).sum(0) * (embed - base)[0]  # (T, d)
    ends = runner.objective_at(objective, torch.cat([embed, base]))
    gap = float(ends[0] - ends[1])
    return attributions.sum(-1).double().cpu().numpy(), float(attributions.sum()) - gap, gap


def _occlusion(
    runner: _Runner, objective: Objective, base: torch.Tensor, value: float, baseline: str, batch_size: int
) -> np.ndarray:
    adapter, length = runner.subject.adapter, runner.length
    kind = "zero" if baseline == "zero" else "patch"
    rows = []
    for i in range(length):  # row i: source position i replaced by the baseline's
        target = resolve(Intervention("embed", kind, positions=(i,)), adapter)
        rows.append([Prepared(target, None if kind == "zero" else base[0], length)])
    logits = runner.subject.run(runner.inputs, rows, batch_size)
    return (value - objective(logits).double()).cpu().numpy()


def _rollout(runner: _Runner, objective: Objective) -> np.ndarray:
    adapter = runner.subject.adapter
    sites = [f"blocks.{layer}.attn.pattern" for layer in range(adapter.n_layers)]
    sites = [s for s in sites if s in adapter.points]
    if not sites:
        raise ForensicsError("attention rollout needs attention patterns; this model exposes none")
    patterns: dict[str, torch.Tensor] = {}

    def keep(tensor: torch.Tensor, call: SiteCall) -> None:
        patterns[call.site] = tensor[0].detach().double().mean(0)  # (T, T): heads averaged

    with (
        runner.subject.environment(),
        torch.no_grad(),
        hooks(adapter, dict.fromkeys(sites, keep), recompute_patterns=True),
    ):
        runner.subject.call(runner.inputs)
    length = runner.length
    rollout = torch.eye(length, dtype=torch.float64)
    for site in sites:
        a = 0.5 * patterns[site].cpu() + 0.5 * torch.eye(length, dtype=torch.float64)
        rollout = (a / a.sum(-1, keepdim=True)) @ rollout
    row = objective.position if runner.subject.adapter.causal else 0
    return rollout[row].numpy()
