"""Automated circuit discovery: rank edges by EAP-IG, prune by exact patching.

::

    c = discover(model, tok, prompts, corrupted=corrupted, metric="logprob", target_faithfulness=0.9)
    c.edges, c.nodes            # the circuit
    c.faithfulness, c.completeness, c.cpr, c.cmd
    c.node_ranking()            # every head / MLP by its exact patching effect
    held = c.evaluate(model, tok, other_prompts, corrupted=other_corrupted)  # on prompts it never saw

1. **Rank** every edge (nodes and edges of :mod:`~model_forensics.circuits.edges`) by
   |EAP-IG| (Hanna et al. 2024): (a_u(corrupt) − a_u(clean)) · ḡ_v with ḡ_v the receiver
   input's gradient averaged over ``ig_steps`` points between the corrupted and the clean
   input embeddings (the method that ranked best on the MIB circuit-localisation track).
2. **Curve**: for circuit sizes k (every k up to 256 edges, a geometric grid beyond) the
   exact faithfulness of the top-k edges, f(k) = (m(circuit) − m(corrupt)) / (m(clean) −
   m(corrupt)), where the circuit run keeps the circuit's edges clean and every other edge
   carries the corrupted (or mean) activation. CPR = ∫ f dx and CMD = ∫ |1 − f| dx over the
   edge fraction x = k / E (trapezoid over the evaluated sizes; Mueller et al. 2025, MIB).
3. **Prune**: the smallest k with f(k) ≥ ``target_faithfulness``, then greedy removal:
   while some edge can be dropped with f still ≥ the target, drop the one that leaves f
   highest (every candidate evaluated by exact patching, in one batched pass).

Completeness is the metric lost when only the circuit's edges are corrupted (the rest clean):
(m(clean) − m(clean without circuit)) / (m(clean) − m(corrupt)); near 1 when nothing
outside the circuit carries the behaviour.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from model_forensics.circuits.edges import OUTPUT, Nodes
from model_forensics.circuits.graph import (
    Edge,
    MetricFn,
    Progress,
    Task,
    draw_graph,
    edge_attribution,
    node_position,
    prepare_task,
)
from model_forensics.circuits.subject import subject_of
from model_forensics.core.errors import ForensicsError
from model_forensics.replay.session import Session

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FULL_CURVE = 256  # every size up to this many edges; a geometric grid beyond
MAX_PRUNE = 64  # greedy removal only for circuits up to this size


@dataclass
class CircuitScore:
    """Faithfulness and completeness of one circuit on one prompt set."""

    faithfulness: float
    completeness: float
    clean_metric: float
    corrupted_metric: float
    circuit_metric: float
    ablated_metric: float
    n_prompts: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Circuit:
    """A discovered circuit and how it was found (module docstring).

    Attributes:
        edges: the circuit's edges, strongest EAP-IG first (``Edge.score``).
        ranking: every edge by |EAP-IG|.
        curve: (circuit size k, faithfulness of the top-k edges) pairs.
        total_edges: edges in the full graph.
        score: faithfulness / completeness on the discovery prompts.
        held_out: the same on held-out prompts, when given.
    """

    edges: list[Edge]
    ranking: list[Edge] = field(repr=False)
    curve: list[tuple[int, float]] = field(repr=False)
    total_edges: int
    target_faithfulness: float
    score: CircuitScore
    metric: str
    ablation: str
    ig_steps: int
    mlps: bool
    forward_passes: int
    seconds: float
    held_out: CircuitScore | None = None
    node_effects: dict[str, float] = field(default_factory=dict)

    @property
    def faithfulness(self) -> float:
        return self.score.faithfulness

    @property
    def completeness(self) -> float:
        return self.score.completeness

    @property
    def nodes(self) -> list[str]:
        """Nodes the circuit's edges touch, forward order."""
        used = {e.source for e in self.edges} | {e.target for e in self.edges}
        order = {n: i for i, n in enumerate(_node_order(self.ranking))}
        return sorted(used, key=lambda n: order.get(n, len(order)))

    @property
    def edge_fraction(self) -> float:
        return len(self.edges) / max(1, self.total_edges)

    @property
    def cpr(self) -> float:
        """Area under the faithfulness curve over the edge fraction (higher is better)."""
        return _area(self.curve, self.total_edges, lambda f: f)

    @property
    def cmd(self) -> float:
        """Area under |1 − faithfulness| over the edge fraction (lower is better)."""
        return _area(self.curve, self.total_edges, lambda f: abs(1.0 - f))

    def node_ranking(self, method: str = "patching") -> list[tuple[str, float]]:
        """Every upstream node (``embed``, heads, MLPs), most important first.

        ``patching`` (default): the exact drop of the metric when all of the node's outgoing
        edges carry the corrupted activation (one batched pass over the nodes).
        ``eap-ig``: Σ |EAP-IG score| of the node's outgoing edges (no extra pass).
        """
        if method == "patching":
            return sorted(self.node_effects.items(), key=lambda kv: -abs(kv[1]))
        if method != "eap-ig":
            raise ForensicsError(f"node ranking '{method}' is unknown; use patching or eap-ig")
        totals: dict[str, float] = {}
        for e in self.ranking:
            totals[e.source] = totals.get(e.source, 0.0) + abs(e.score)
        return sorted(totals.items(), key=lambda kv: -kv[1])

    def evaluate(
        self,
        model: nn.Module | Session,
        tokenizer: Any,
        prompts: Sequence[str] | torch.Tensor,
        *,
        corrupted: Sequence[str] | torch.Tensor | None = None,
        metric: str | MetricFn | None = None,
        targets: Sequence[str | int] | None = None,
        foils: Sequence[str | int] | None = None,
    ) -> CircuitScore:
        """Faithfulness and completeness of this circuit on other prompts (exact patching)."""
        subject = subject_of(model, tokenizer)
        nodes = Nodes.of(subject.adapter.n_layers, int(subject.adapter.n_heads or 0), self.mlps)
        task = prepare_task(subject, nodes, prompts, corrupted, metric or self.metric, targets, foils)
        return _score(task, _indices(nodes, self.edges))

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "ablation": self.ablation,
            "ig_steps": self.ig_steps,
            "mlps": self.mlps,
            "target_faithfulness": self.target_faithfulness,
            "faithfulness": self.faithfulness,
            "completeness": self.completeness,
            "n_edges": len(self.edges),
            "n_nodes": len(self.nodes),
            "total_edges": self.total_edges,
            "edge_fraction": self.edge_fraction,
            "cpr": self.cpr,
            "cmd": self.cmd,
            "score": self.score.to_json(),
            "held_out": self.held_out.to_json() if self.held_out is not None else None,
            "edges": [e.to_json() for e in self.edges],
            "nodes": self.nodes,
            "node_ranking": [{"node": n, "effect": s} for n, s in self.node_ranking()],
            "node_ranking_eap_ig": [{"node": n, "score": s} for n, s in self.node_ranking("eap-ig")],
            "curve": [{"edges": k, "faithfulness": f} for k, f in self.curve],
            "ranking": [e.to_json() for e in self.ranking],
            "forward_passes": self.forward_passes,
            "seconds": self.seconds,
        }

    def figure(self) -> Figure:
        """Faithfulness over circuit size (with the target and the chosen size), the node
        ranking, and the circuit's edges."""
        from model_forensics.core.plots import figure

        fig = figure(14, 4.5)
        ax, bx, cx = fig.subplots(1, 3, width_ratios=[1, 1, 1.4])
        ks = [k / max(1, self.total_edges) for k, _ in self.curve]
        ax.plot(ks, [f for _, f in self.curve], marker=".", label="top-k edges")
        ax.axhline(self.target_faithfulness, color="black", linestyle="--", linewidth=1, label="target")
        ax.axvline(self.edge_fraction, color="tab:red", linewidth=1, label=f"circuit ({len(self.edges)} edges)")
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlabel("fraction of edges")
        ax.set_ylabel("faithfulness")
        ax.set_title(f"CPR {self.cpr:.2f}, CMD {self.cmd:.2f}")
        ax.legend(fontsize=7)
        ranking = [(n, s) for n, s in self.node_ranking() if n != "embed"][:15]
        bx.barh([n.replace("blocks.", "") for n, _ in ranking][::-1], [s for _, s in ranking][::-1])
        bx.set_xlabel("metric drop, node's edges patched")
        bx.tick_params(axis="y", labelsize=7)
        bx.set_title("node ranking")
        title = f"circuit: {len(self.edges)} edges, {len(self.nodes)} nodes"
        draw_graph(fig, cx, _node_order(self.ranking), self.edges, title)
        return fig


