"""Edges between a transformer's components, and forward passes that patch them one by one.

The residual stream is a sum, so every component's input is a sum of what the components
before it wrote::

    resid_pre[L] = embed + Σ_{l<L} (Σ_h a_{l,h} + mlp_l) + biases      a_{l,h} = z_{l,h} · W_O[h]

A *node* is the input (``embed``), one attention head (``blocks.L.attn.head.H``), one MLP
(``blocks.L.mlp``) or the output (``logits``). An *edge* u → v is u's write read by v.
Upstream nodes (``embed``, heads, MLPs) are listed in forward order; receivers are heads,
MLPs and ``logits``; u → v exists when u runs before v (a head of layer L reads what
layers < L wrote, the MLP of layer L also reads layer L's heads, logits read everything).

A patched run gives every receiver v its own input (exact, for each edge separately)::

    in_v = resid(run) − Σ_u (1 − m_uv) · (a_u(run) − a_u(corrupt))

so a kept edge (m_uv = 1) carries u's activation of this run and a cut edge (m_uv = 0)
carries u's activation on the corrupted input. Receivers get their input where they read
it, through the hooks API: an attention head's q, k and v are recomputed from its own
``in_v`` (its layer norm and projection, only that head's slice kept) and written at the
``blocks.L.attn.q|k|v`` sites; an MLP's input replaces its layer norm's input (that norm
feeds only the MLP); the logits' input replaces the final norm's input. With every edge
kept the run equals the plain forward pass; with every edge cut it equals the corrupted
run. Gradients of the metric with respect to each ``in_v`` are what edge attribution
patching multiplies by (a_u(corrupt) − a_u(clean)).

Grouped-query attention (Llama family): a key/value head is shared by the query heads of
its group, so its k and v are computed from one input whose kept edges are the union of the
group's; its input gradient is shared equally among the group's query heads. With as many
key/value heads as query heads (GPT-2) everything is exact per head.

Tensor layouts: N = rows (prompts × variants), T = tokens, d = d_model, U / R = upstream
nodes / receivers, H = query heads, G = key/value heads, dh = d_head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from model_forensics.circuits.subject import Subject
from model_forensics.core.errors import ForensicsError
from model_forensics.models.hooks import SiteCall, SiteFn, hooks, logits_of
from model_forensics.models.inputs import last_logits_only

INPUT, OUTPUT = "embed", "logits"


@dataclass(frozen=True)
class Nodes:
    """The nodes of a model's computational graph and the edges between them.

    Attributes:
        upstream: names of the nodes that write to the residual stream, forward order.
        receivers: names of the nodes that read it, forward order (``logits`` last).
        reach: for receiver r, how many leading upstream nodes it reads (a prefix).
        edges: every edge as (upstream index, receiver index), receiver-major.
    """

    n_layers: int
    n_heads: int
    mlps: bool
    upstream: list[str]
    receivers: list[str]
    reach: list[int]
    edges: list[tuple[int, int]] = field(repr=False)

    @classmethod
    def of(cls, n_layers: int, n_heads: int, mlps: bool = True) -> Nodes:
        upstream, receivers, reach = [INPUT], [], []
        for layer in range(n_layers):
            heads = [f"blocks.{layer}.attn.head.{h}" for h in range(n_heads)]
            for head in heads:
                receivers.append(head)
                reach.append(len(upstream))
            upstream += heads
            if mlps:
                receivers.append(f"blocks.{layer}.mlp")
                reach.append(len(upstream))
                upstream.append(f"blocks.{layer}.mlp")
        receivers.append(OUTPUT)
        reach.append(len(upstream))
        edges = [(u, r) for r in range(len(receivers)) for u in range(reach[r])]
        return cls(n_layers, n_heads, mlps, upstream, receivers, reach, edges)

    def edge_name(self, edge: tuple[int, int]) -> str:
        return f"{self.upstream[edge[0]]}->{self.receivers[edge[1]]}"

    def head_receivers(self, layer: int) -> list[int]:
        return [self.receivers.index(f"blocks.{layer}.attn.head.{h}") for h in range(self.n_heads)]

    def mask(
        self, rows: int, kept: Sequence[Sequence[tuple[int, int]]] | None = None, value: float = 1.0
    ) -> torch.Tensor:
        """(rows, U, R) edge mask filled with ``value``; row i sets ``kept[i]`` to 1 − value."""
        m = torch.full((rows, len(self.upstream), len(self.receivers)), value)
        for i, edges in enumerate(kept or []):
            if edges:
                u, r = torch.tensor(list(edges), dtype=torch.long).T
                m[i, u, r] = 1.0 - value
        return m


@dataclass
class _Projection:
    """One layer's attention input projections, per head: ``norm`` then head h's query
    ``x @ q[h] (+ q_bias[h])`` (q: (H, d, dh)), key / value heads alike ((G, d, dh))."""

    norm: nn.Module
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None

    def __call__(self, x_q: torch.Tensor, x_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (N, T, H, dh) from x_q (N, H, T, d), copy h read by head h only; k, v
        (N, T, G, dh) from x_kv (N, G, T, d) alike (x_kv may be x_q)."""
        h_q = self.norm.forward(x_q)  # .forward: the norm's own site hooks must not see these copies
        h_kv = h_q if x_kv is x_q else self.norm.forward(x_kv)
        out = []
        for h, weight, bias in ((h_q, self.q, self.q_bias), (h_kv, self.k, self.k_bias), (h_kv, self.v, self.v_bias)):
            y = torch.einsum("nhtd,hde->nthe", h, weight.to(h.dtype))
            out.append(y + bias.to(h.dtype) if bias is not None else y)
        return out[0], out[1], out[2]


