"""Dependency graphs: which component feeds which, scored by edge attribution patching and
confirmed by path patching.

::

    g = dependency_graph(model, tok, prompts, corrupted=corrupted, metric="logprob")
    g.graph                 # networkx.DiGraph: nodes embed, blocks.L.attn.head.H, blocks.L.mlp, logits
    g.top(10)               # the strongest edges
    g.to_json(); g.write_graphml("g.graphml"); g.figure().savefig("g.png")

Nodes and edges are those of :mod:`model_forensics.circuits.edges` (the input, every
attention head, every MLP, the logits; u → v when u writes before v reads). Each edge gets

- ``score``, edge attribution patching (EAP, Syed et al. 2023): (a_u(corrupt) − a_u(clean))
  · ∂metric/∂in_v, summed over positions and d_model and averaged over prompts, where in_v
  is receiver v's own input (one gradient pass per prompt batch). It estimates, to first
  order, how much the metric changes when only that edge carries the corrupted activation.
- ``patched`` (the ``confirm`` strongest edges), path patching: the exact change of the
  metric when only that edge's contribution to the receiver's input is swapped for the
  corrupted one (every other edge clean), by the patched pass of
  :class:`~model_forensics.circuits.edges.EdgeRunner`.

The metric is read at the last position of each prompt: ``logprob`` (default) or ``logit``
of the prompt's target token, ``logit_diff`` (the target's logit minus the foil's: the
corrupted prompt's top token unless ``foils`` are given), or a callable taking the last
position's scores (N, V), targets (N,) and foils (N,) and returning (N,). Targets default
to the model's top token on each clean prompt. ``corrupted`` holds one prompt per prompt,
tokenized to the same length; None uses mean ablation (every upstream activation replaced
by its mean over the prompts, which then must all have one length).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from model_forensics.circuits.edges import INPUT, OUTPUT, EdgeRunner, Nodes, receiver_gradients
from model_forensics.circuits.subject import Subject, _token_id, subject_of
from model_forensics.core.errors import ForensicsError
from model_forensics.replay.session import Session

if TYPE_CHECKING:
    import networkx as nx
    from matplotlib.figure import Figure

METRICS = ("logprob", "logit", "logit_diff")
ROW_BUDGET = 64_000_000  # floats of stacked upstream activations per patched pass
MetricFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Callable[[str, int, int], None]


# -- prompts, targets and the metric ---------------------------------------------------------
@dataclass
class Batch:
    """Prompts of one length with their corrupted twins: ids (N, T), targets / foils (N,),
    and (filled by :meth:`Task.prepare`) the upstream activations (N, U, T, d) of both."""

    ids: torch.Tensor
    corrupted: torch.Tensor | None
    targets: torch.Tensor
    foils: torch.Tensor
    clean: torch.Tensor = field(default=torch.empty(0), repr=False)
    corrupt: torch.Tensor = field(default=torch.empty(0), repr=False)


@dataclass
class Task:
    """What an edge analysis explains: the batches, the metric and its clean / corrupted
    values (means over all prompts)."""

    runner: EdgeRunner
    batches: list[Batch]
    metric: MetricFn
    metric_name: str
    ablation: str
    clean_metric: float = 0.0
    corrupted_metric: float = 0.0

    @property
    def n_prompts(self) -> int:
        return sum(int(b.ids.shape[0]) for b in self.batches)

    def measure(self, batch: Batch, logits: torch.Tensor, rows: int) -> torch.Tensor:
        """The metric (rows,) of a pass over ``rows`` = k · N rows (k variants of the batch)."""
        k = rows // batch.ids.shape[0]
        return self.metric(logits.float(), batch.targets.repeat(k), batch.foils.repeat(k))

    def patched_means(
        self,
        masks: Sequence[torch.Tensor],
        batch_rows: int = 512,
        progress: Progress | None = None,
        stage: str = "patching",
    ) -> list[float]:
        """The metric, averaged over every prompt, of one patched run per mask (U, R);
        ``progress(stage, masks done, masks)`` after each pass (over every batch)."""
        total = torch.zeros(len(masks))
        done, todo = 0, len(masks) * len(self.batches)
        for batch in self.batches:
            n = int(batch.ids.shape[0])
            # rows per pass: at most batch_rows, and the (rows, U, T, d) activation deltas
            # a pass stacks kept under ~256 MB
            per_row = int(batch.corrupt[0].numel())
            rows = max(1, min(batch_rows, ROW_BUDGET // max(1, per_row)))
            per = max(1, rows // n)
            for start in range(0, len(masks), per):
                chunk = masks[start : start + per]
                mask = torch.stack(list(chunk)).repeat_interleave(n, dim=0)  # (k·N, U, R)
                ids = batch.ids.repeat(len(chunk), 1)
                out = self.runner.run(ids, corrupt=batch.corrupt, mask=mask)  # corrupt broadcast over chunk
                values = self.measure(batch, out.logits, ids.shape[0]).view(len(chunk), n)
                total[start : start + len(chunk)] += values.sum(1)
                done += len(chunk)
                if progress is not None:
                    progress(stage, done, todo)
        return (total / self.n_prompts).tolist()


def prepare_task(
    subject: Subject,
    nodes: Nodes,
    prompts: Sequence[str] | torch.Tensor,
    corrupted: Sequence[str] | torch.Tensor | None,
    metric: str | MetricFn,
    targets: Sequence[str | int] | None,
    foils: Sequence[str | int] | None,
) -> Task:
    """Tokenize, check lengths, resolve targets and foils, and capture the clean and
    corrupted upstream activations of every prompt.

    Raises:
        ForensicsError: no prompts; a corrupted prompt (or target / foil list) that does not
            pair with its prompt; mean ablation over prompts of different lengths; an
            unknown metric; a target that is not one token.
    """
    if not callable(metric) and metric not in METRICS:
        raise ForensicsError(f"metric '{metric}' is unknown; use one of {', '.join(METRICS)} or a callable")
    runner = EdgeRunner(subject, nodes)
    clean_ids = _encode(subject, prompts, "prompts")
    if not clean_ids:
        raise ForensicsError("no prompts given; pass at least one prompt to explain")
    corrupt_ids = _encode(subject, corrupted, "corrupted prompts") if corrupted is not None else None
    if corrupt_ids is not None:
        _pair(clean_ids, corrupt_ids)
    elif len({len(i) for i in clean_ids}) > 1:
        lengths = sorted({len(i) for i in clean_ids})
        raise ForensicsError(
            f"mean ablation needs prompts of one length (aligned positions), got lengths {lengths}; "
            "pass corrupted prompts or prompts of equal length"
        )
    for name, values in (("targets", targets), ("foils", foils)):
        if values is not None and len(values) != len(clean_ids):
            raise ForensicsError(f"{len(values)} {name} for {len(clean_ids)} prompts; give one per prompt")
    fn, name = _metric(metric)
    groups: dict[int, list[int]] = {}
    for i, row in enumerate(clean_ids):
        groups.setdefault(len(row), []).append(i)
    batches = []
    for rows in groups.values():
        ids = torch.tensor([clean_ids[i] for i in rows])
        cor = torch.tensor([corrupt_ids[i] for i in rows]) if corrupt_ids is not None else None
        batches.append(_batch(subject, runner, ids, cor, rows, targets, foils))
    if corrupt_ids is None:  # mean ablation: one batch, every row's corrupt = the mean
        b = batches[0]
        b.corrupt = b.clean.mean(0, keepdim=True).expand_as(b.clean).contiguous()
    task = Task(runner, batches, fn, name, "corrupted" if corrupt_ids is not None else "mean")
    ones = nodes.mask(1)[0]
    task.clean_metric, task.corrupted_metric = task.patched_means([ones, torch.zeros_like(ones)])
    return task


def _encode(subject: Subject, prompts: Sequence[str] | torch.Tensor, what: str) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        ids = prompts if prompts.dim() == 2 else prompts.unsqueeze(0)
        return [row.tolist() for row in ids]
    if isinstance(prompts, str):
        raise ForensicsError(f"{what} must be a list of prompts, not one string")
    out = []
    for text in prompts:
        if not isinstance(text, str) or not text.strip():
            raise ForensicsError(f"{what}: every prompt must be non-empty text, got {text!r}")
        out.append(subject.encode(text)["input_ids"][0].tolist())
    return out


def _pair(clean: list[list[int]], corrupt: list[list[int]]) -> None:
    if len(clean) != len(corrupt):
        raise ForensicsError(f"{len(corrupt)} corrupted prompts for {len(clean)} prompts; give one per prompt")
    for i, (a, b) in enumerate(zip(clean, corrupt, strict=True)):
        if len(a) != len(b):
            raise ForensicsError(
                f"corrupted prompt {i} is {len(b)} tokens but its prompt is {len(a)}; edge patching swaps "
                "activations position by position, so each corrupted prompt must tokenize to its prompt's length"
            )


def _metric(metric: str | MetricFn) -> tuple[MetricFn, str]:
    if callable(metric):
        return metric, getattr(metric, "__name__", "custom")

    def logprob(logits: torch.Tensor, targets: torch.Tensor, foils: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]

    def logit(logits: torch.Tensor, targets: torch.Tensor, foils: torch.Tensor) -> torch.Tensor:
        return logits.gather(1, targets[:, None])[:, 0]

    def logit_diff(logits: torch.Tensor, targets: torch.Tensor, foils: torch.Tensor) -> torch.Tensor:
        return logit(logits, targets, foils) - logits.gather(1, foils[:, None])[:, 0]

    return {"logprob": logprob, "logit": logit, "logit_diff": logit_diff}[metric], metric


def _batch(
    subject: Subject,
    runner: EdgeRunner,
    ids: torch.Tensor,
    corrupted: torch.Tensor | None,
    rows: list[int],
    targets: Sequence[str | int] | None,
    foils: Sequence[str | int] | None,
) -> Batch:
    clean = runner.run(ids, keep=True)
    corrupt = runner.run(corrupted, keep=True) if corrupted is not None else None
    vocab = int(clean.logits.shape[-1])
    tgt = _token_ids(subject, targets, rows, vocab, clean.logits)
    top_foil = corrupt.logits if corrupt is not None else clean.logits
    foil = _token_ids(subject, foils, rows, vocab, top_foil)
    batch = Batch(ids, corrupted, tgt, foil, clean.activations)  # type: ignore[arg-type]
    if corrupt is not None:
        batch.corrupt = corrupt.activations  # type: ignore[assignment]
    return batch


def _token_ids(
    subject: Subject, values: Sequence[str | int] | None, rows: list[int], vocab: int, logits: torch.Tensor
) -> torch.Tensor:
    if values is None:
        return logits.argmax(-1)
    out = []
    for i in rows:
        v = values[i]
        if isinstance(v, int) and not isinstance(v, bool):
            if not 0 <= v < vocab:
                raise ForensicsError(f"target id {v} is not in the vocabulary (0–{vocab - 1})")
            out.append(v)
        else:
            out.append(_token_id(subject, str(v), vocab))
    return torch.tensor(out)


# -- edge attribution --------------------------------------------------------------------------
IG_PATHS = ("activations", "embeddings")


def edge_attribution(
    task: Task, steps: int = 0, path: str = "activations", progress: Progress | None = None
) -> torch.Tensor:
    """(U, R) edge scores, averaged over prompts; entries that are no edge are 0.

    ``steps`` = 0: EAP, (a_u(corrupt) − a_u(clean)) · ∂metric/∂in_v at the clean input.
    ``steps`` > 0: EAP-IG with ``steps`` midpoints α = (k + ½)/steps, along one of two
    straight lines from the corrupted to the clean run:

    - ``activations`` (default): every edge interpolated at once, in_v = Σ_u a_u(corrupt)
      + α (a_u(run) − a_u(corrupt)) (the edge mask m = α); the score is −∫ ∂metric/∂m_uv dα,
      integrated gradients of the metric over the edge mask. The scores then sum to
      m(corrupt) − m(clean) up to the quadrature error (completeness of IG).
    - ``embeddings`` (Hanna et al. 2024): the input embeddings interpolated, ∂metric/∂in_v
      averaged over the points and multiplied by a_u(corrupt) − a_u(clean).
    """
    if path not in IG_PATHS:
        raise ForensicsError(f"IG path '{path}' is unknown; use one of {', '.join(IG_PATHS)}")
    nodes = task.runner.nodes
    total = torch.zeros(len(nodes.upstream), len(nodes.receivers))
    alphas = [1.0] if steps == 0 else [(k + 0.5) / steps for k in range(steps)]
    done, todo = 0, len(alphas) * len(task.batches)
    for batch in task.batches:
        n = int(batch.ids.shape[0])
        # the points of one batch go through together, in passes of at most ~ROW_BUDGET
        # floats of receiver inputs (rows × R × T × d)
        per_row = len(nodes.receivers) * int(batch.clean[0, 0].numel())
        per = max(1, min(len(alphas), ROW_BUDGET // max(1, per_row * n)))
        grads: torch.Tensor | None = None
        for start in range(0, len(alphas), per):
            chunk = alphas[start : start + per]
            if steps > 0 and path == "activations":
                total -= _mask_gradient(task, batch, chunk) / len(alphas)
            else:
                g = _embedding_gradient(task, batch, chunk)
                grads = g if grads is None else grads + g
            done += len(chunk)
            if progress is not None:
                progress("gradients", done, todo)
        if grads is not None:
            delta = (batch.corrupt - batch.clean).float()  # (N, U, T, d)
            total += torch.einsum("nutd,nrtd->ur", delta, grads / len(alphas))
    valid = torch.zeros_like(total, dtype=torch.bool)
    for u, r in nodes.edges:
        valid[u, r] = True
    return torch.where(valid, total / task.n_prompts, torch.zeros_like(total))


def _embedding_gradient(task: Task, batch: Batch, alphas: Sequence[float]) -> torch.Tensor:
    """Σ over the points α of every receiver's input gradient (N, R, T, d) with the input
    embeddings at e(corrupt) + α (e(clean) − e(corrupt)), all points in one pass."""
    n = int(batch.ids.shape[0])
    embed = None
    if list(alphas) != [1.0]:
        e_clean, e_corrupt = batch.clean[:, 0], batch.corrupt[:, 0]  # (N, T, d)
        a = torch.tensor(alphas, dtype=e_clean.dtype).view(-1, 1, 1, 1)
        embed = (e_corrupt + a * (e_clean - e_corrupt)).flatten(0, 1)  # (k·N, T, d), point-major
    ids = batch.ids.repeat(len(alphas), 1)
    out = task.runner.run(ids, embed=embed, grad=True)
    g = receiver_gradients(task.runner, out, task.measure(batch, out.logits, ids.shape[0]))
    return g.view(len(alphas), n, *g.shape[1:]).sum(0)


def _mask_gradient(task: Task, batch: Batch, alphas: Sequence[float]) -> torch.Tensor:
    """Σ over the batch's prompts and the points α of ∂metric/∂m (U, R) at the edge mask
    m = α, all points in one pass."""
    n = int(batch.ids.shape[0])
    nodes = task.runner.nodes
    mask = torch.cat([nodes.mask(n, value=a) for a in alphas]).requires_grad_(True)  # (k·N, U, R)
    ids = batch.ids.repeat(len(alphas), 1)
    corrupt = batch.corrupt.repeat(len(alphas), 1, 1, 1)
    with torch.enable_grad():
        out = task.runner.run(ids, corrupt=corrupt, mask=mask, grad=True)
        (g,) = torch.autograd.grad(task.measure(batch, out.logits, ids.shape[0]).sum(), [mask])
    return g.sum(0)


def path_patching(task: Task, edges: Sequence[tuple[int, int]], progress: Progress | None = None) -> list[float]:
    """Exact effect of each edge: the metric with only that edge corrupted, minus the clean
    metric (averaged over prompts)."""
    ones = task.runner.nodes.mask(1)[0]
    masks = []
    for u, r in edges:
        m = ones.clone()
        m[u, r] = 0.0
        masks.append(m)
    values = task.patched_means(masks)
    if progress is not None:
        progress("path patching", len(edges), len(edges))
    return [v - task.clean_metric for v in values]


# -- the result --------------------------------------------------------------------------------
@dataclass
class Edge:
    """One edge with its EAP score and, for the strongest, its path-patching effect."""

    source: str
    target: str
    score: float
    patched: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target, "score": self.score, "patched": self.patched}


@dataclass
class DependencyGraph:
    """A model's components and the scored edges between them (module docstring).

    Attributes:
        nodes: node names, forward order (``embed`` first, ``logits`` last).
        edges: every edge, strongest |score| first.
        metric / ablation: what was measured and what a cut edge carries.
        clean_metric / corrupted_metric: the metric on the clean and corrupted prompts.
        n_prompts, forward_passes, seconds: the work done.
    """

    nodes: list[str]
    edges: list[Edge]
    metric: str
    ablation: str
    clean_metric: float
    corrupted_metric: float
    n_prompts: int
    forward_passes: int
    seconds: float
    method: str = "eap"

    def top(self, k: int = 10) -> list[Edge]:
        return self.edges[:k]

    @property
    def graph(self) -> nx.DiGraph:
        """The graph as a ``networkx.DiGraph`` (node attribute ``layer``, ``kind``; edge
        attributes ``score`` and, where measured, ``patched``)."""
        import networkx as nx

        g = nx.DiGraph()
        for name in self.nodes:
            layer, kind = node_position(name)
            g.add_node(name, layer=layer, kind=kind)
        for e in self.edges:
            attrs: dict[str, float] = {"score": e.score}
            if e.patched is not None:
                attrs["patched"] = e.patched
            g.add_edge(e.source, e.target, **attrs)
        return g

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "metric": self.metric,
            "ablation": self.ablation,
            "clean_metric": self.clean_metric,
            "corrupted_metric": self.corrupted_metric,
            "n_prompts": self.n_prompts,
            "forward_passes": self.forward_passes,
            "seconds": self.seconds,
            "nodes": self.nodes,
            "edges": [e.to_json() for e in self.edges],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DependencyGraph:
        edges = [Edge(e["source"], e["target"], float(e["score"]), e.get("patched")) for e in data["edges"]]
        keys = ("metric", "ablation", "clean_metric", "corrupted_metric", "n_prompts", "forward_passes", "seconds")
        return cls(list(data["nodes"]), edges, **{k: data[k] for k in keys}, method=data.get("method", "eap"))

    def write_graphml(self, path: str | Path) -> Path:
        """Write the graph as GraphML (readable by networkx, Gephi, yEd); returns the path."""
        import networkx as nx

        path = Path(path)
        nx.write_graphml(self.graph, path)
        return path

    def figure(self, k: int = 30) -> Figure:
        return graph_figure(self.nodes, self.edges[:k], title=f"dependency graph ({self.method}, top {k} edges)")


def node_position(name: str) -> tuple[int, str]:
    """(layer, kind) of a node: embed → (−1, input), logits → (n, output)."""
    if name == INPUT:
        return -1, "input"
    if name == OUTPUT:
        return 10**6, "output"
    layer = int(name.split(".")[1])
    return layer, "mlp" if name.endswith(".mlp") else "head"


def graph_figure(nodes: Sequence[str], edges: Sequence[Edge], title: str) -> Figure:
    """Nodes in columns by layer (heads above the layer's MLP), edges drawn with width and
    colour by score (diverging around zero)."""
    from model_forensics.core.plots import figure

    fig = figure(9, 5)
    draw_graph(fig, fig.add_subplot(), nodes, edges, title)
    return fig


def draw_graph(fig: Figure, ax: Any, nodes: Sequence[str], edges: Sequence[Edge], title: str) -> None:
    """Draw :func:`graph_figure`'s picture on the axes ``ax`` of ``fig``."""
    import numpy as np
    from matplotlib import cm, colormaps, colors

    from model_forensics.core.plots import DIVERGING

    last = max([0, *[node_position(n)[0] + 1 for n in nodes if n not in (INPUT, OUTPUT)]])
    columns: dict[float, list[str]] = {}
    for name in nodes:
        layer, kind = node_position(name)
        x = {"input": -1.0, "output": float(last)}.get(kind, layer + (0.5 if kind == "mlp" else 0.0))
        columns.setdefault(x, []).append(name)
    pos = {n: (x, i - (len(col) - 1) / 2) for x, col in columns.items() for i, n in enumerate(col)}
    scale = max([abs(e.score) for e in edges] + [1e-12])
    norm = colors.TwoSlopeNorm(vmin=-scale, vcenter=0.0, vmax=scale)
    cmap = colormaps[DIVERGING]
    for e in edges:
        (x0, y0), (x1, y1) = pos[e.source], pos[e.target]
        ax.plot([x0, x1], [y0, y1], color=cmap(norm(e.score)), linewidth=0.5 + 4 * abs(e.score) / scale, alpha=0.8)
    xs, ys = np.array([p[0] for p in pos.values()]), np.array([p[1] for p in pos.values()])
    ax.scatter(xs, ys, s=30, color="black", zorder=3)
    used = {e.source for e in edges} | {e.target for e in edges}
    for name, (x, y) in pos.items():
        if name in used:
            label = name.replace("blocks.", "").replace(".attn.head", ".h")
            ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="edge score (Δ metric)")
    ax.set_title(title)
    ax.set_xlabel("layer")
    ax.set_yticks([])