def _node_order(ranking: Sequence[Edge]) -> list[str]:
    seen: dict[str, None] = {}
    for e in ranking:
        seen.setdefault(e.source, None)
    return [*sorted(seen, key=lambda n: (node_position(n)[0], node_position(n)[1] == "mlp", n)), OUTPUT]


def _area(curve: Sequence[tuple[int, float]], total: int, fn: Any) -> float:
    pts = sorted((k / max(1, total), fn(f)) for k, f in curve)
    return float(sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in itertools.pairwise(pts)))


def _indices(nodes: Nodes, edges: Sequence[Edge]) -> list[tuple[int, int]]:
    try:
        return [(nodes.upstream.index(e.source), nodes.receivers.index(e.target)) for e in edges]
    except ValueError:
        raise ForensicsError(
            "the circuit's edges do not exist in this model; evaluate it on the model it came from"
        ) from None


def _circuit_mask(task: Task, edges: Sequence[tuple[int, int]], keep: bool) -> torch.Tensor:
    m = task.runner.nodes.mask(1, [edges], value=0.0 if keep else 1.0)[0]
    return m


def _faithfulness(task: Task, value: float) -> float:
    span = task.clean_metric - task.corrupted_metric
    return (value - task.corrupted_metric) / span if span != 0 else float("nan")