@dataclass
class _Parts:
    """Where one architecture keeps what the patched run recomputes."""

    project: list[_Projection]  # per layer
    w_o: list[torch.Tensor]  # per layer (H, dh, d): head h writes z_h @ w_o[h]
    ln2: list[str]
    final: str


def _parts(subject: Subject) -> _Parts:
    a, mods = subject.adapter, subject.adapter.modules
    if a.architecture not in ("gpt2", "llama") or a.n_heads is None or a.d_head is None:
        raise ForensicsError(f"edge patching needs a GPT-2 or Llama-family decoder; this is a {a.architecture} model")
    n_heads, dh = a.n_heads, a.d_head
    blocks = [a.points[f"blocks.{layer}.resid_pre"].module for layer in range(a.n_layers)]
    final = a.points["final"].module
    if a.architecture == "gpt2":
        d = int(a.d_model or 0)
        project = []
        for b in blocks:
            attn = mods[f"{b}.attn.c_attn"]  # Conv1D: weight (d, 3d), x @ weight + bias
            w, bias = _weight(attn).detach(), getattr(attn, "bias", None)
            ws = [w[:, i * d : (i + 1) * d].reshape(d, n_heads, dh).permute(1, 0, 2).contiguous() for i in range(3)]
            bs = [None if bias is None else bias.detach()[i * d : (i + 1) * d].view(n_heads, dh) for i in range(3)]
            project.append(_Projection(mods[f"{b}.ln_1"], *ws, *bs))
        w_o = [_weight(mods[f"{b}.attn.c_proj"]).view(n_heads, dh, -1) for b in blocks]  # Conv1D: (d_in, d_out)
        return _Parts(project, w_o, [f"{b}.ln_2" for b in blocks], final)
    groups = int(a.n_kv_heads or n_heads)
    project = []
    for b in blocks:
        ws, bs = [], []
        for name, heads in (("q_proj", n_heads), ("k_proj", groups), ("v_proj", groups)):
            linear = mods[f"{b}.self_attn.{name}"]  # Linear: weight (heads · dh, d)
            ws.append(_weight(linear).detach().view(heads, dh, -1).transpose(1, 2).contiguous())
            bias = getattr(linear, "bias", None)
            bs.append(None if bias is None else bias.detach().view(heads, dh))
        project.append(_Projection(mods[f"{b}.input_layernorm"], *ws, *bs))
    w_o = [_weight(mods[f"{b}.self_attn.o_proj"]).T.reshape(n_heads, dh, -1) for b in blocks]  # Linear: (d_out, d_in)
    return _Parts(project, w_o, [f"{b}.post_attention_layernorm" for b in blocks], final)


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