def dependency_graph(
    model: nn.Module | Session,
    tokenizer: Any,
    prompts: Sequence[str] | torch.Tensor,
    *,
    corrupted: Sequence[str] | torch.Tensor | None = None,
    metric: str | MetricFn = "logprob",
    targets: Sequence[str | int] | None = None,
    foils: Sequence[str | int] | None = None,
    mlps: bool = True,
    confirm: int = 10,
    progress: Progress | None = None,
) -> DependencyGraph:
    """Score every edge between a decoder's components by edge attribution patching and
    confirm the ``confirm`` strongest by path patching (module docstring).

    Args:
        model / tokenizer: a GPT-2 or Llama-family causal LM and its tokenizer.
        prompts: texts (or ids (N, T)); the metric is read at each one's last token.
        corrupted: one prompt per prompt, same token length (None: mean ablation).
        metric: ``logprob`` | ``logit`` | ``logit_diff`` | a callable (module docstring).
        targets / foils: one token per prompt (text or id); default: the model's top token
            on the clean (targets) and corrupted (foils) prompt.
        mlps: MLPs as nodes; False folds them into the residual stream (computed on the
            run's own residual, never patched).
        confirm: how many of the strongest edges get an exact path-patching effect.
        progress: called as ``progress(stage, done, total)``.

    Returns:
        a :class:`DependencyGraph`.

    Raises:
        ForensicsError: bad prompts, lengths, targets or metric (see :func:`prepare_task`).
    """
    start = time.perf_counter()
    subject = subject_of(model, tokenizer)
    nodes = Nodes.of(subject.adapter.n_layers, int(subject.adapter.n_heads or 0), mlps)
    task = prepare_task(subject, nodes, prompts, corrupted, metric, targets, foils)
    scores = edge_attribution(task, 0, progress=progress)
    edges = _ranked_edges(nodes, scores)
    top = [(nodes.upstream.index(e.source), nodes.receivers.index(e.target)) for e in edges[:confirm]]
    for e, effect in zip(edges, path_patching(task, top, progress), strict=False):
        e.patched = effect
    return DependencyGraph(
        [*nodes.upstream, OUTPUT],
        edges,
        task.metric_name,
        task.ablation,
        task.clean_metric,
        task.corrupted_metric,
        task.n_prompts,
        task.runner.passes,
        time.perf_counter() - start,
    )