def _score(task: Task, edges: Sequence[tuple[int, int]]) -> CircuitScore:
    kept, ablated = task.patched_means([_circuit_mask(task, edges, True), _circuit_mask(task, edges, False)])
    span = task.clean_metric - task.corrupted_metric
    return CircuitScore(
        faithfulness=_faithfulness(task, kept),
        completeness=(task.clean_metric - ablated) / span if span != 0 else float("nan"),
        clean_metric=task.clean_metric,
        corrupted_metric=task.corrupted_metric,
        circuit_metric=kept,
        ablated_metric=ablated,
        n_prompts=task.n_prompts,
    )


def _sizes(total: int) -> list[int]:
    if total <= FULL_CURVE:
        return list(range(total + 1))
    grid = {0, total, *range(0, 65)}
    k = 64.0
    while k < total:
        grid.add(int(k))
        k *= 1.25
    grid |= {max(1, round(total * f)) for f in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)}
    return sorted(grid)


def discover(
    model: nn.Module | Session,
    tokenizer: Any,
    prompts: Sequence[str] | torch.Tensor,
    *,
    corrupted: Sequence[str] | torch.Tensor | None = None,
    metric: str | MetricFn = "logprob",
    targets: Sequence[str | int] | None = None,
    foils: Sequence[str | int] | None = None,
    target_faithfulness: float = 0.9,
    ig_steps: int = 5,
    ig_path: str = "embeddings",
    mlps: bool = True,
    prune: bool = True,
    held_out: Sequence[str] | torch.Tensor | None = None,
    held_out_corrupted: Sequence[str] | torch.Tensor | None = None,
    progress: Progress | None = None,
) -> Circuit:
    """Find the smallest circuit whose edges alone recover ``target_faithfulness`` of the
    metric (module docstring).

    Args:
        model / tokenizer: a GPT-2 or Llama-family causal LM and its tokenizer.
        prompts / corrupted / metric / targets / foils: as :func:`~.graph.dependency_graph`.
        target_faithfulness: the fraction of m(clean) − m(corrupt) the circuit must recover.
        ig_steps: integration points of EAP-IG (0: plain EAP, the gradient at the clean input).
        ig_path: ``activations`` (edge-mask interpolation) or ``embeddings`` (input
            interpolation); see :func:`~.graph.edge_attribution`.
        mlps: MLPs as nodes (False: folded into the residual stream).
        prune: greedy removal after the top-k cut (circuits up to 64 edges).
        held_out / held_out_corrupted: prompts not used for ranking or pruning; the circuit's
            faithfulness and completeness on them go to ``Circuit.held_out``.
        progress: called as ``progress(stage, done, total)``.

    Raises:
        ForensicsError: bad prompts, lengths, targets or metric; a target outside (0, 1];
            clean and corrupted metric equal (nothing to recover).
    """
    if not 0.0 < target_faithfulness <= 1.0:
        raise ForensicsError(f"target faithfulness {target_faithfulness} must lie in (0, 1]")
    if ig_steps < 0:
        raise ForensicsError(f"ig_steps must be ≥ 0, got {ig_steps}")
    start = time.perf_counter()
    subject = subject_of(model, tokenizer)
    nodes = Nodes.of(subject.adapter.n_layers, int(subject.adapter.n_heads or 0), mlps)
    task = prepare_task(subject, nodes, prompts, corrupted, metric, targets, foils)
    if not abs(task.clean_metric - task.corrupted_metric) > 1e-6:
        raise ForensicsError(
            f"the metric is {task.clean_metric:.4g} on clean and corrupted prompts alike; nothing to recover — "
            "pass corrupted prompts that change the output"
        )
    scores = edge_attribution(task, ig_steps, ig_path, progress)
    order = sorted(nodes.edges, key=lambda e: -abs(float(scores[e])))
    curve = _curve(task, order, progress)
    chosen = _smallest(task, order, curve, target_faithfulness)
    if prune and len(chosen) <= MAX_PRUNE:
        chosen = _prune(task, chosen, target_faithfulness, progress)
    rank = {e: i for i, e in enumerate(order)}
    chosen = sorted(chosen, key=lambda e: rank[e])

    def edge(e: tuple[int, int]) -> Edge:
        return Edge(nodes.upstream[e[0]], nodes.receivers[e[1]], float(scores[e]))

    circuit = Circuit(
        edges=[edge(e) for e in chosen],
        ranking=[edge(e) for e in order],
        curve=curve,
        total_edges=len(order),
        target_faithfulness=target_faithfulness,
        score=_score(task, chosen),
        metric=task.metric_name,
        ablation=task.ablation,
        ig_steps=ig_steps,
        mlps=mlps,
        forward_passes=0,
        seconds=0.0,
    )
    circuit.node_effects = _node_effects(task, progress)
    if held_out is not None:
        circuit.held_out = circuit.evaluate(model, tokenizer, held_out, corrupted=held_out_corrupted, metric=metric)
    circuit.forward_passes = task.runner.passes
    circuit.seconds = time.perf_counter() - start
    return circuit