@dataclass
class RunResult:
    """What one patched pass returns: the last position's scores (N, V), every upstream
    node's activation (N, U, T, d) when kept, and the receiver inputs whose gradients were
    asked for."""

    logits: torch.Tensor
    activations: torch.Tensor | None = None
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)


class EdgeRunner:
    """Forward passes of a GPT-2 / Llama decoder with per-edge patching (module docstring).

    Args:
        subject: the model, its adapter and environment.
        nodes: the node set (MLPs as nodes or folded into the stream).
    """

    def __init__(self, subject: Subject, nodes: Nodes):
        self.subject, self.nodes = subject, nodes
        self.parts = _parts(subject)
        a = subject.adapter
        self.n_heads, self.n_groups = int(a.n_heads or 0), int(a.n_kv_heads or a.n_heads or 0)
        self.group = self.n_heads // self.n_groups
        self.passes = 0
        # only the last position's scores are read: where the model can, it computes no others
        self.last_only = last_logits_only(subject.model)

    # -- one pass ---------------------------------------------------------------------------
    def run(
        self,
        ids: torch.Tensor,
        *,
        corrupt: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        embed: torch.Tensor | None = None,
        keep: bool = False,
        grad: bool = False,
    ) -> RunResult:
        """One forward pass of ``ids`` (N, T).

        Args:
            corrupt: (N, U, T, d) upstream activations on the corrupted input (needed with
                ``mask``); or (N / k, U, T, d) when ``ids`` is k copies of N / k prompts
                (``ids.repeat(k, 1)``): broadcast over the copies, not copied.
            mask: (N, U, R) 1 = edge kept, 0 = edge carries the corrupted activation.
            embed: (N, T, d) replaces the ``embed`` site's output (integrated gradients).
            keep: return every upstream activation of this run.
            grad: build the per-receiver inputs in the autograd graph and return them
                (keys ``L.q``, ``L.kv``, ``L.mlp``, ``logits``: (N, R_L, T, d)).
        """
        if mask is not None and corrupt is None:
            raise ValueError("a mask needs the corrupted activations")
        if corrupt is not None and ids.shape[0] % corrupt.shape[0]:
            raise ValueError(f"{corrupt.shape[0]} corrupted rows do not divide {ids.shape[0]} rows")
        if corrupt is not None and grad and corrupt.shape[0] != ids.shape[0]:
            corrupt = corrupt.repeat(ids.shape[0] // corrupt.shape[0], 1, 1, 1)
        state = _State(ids.shape[0], corrupt, mask, grad or mask is not None, grad, keep)
        sites, before = self._hooks(state, embed)
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with self.subject.environment(), ctx, hooks(self.subject.adapter, sites, before=before):
            self.passes += 1
            self.subject.passes += 1
            out = logits_of(self.subject.model(input_ids=ids, attention_mask=torch.ones_like(ids), **self.last_only))
        if out is None:
            raise ForensicsError(f"{type(self.subject.model).__name__} returned no scores to explain")
        acts = torch.stack(state.acts, dim=1) if keep else None  # (N, U, T, d)
        return RunResult(out[:, -1], acts, state.inputs)

    # -- hooks ------------------------------------------------------------------------------
    def _hooks(self, state: _State, embed: torch.Tensor | None) -> tuple[dict[str, SiteFn], dict[str, Any]]:
        nodes = self.nodes

        def on_embed(t: torch.Tensor, _: SiteCall) -> torch.Tensor | None:
            state.add(t if embed is None else embed)
            return embed

        sites: dict[str, SiteFn] = {INPUT: on_embed}
        before: dict[str, Any] = {}
        for layer in range(nodes.n_layers):
            sites[f"blocks.{layer}.resid_pre"] = state.keeper("resid")
            if state.patching:
                for i, name in enumerate("qkv"):
                    sites[f"blocks.{layer}.attn.{name}"] = self._qkv(state, layer, i)
            sites[f"blocks.{layer}.attn.z"] = self._heads_written(state, layer)
            if nodes.mlps:
                if state.patching:
                    before[self.parts.ln2[layer]] = self._replace_input(
                        state, nodes.receivers.index(f"blocks.{layer}.mlp"), f"{layer}.mlp"
                    )
                sites[f"blocks.{layer}.mlp"] = self._mlp_written(state)
        if state.patching:
            before[self.parts.final] = self._replace_input(state, len(nodes.receivers) - 1, OUTPUT)
        return sites, before

    def _heads_written(self, state: _State, layer: int) -> SiteFn:
        w_o = self.parts.w_o[layer]

        def fn(z: torch.Tensor, _: SiteCall) -> None:
            written = torch.einsum("nthe,hed->nhtd", z, w_o.to(z.dtype))  # (N, H, T, d)
            state.add_heads(written)

        return fn

    def _mlp_written(self, state: _State) -> SiteFn:
        def fn(t: torch.Tensor, _: SiteCall) -> None:
            state.add(t)

        return fn

    def _qkv(self, state: _State, layer: int, which: int) -> SiteFn:
        receivers = self.nodes.head_receivers(layer)

        def fn(t: torch.Tensor, _: SiteCall) -> torch.Tensor:
            if which == 0:
                state.qkv = self._head_inputs(state, layer, receivers)
            return state.qkv[which].to(t.dtype)

        return fn

    def _head_inputs(
        self, state: _State, layer: int, receivers: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (N, T, H, dh) and k, v (N, T, G, dh), each head's from its own input."""
        resid = state.last["resid"]
        in_q = state.receiver_input(resid, self.nodes.reach[receivers[0]], receivers)  # (N, H, T, d)
        if self.group == 1:
            in_kv = in_q
        else:  # a key/value head reads the union of its query heads' kept edges
            groups = [receivers[g * self.group : (g + 1) * self.group] for g in range(self.n_groups)]
            in_kv = state.receiver_input(resid, self.nodes.reach[receivers[0]], groups)  # (N, G, T, d)
        if state.grad:
            state.inputs[f"{layer}.q"] = in_q
            if in_kv is not in_q:
                state.inputs[f"{layer}.kv"] = in_kv
        return self.parts.project[layer](in_q, in_kv)

    def _replace_input(self, state: _State, receiver: int, key: str) -> Any:
        reach = self.nodes.reach[receiver]

        def pre(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            by_keyword = not args
            resid = kwargs["hidden_states"] if by_keyword else args[0]
            new = state.receiver_input(resid, reach, [receiver])  # (N, 1, T, d)
            if state.grad:
                state.inputs[key] = new
            new = new[:, 0]
            if by_keyword:
                return args, {**kwargs, "hidden_states": new}
            return (new, *args[1:]), kwargs

        return pre


class _State:
    """What a patched pass accumulates while it runs."""

    def __init__(
        self,
        rows: int,
        corrupt: torch.Tensor | None,
        mask: torch.Tensor | None,
        patching: bool,
        grad: bool,
        keep: bool = False,
    ):
        self.rows, self.corrupt, self.mask, self.patching, self.grad = rows, corrupt, mask, patching, grad
        self.buffered = corrupt is not None and mask is not None and not grad
        self.keep = keep or not self.buffered
        self.count = 0  # upstream nodes run so far
        self.acts: list[torch.Tensor] = []  # upstream activations of this run, (N, T, d) each
        # without autograd, a(run) − a(corrupt) is written once per node into one buffer
        # (N, U, T, d) as the nodes run; with it, stacked where a receiver reads it
        self.delta: torch.Tensor | None = None
        self.last: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self.qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = (torch.empty(0), torch.empty(0), torch.empty(0))

    def add(self, t: torch.Tensor) -> None:
        """Record the next upstream node's activation (N, T, d)."""
        self._delta(t, 1)
        if self.keep:
            self.acts.append(t)

    def add_heads(self, written: torch.Tensor) -> None:
        """Record a layer's heads' writes (N, H, T, d), head by head."""
        self._delta(written, written.shape[1])
        if self.keep:
            self.acts.extend(written.unbind(1))

    def _delta(self, t: torch.Tensor, n: int) -> None:
        u, self.count = self.count, self.count + n
        if not self.buffered or self.corrupt is None:
            return
        if self.delta is None:
            self.delta = torch.empty((self.rows, self.corrupt.shape[1], *t.shape[-2:]), dtype=t.dtype)
        new = t if n > 1 else t.unsqueeze(1)  # (N, n, T, d)
        corrupt = self.corrupt[:, u : u + n].to(t.dtype)  # (N / k, n, T, d): broadcast over k copies
        k = self.rows // corrupt.shape[0]
        out = self.delta[:, u : u + n].view(k, corrupt.shape[0], *new.shape[1:])
        torch.sub(new.view(out.shape), corrupt, out=out)

    def keeper(self, key: str) -> SiteFn:
        def fn(t: torch.Tensor, _: SiteCall) -> None:
            self.last[key] = t

        return fn

    def receiver_input(self, resid: torch.Tensor, reach: int, receivers: Sequence[int | list[int]]) -> torch.Tensor:
        """(N, R, T, d): each receiver's input from the run's residual ``resid`` (N, T, d),
        with the cut edges' upstream activations swapped for the corrupted ones. A receiver
        given as a list reads the union of those receivers' kept edges."""
        shape = (resid.shape[0], len(receivers), *resid.shape[1:])
        if self.grad:  # every receiver's own copy: its gradient is its own
            base = resid.unsqueeze(1).repeat(1, len(receivers), 1, 1)
            if not base.requires_grad:  # e.g. layer 0 reading a replaced embedding
                base.requires_grad_(True)
        else:
            base = resid.unsqueeze(1).expand(shape)
        if self.mask is None or self.corrupt is None:
            return base
        cols = []
        for r in receivers:
            cols.append(self.mask[:, :reach, r].amax(-1) if isinstance(r, list) else self.mask[:, :reach, r])
        cut = 1.0 - torch.stack(cols, dim=-1).to(resid.dtype)  # (N, U', R)
        if not bool(cut.any()):
            return base
        if self.delta is not None:
            delta = self.delta[:, :reach]
        else:
            delta = torch.stack(self.acts[:reach], dim=1) - self.corrupt[:, :reach].to(resid.dtype)  # (N, U', T, d)
        return base - torch.einsum("nur,nutd->nrtd", cut, delta)


def receiver_gradients(runner: EdgeRunner, result: RunResult, metric: torch.Tensor) -> torch.Tensor:
    """The gradient of ``metric.sum()`` with respect to every receiver's own input,
    (N, R, T, d), from a pass run with ``grad=True``."""
    nodes = runner.nodes
    keys = list(result.inputs)
    grads = torch.autograd.grad(metric.sum(), [result.inputs[k] for k in keys], allow_unused=True)
    by_key = {k: (g if g is not None else torch.zeros_like(result.inputs[k])) for k, g in zip(keys, grads, strict=True)}
    n, _, t, d = next(iter(by_key.values())).shape
    out = torch.zeros(n, len(nodes.receivers), t, d)
    for layer in range(nodes.n_layers):
        heads = nodes.head_receivers(layer)
        g = by_key[f"{layer}.q"].float()
        if f"{layer}.kv" in by_key:  # GQA: the key/value input's gradient shared by its group
            g = g + by_key[f"{layer}.kv"].float().repeat_interleave(runner.group, dim=1) / runner.group
        out[:, heads] = g
        if nodes.mlps:
            out[:, nodes.receivers.index(f"blocks.{layer}.mlp")] = by_key[f"{layer}.mlp"][:, 0].float()
    out[:, -1] = by_key[OUTPUT][:, 0].float()
    return out