def _ranked_edges(nodes: Nodes, scores: torch.Tensor) -> list[Edge]:
    edges = [Edge(nodes.upstream[u], nodes.receivers[r], float(scores[u, r])) for u, r in nodes.edges]
    return sorted(edges, key=lambda e: -abs(e.score))


def prompt_pairs(
    prompts: str | Path, corrupted: str | Path | None = None
) -> tuple[list[str], list[str] | None, list[str | int] | None]:
    """Prompts (texts), their corrupted twins and targets from prompt files (``.jsonl`` with
    ``{"prompt": …, "target": …}`` or ``.txt``, read as hostile input): what the CLI's
    ``circuits graph`` / ``circuits discover`` pass on. Targets are used when every prompt
    names one.

    Raises:
        ForensicsError: unreadable files, or only some prompts naming a target.
    """
    from model_forensics.circuits.claims import read_prompts

    records = read_prompts(prompts)
    twins = [r.text for r in read_prompts(corrupted)] if corrupted is not None else None
    named = [r.target for r in records if r.target is not None]
    if named and len(named) != len(records):
        raise ForensicsError(
            f"{len(named)} of {len(records)} prompts in '{prompts}' name a target; give every prompt one or none"
        )
    targets: list[str | int] | None = [r.target for r in records if r.target is not None] if named else None
    return [r.text for r in records], twins, targets