def _curve(task: Task, order: list[tuple[int, int]], progress: Progress | None) -> list[tuple[int, float]]:
    sizes = _sizes(len(order))
    masks = [_circuit_mask(task, order[:k], True) for k in sizes]
    values = task.patched_means(masks, progress=progress, stage="faithfulness curve")
    return [(k, _faithfulness(task, v)) for k, v in zip(sizes, values, strict=True)]


def _smallest(
    task: Task, order: list[tuple[int, int]], curve: list[tuple[int, float]], target: float
) -> list[tuple[int, int]]:
    """The top-k edges for the smallest evaluated k reaching the target; between two grid
    points, bisected by exact evaluation (the curve is near-monotone there)."""
    hit = next((i for i, (_, f) in enumerate(curve) if f >= target), None)
    if hit is None:
        return list(order)
    k_hi = curve[hit][0]
    k_lo = curve[hit - 1][0] if hit > 0 else 0
    while k_hi - k_lo > 1:
        mid = (k_lo + k_hi) // 2
        (value,) = task.patched_means([_circuit_mask(task, order[:mid], True)])
        if _faithfulness(task, value) >= target:
            k_hi = mid
        else:
            k_lo = mid
    return list(order[:k_hi])


def _prune(
    task: Task, chosen: list[tuple[int, int]], target: float, progress: Progress | None
) -> list[tuple[int, int]]:
    current = list(chosen)
    while len(current) > 1:
        candidates = [current[:i] + current[i + 1 :] for i in range(len(current))]
        values = task.patched_means([_circuit_mask(task, c, True) for c in candidates])
        best = max(range(len(values)), key=lambda i: values[i])
        if math.isnan(values[best]) or _faithfulness(task, values[best]) < target:
            break
        current = candidates[best]
        if progress is not None:
            progress("pruning", len(chosen) - len(current), len(chosen))
    return current


def _node_effects(task: Task, progress: Progress | None = None) -> dict[str, float]:
    """Exact metric drop (clean − patched) when every outgoing edge of a node is cut."""
    nodes = task.runner.nodes
    ones = nodes.mask(1)[0]
    masks = []
    for u in range(len(nodes.upstream)):
        m = ones.clone()
        m[u, :] = 0.0
        masks.append(m)
    values = task.patched_means(masks, progress=progress, stage="node effects")
    return {name: task.clean_metric - v for name, v in zip(nodes.upstream, values, strict=True)}
