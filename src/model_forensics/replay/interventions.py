"""Interventions as data: what to change at a site, and the hooks that change it.

An :class:`Intervention` names a site (any selector: ``blocks.1.attn.head.3``,
``blocks.2.mlp.post[17]@pos=5``), a ``kind`` and a value. It is plain data: it
serialises to JSON and back exactly, so fix sets can be saved, diffed and replayed.

Kinds (``x`` is the targeted slice of the site's activation, per batch row):
    zero      x ← 0
    mean      x ← mean of the site over a baseline set (over examples and positions; with
              align='last', over the examples' last prompt positions)
    resample  x ← the activation of one baseline example (chosen by ``seed``), by position
    patch     x ← the activation of a baseline run or bundle, by position
    noise     x ← x + value · std(x) · ε,  ε ~ N(0, 1) seeded by ``seed``  (value in std units)
    scale     x ← value · x
    steer     x ← x + v   (``value`` is the vector, its length the last dim of the slice)
    clamp     x ← min(x, value) elementwise; with a direction, only the component along û
              is capped: x ← x − max(0, x·û − value) û (a conditional edit: inputs whose
              component stays under the cap pass unchanged)

Targets narrow the site: ``heads`` (query heads of ``blocks.L.attn.z``; GQA-aware,
since z holds query heads), ``neurons`` (indices of the last dimension), ``positions``
(token positions; negative ones count from the end of the prompt), ``direction`` (a
vector u over the last dimension of the slice: only the component along û changes,
x ← x + ((x_new − x)·û) û, where x_new is what the kind alone would write; e.g. ``mean``
with a direction sets that component to its baseline mean and leaves the rest alone).

Gates: ``gate=Gate(site, direction, above, reads)`` makes an intervention conditional. At
``site`` (a token site upstream of the intervention, e.g. ``blocks.12.resid_post``), the
prompt's activation is projected on the direction, at the last prompt position
(``reads="last"``) or at its largest over the prompt (``reads="max"``); the intervention
applies to that run (every position, every generation step) only when the projection
exceeds ``above``, and otherwise leaves the run bit-identical. A detector decides *when*
to fix, the intervention *what* to change (conditional activation steering).
``reads="each"`` decides per token position instead, in every forward call (the prompt pass
and each generation step): the intervention applies exactly at the positions whose own
projection exceeds ``above`` and leaves every other position bit-identical (the gate site
must then be a token site read in the same call as the intervention's, at or upstream of it).

Composition: the interventions of one run apply in the forward order of their sites; at
the same site, in list order, each one seeing the result of the previous.
"""

from __future__ import annotations

import functools
import math
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import torch

from model_forensics.core.errors import ForensicsError, SiteError
from model_forensics.core.sites import block_index, parse_selector, unknown_site_message
from model_forensics.models.adapters import Adapter, HookPoint
from model_forensics.models.hooks import SiteCall, hooks

KINDS = ("zero", "mean", "resample", "patch", "noise", "scale", "steer", "clamp")
ALIGNS = ("position", "last")
NEEDS_BASELINE = ("mean", "resample", "patch")


def _floats(value: Any, what: str) -> tuple[float, ...]:
    vector = tuple(float(v) for v in value)
    if not vector or not all(math.isfinite(v) for v in vector) or not any(vector):
        raise ForensicsError(f"{what} needs a finite, non-zero direction vector")
    return vector


GATE_READS = ("last", "max")  # prompt-level readings: one decision per run
GATE_EACH = "each"  # one decision per token position of every forward call


@dataclass(frozen=True)
class Gate:
    """Apply an intervention only to runs whose activation at ``site`` projects on
    ``direction`` above ``above``: at the last prompt position (``reads="last"``), or at
    any prompt position (``reads="max"``, the largest projection over the prompt); with
    ``reads="each"``, only at the positions (of every forward call) whose projection exceeds it."""

    site: str
    direction: tuple[float, ...]
    above: float
    reads: str = "last"

    def __post_init__(self) -> None:
        if self.reads not in (*GATE_READS, GATE_EACH):
            raise ForensicsError(f"a gate reads 'last', 'max' or 'each', got {self.reads!r}")
        object.__setattr__(self, "direction", _floats(self.direction, f"the gate at '{self.site}'"))
        if not isinstance(self.above, int | float) or not math.isfinite(float(self.above)):
            raise ForensicsError(f"the gate at '{self.site}' needs a finite threshold 'above', got {self.above!r}")
        object.__setattr__(self, "above", float(self.above))

    def to_json(self) -> dict[str, Any]:
        return {"site": self.site, "direction": list(self.direction), "above": self.above, "reads": self.reads}

    @classmethod
    def from_json(cls, data: Any) -> Gate:
        if isinstance(data, Gate):
            return data
        if not isinstance(data, dict) or not {"site", "direction", "above"} <= set(data) <= {
            "site",
            "direction",
            "above",
            "reads",
        }:
            raise ForensicsError(f"a gate is {{'site', 'direction', 'above'[, 'reads']}}, got {data!r}")
        return cls(str(data["site"]), tuple(data["direction"]), data["above"], str(data.get("reads", "last")))

    @functools.cached_property
    def unit(self) -> torch.Tensor:
        """The direction as a unit float64 tensor on the CPU (made once per gate)."""
        u = torch.tensor(self.direction, dtype=torch.float64)
        return u / u.norm()

    def projections(self, x: torch.Tensor) -> torch.Tensor:
        """The projection on the unit direction at every position of ``x`` (T, d), float64."""
        u = self.unit.to(x.device)
        if x.dim() != 2 or x.shape[-1] != u.numel():
            raise ForensicsError(
                f"the gate at '{self.site}' has a direction of length {u.numel()}, but the site's activation "
                f"has shape {tuple(x.shape)} per run; gate on a residual or MLP site"
            )
        return x.double() @ u

    def score(self, prompt: torch.Tensor) -> float:
        """What the gate compares with ``above``, from the site's activation over the prompt
        (T_prompt, d): the projection at the last position, or the largest over positions
        (``max``; for ``each``, whether it fires anywhere in the prompt)."""
        proj = self.projections(prompt)
        return float(proj[-1] if self.reads == "last" else proj.max())

    def fires(self, x: torch.Tensor) -> torch.Tensor:
        """Per position of ``x`` (T, d): whether the projection exceeds ``above`` (what an
        ``each`` gate applies by)."""
        return self.projections(x) > self.above

    def opens(self, prompt: torch.Tensor) -> bool:
        return self.score(prompt) > self.above


def _ints(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (int(value),)
    return tuple(int(v) for v in value)


@dataclass(frozen=True)
class Intervention:
    """One change to one site. Plain data; see the module docstring for the kinds.

    Args:
        site: a site or selector: ``blocks.0.mlp``, ``blocks.1.attn.head.3``,
            ``blocks.2.mlp.post[17]@pos=5``.
        kind: zero | mean | resample | patch | noise | scale | steer | clamp.
        value: the factor (scale), the std multiple (noise, default 1.0), the vector (steer) or the cap (clamp).
        heads / neurons / positions: narrow the target (merged with the selector's own).
        source: where mean / resample / patch read activations: a bundle path
            (directory or .mfb.zip), ``prompt:TEXT``, or None for the session's baseline set.
        seed: seeds noise and resample.
        align: ``position`` (baseline position p patches position p; lengths must match)
            or ``last`` (right-aligned: the baseline's last token patches the prompt's last).

    Example::

        Intervention("blocks.1.attn.head.3", "zero")
        Intervention("blocks.0.mlp", "scale", value=0.5)
        Intervention("blocks.4.resid_post", "patch", source="clean.mfb.zip", positions=(7,))
    """

    site: str
    kind: str = "zero"
    value: float | tuple[float, ...] | None = None
    heads: tuple[int, ...] | None = None
    neurons: tuple[int, ...] | None = None
    positions: tuple[int, ...] | None = None
    source: str | tuple[str, ...] | None = None
    seed: int = 0
    align: str = "position"
    direction: tuple[float, ...] | None = None
    gate: Gate | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ForensicsError(f"intervention kind '{self.kind}' is unknown; use one of {', '.join(KINDS)}")
        if self.align not in ALIGNS:
            raise ForensicsError(f"align '{self.align}' is unknown; use 'position' or 'last'")
        for name in ("heads", "neurons", "positions"):
            object.__setattr__(self, name, _ints(getattr(self, name)))
        if isinstance(self.source, list | tuple):
            object.__setattr__(self, "source", tuple(str(s) for s in self.source))
        if self.direction is not None:
            object.__setattr__(self, "direction", _floats(self.direction, f"{self.kind} on '{self.site}'"))
        if self.gate is not None:
            object.__setattr__(self, "gate", Gate.from_json(self.gate))
        value = self.value
        if self.kind == "steer":
            if value is None or isinstance(value, int | float):
                raise ForensicsError(f"steer on '{self.site}' needs value=[v0, v1, …], the vector to add")
            object.__setattr__(self, "value", tuple(float(v) for v in value))
        elif value is not None:
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ForensicsError(f"{self.kind} on '{self.site}' takes a number as value, got {value!r}")
            if not math.isfinite(float(value)):
                raise ForensicsError(f"{self.kind} on '{self.site}' has a non-finite value {value!r}")
            object.__setattr__(self, "value", float(value))
        if self.kind == "scale" and self.value is None:
            raise ForensicsError(
                f"scale on '{self.site}' needs value=FACTOR, e.g. Intervention(site, 'scale', value=0.5)"
            )
        if self.kind == "clamp" and self.value is None:
            raise ForensicsError(
                f"clamp on '{self.site}' needs value=CAP, e.g. Intervention(site, 'clamp', value=2.0, direction=u)"
            )

    # -- data ------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict; :meth:`from_json` turns it back into an equal Intervention."""
        value = list(self.value) if isinstance(self.value, tuple) else self.value
        source = list(self.source) if isinstance(self.source, tuple) else self.source
        return {
            "site": self.site,
            "kind": self.kind,
            "value": value,
            "heads": None if self.heads is None else list(self.heads),
            "neurons": None if self.neurons is None else list(self.neurons),
            "positions": None if self.positions is None else list(self.positions),
            "source": source,
            "seed": self.seed,
            "align": self.align,
            "direction": None if self.direction is None else list(self.direction),
            "gate": None if self.gate is None else self.gate.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Intervention:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ForensicsError(f"intervention JSON has unknown keys {unknown}; known keys: {sorted(known)}")
        if "site" not in data:
            raise ForensicsError(f"intervention JSON needs a 'site': {data!r}")
        return cls(**{k: v for k, v in data.items() if v is not None or k == "value"})

    @classmethod
    def parse(cls, spec: str) -> Intervention:
        """Parse a CLI spec ``SELECTOR:KIND[=VALUE][:key=value…]``.

        Examples: ``blocks.1.attn.head.3:zero``, ``blocks.0.mlp:scale=0.5``,
        ``blocks.2.mlp.post[17]@pos=5:zero``, ``blocks.0.mlp:noise=0.5:seed=3``,
        ``blocks.3.attn:patch:source=clean.mfb.zip:align=last``, ``embed:steer=0.1,0,-0.2``,
        ``blocks.20.attn.head.1:mean:gate=blocks.12.resid_post>9.6:gate_direction=0.1,…``.

        Raises:
            ForensicsError: the spec is malformed.
        """
        site, sep, rest = spec.partition(":")
        if not sep or not site.strip() or not rest:
            raise ForensicsError(
                f"intervention '{spec}' needs the form SITE:KIND[=VALUE], e.g. blocks.1.attn.head.3:zero or blocks.0.mlp:scale=0.5"
            )
        # Options are split at ":key=" only, so a source may itself hold colons (prompt:TEXT).
        parts = re.split(r":(?=(?:seed|source|align|heads|neurons|positions|direction|gate|gate_direction)=)", rest)
        if ":" in parts[0]:
            raise ForensicsError(
                f"intervention '{spec}': cannot read '{parts[0]}'; after KIND[=VALUE] come options "
                ":seed=, :source=, :align=, :heads=, :neurons=, :positions=, :direction=, :gate=SITE>ABOVE, "
                ":gate_direction="
            )
        kind, _, raw = parts[0].partition("=")
        fields: dict[str, Any] = {"site": site.strip(), "kind": kind.strip()}
        try:
            if raw:
                fields["value"] = tuple(float(v) for v in raw.split(",")) if kind == "steer" else float(raw)
            for option in parts[1:]:
                key, _, val = option.partition("=")
                if key == "seed":
                    fields["seed"] = int(val)
                elif key in ("source", "align"):
                    fields[key] = val
                elif key in ("direction", "gate_direction"):
                    fields[key] = tuple(float(v) for v in val.split(","))
                elif key == "gate":
                    gate_site, sep, above = val.partition(">")
                    if not sep:
                        raise ForensicsError(f"intervention '{spec}': write the gate as gate=SITE>ABOVE[@max|@each]")
                    above, _, reads = above.partition("@")
                    fields["gate"] = (gate_site.strip(), float(above), reads or "last")
                else:  # heads, neurons, positions
                    fields[key] = tuple(int(v) for v in val.split(","))
        except ValueError:
            raise ForensicsError(f"intervention '{spec}' has a malformed number") from None
        if ("gate" in fields) != ("gate_direction" in fields):
            raise ForensicsError(f"intervention '{spec}': a gate needs both :gate=SITE>ABOVE and :gate_direction=")
        if "gate" in fields:
            gate_site, above, reads = fields.pop("gate")
            fields["gate"] = Gate(gate_site, fields.pop("gate_direction"), above, reads)
        return cls(**fields)

    def __str__(self) -> str:
        text = f"{self.site}:{self.kind}"
        if isinstance(self.value, tuple):
            text += "=" + ",".join(f"{v:g}" for v in self.value)
        elif self.value is not None:
            text += f"={self.value:g}"
        for name in ("heads", "neurons", "positions"):
            items = getattr(self, name)
            if items is not None:
                text += f":{name}=" + ",".join(str(i) for i in items)
        if self.source is not None:
            text += ":source=" + (",".join(self.source) if isinstance(self.source, tuple) else self.source)
        if self.kind in ("noise", "resample") and self.seed:
            text += f":seed={self.seed}"
        if self.align != "position":
            text += f":align={self.align}"
        if self.direction is not None:
            text += ":direction=" + ",".join(repr(v) for v in self.direction)
        if self.gate is not None:
            reads = "" if self.gate.reads == "last" else f"@{self.gate.reads}"
            text += f":gate={self.gate.site}>{self.gate.above!r}{reads}:gate_direction=" + ",".join(
                repr(v) for v in self.gate.direction
            )
        return text


@dataclass(frozen=True)
class Target:
    """An intervention resolved against a model: the hook point and index sets."""

    intervention: Intervention
    site: str  # canonical site hooked (``blocks.1.attn.z`` for a head)
    point: HookPoint
    heads: tuple[int, ...] | None
    neurons: tuple[int, ...] | None
    positions: tuple[int, ...] | None

    @property
    def kind(self) -> str:
        return self.intervention.kind


def _merge(name: str, site: str, a: tuple[int, ...] | None, b: tuple[int, ...] | None) -> tuple[int, ...] | None:
    if a is not None and b is not None and tuple(a) != tuple(b):
        raise SiteError(
            f"intervention on '{site}' gives {name} twice ({a} in the selector, {b} as a field); give them once"
        )
    return a if a is not None else b


def head_names(adapter: Adapter) -> list[str]:
    """Every ``blocks.L.attn.head.H`` name of a model (for messages and sweeps)."""
    if not adapter.n_heads:
        return []
    return [
        f"blocks.{layer}.attn.head.{h}"
        for layer in range(adapter.n_layers)
        if f"blocks.{layer}.attn.z" in adapter.points
        for h in range(adapter.n_heads)
    ]


def resolve(intervention: Intervention, adapter: Adapter) -> Target:
    """Resolve an intervention's site against a model.

    Raises:
        SiteError: the site or head does not exist (the message lists the nearest valid
            names), the site is read-only (attention patterns), or targets conflict.
    """
    sel = parse_selector(intervention.site)
    pattern = sel.pattern
    if any(ch in pattern for ch in "*?["):
        raise SiteError(
            f"intervention site '{intervention.site}' is a pattern; name one site (expand patterns into several interventions)"
        )
    head = sel.head
    site = re.sub(r"\.head\.\d+$", ".z", pattern) if head is not None else pattern
    if site not in adapter.points:
        raise SiteError(unknown_site_message(pattern, adapter.sites() + head_names(adapter)))
    point = adapter.points[site]
    if point.pattern:
        raise SiteError(
            f"site '{site}' (attention probabilities) is read-only; intervene on its heads instead, "
            f"e.g. '{site.removesuffix('.pattern')}.head.0'"
        )
    heads = _merge("heads", intervention.site, (head,) if head is not None else None, intervention.heads)
    if heads is not None:
        if point.heads is None:
            raise SiteError(
                f"site '{site}' has no heads; heads apply to blocks.L.attn.q|k|v|z (or name blocks.L.attn.head.H)"
            )
        bad = [h for h in heads if not 0 <= h < point.heads]
        if bad:
            names = [n for n in head_names(adapter) if n.startswith(site.removesuffix(".z") + ".head.")] or head_names(
                adapter
            )
            what = "query heads" if site.endswith(".z") or site.endswith(".q") else "key/value heads"
            raise SiteError(
                f"head {bad[0]} does not exist: '{site.removesuffix('.z')}' has {point.heads} {what} "
                f"(0–{point.heads - 1}); valid names: {', '.join(names[:4])} …"
            )
    neurons = _merge("neurons", intervention.site, sel.neurons, intervention.neurons)
    positions = _merge("positions", intervention.site, sel.positions, intervention.positions)
    return Target(intervention, site, point, heads, neurons, positions)


def first_block(targets: Sequence[Target], n_layers: int) -> int | None:
    """The earliest block a set of targets changes: runs starting there can reuse the clean
    computation of every earlier block. None when a target sits before block 0 (``embed``)
    or outside the block structure (``logits``, raw module paths). A gate's site counts:
    it must be read on the run."""
    layers = []
    sites = [t.site for t in targets] + [t.intervention.gate.site for t in targets if t.intervention.gate]
    for site in sites:
        if site == "final":
            layers.append(n_layers)
        elif block_index(site) is None:
            return None
        else:
            layers.append(int(block_index(site)))  # type: ignore[arg-type]
    return min(layers) if layers else n_layers


@dataclass
class Prepared:
    """A target plus the tensor its kind reads (baseline mean or activation), if any.

    ``baseline``: mean → per-token shape (e.g. (d_model,) or (n_heads, d_head));
    patch / resample → (T_baseline, *per-token shape) of one baseline example, whose prompt
    was ``baseline_prompt_len`` tokens (``align="last"`` lines up the prompts' last tokens).
    ``gate_open``: whether the intervention's gate opened in the latest run that applied it
    (set by :func:`intervening`; None: no gate, or the run never reached the gate's site).
    """

    target: Target
    baseline: torch.Tensor | None = None
    baseline_prompt_len: int = 0
    gate_open: bool | None = None


def gates_opened(prepared: Sequence[Prepared]) -> dict[str, bool]:
    """Per gated intervention of ``prepared`` (keyed by its site), whether its gate opened in
    the latest run that applied it (interventions whose run never reached the gate's site
    are left out)."""
    return {p.target.intervention.site: p.gate_open for p in prepared if p.gate_open is not None}


@dataclass
class Clock:
    """Where the current forward call sits in the sequence (generation steps advance it).

    ``pads``: per batch row, the pad tokens on its left (prompts of different lengths in one
    left-padded batch; empty: no padding). ``prompt_len`` is then the padded width, and
    :meth:`row` gives each row the clock its own prompt would have. ``held``: while a shared
    prompt pass runs a block on some batch rows only, where each of them sits in that
    block's tensors (:meth:`at`; None: every row, in order).
    """

    offset: int = 0
    prompt_len: int = 0
    pads: tuple[int, ...] = ()
    held: dict[int, int] | None = None

    def at(self, row: int, rows: int) -> int | None:
        """Where batch row ``row`` sits in a site tensor of ``rows`` rows (None: not there)."""
        if self.held is not None and rows == len(self.held):
            return self.held.get(row)
        return row if row < rows else None

    def row(self, row: int) -> tuple[int, Clock]:
        """Where batch row ``row``'s own tokens start on this call's token axis, and the
        clock of that row's unpadded run (``self`` when the row has no padding)."""
        pad = self.pads[row] if row < len(self.pads) else 0
        if pad == 0:
            return 0, self
        return max(0, pad - self.offset), Clock(max(0, self.offset - pad), self.prompt_len - pad)


def _positions(target: Target, steps: int, clock: Clock, device: torch.device) -> torch.Tensor:
    """Local indices (into this call's token axis) of the targeted absolute positions."""
    if target.positions is None:
        return torch.arange(steps, device=device)
    absolute = [p + clock.prompt_len if p < 0 else p for p in target.positions]
    local = [p - clock.offset for p in absolute if clock.offset <= p < clock.offset + steps]
    return torch.tensor(local, dtype=torch.long, device=device)


def _inner_index(target: Target, x: torch.Tensor, heads_layout: bool) -> tuple[torch.Tensor, ...]:
    """Index tensors for the dims after the token axis, shaped to broadcast as a grid."""
    site = target.site
    last = x.shape[-1]
    neurons = torch.arange(last) if target.neurons is None else torch.tensor(target.neurons)
    if target.neurons is not None and (neurons.min() < 0 or neurons.max() >= last):
        raise SiteError(
            f"neuron index {target.neurons} is out of range for '{site}', which has {last} units (0–{last - 1})"
        )
    if heads_layout:
        n_heads = x.shape[-2]
        heads = torch.arange(n_heads) if target.heads is None else torch.tensor(target.heads)
        return heads[:, None], neurons[None, :]
    return (neurons,)


def apply_row(x: torch.Tensor, prepared: Prepared, clock: Clock, only: torch.Tensor | None = None) -> None:
    """Apply one intervention to one batch row ``x`` in place.

    ``x``: (T_step, *per-token shape) for token sites, e.g. (T, d_model) or (T, H, d_head);
    (C,) for a classifier's logits (no token axis). ``only``: (T_step,) bool, the positions
    an ``each`` gate fired at; the others are left as they are.
    """
    target, iv = prepared.target, prepared.target.intervention
    heads_layout = target.point.heads is not None
    has_tokens = x.dim() >= (3 if heads_layout else 2)
    inner = _inner_index(target, x, heads_layout)
    if has_tokens:
        pos = _positions(target, x.shape[0], clock, x.device)
        if only is not None:
            pos = pos[only.to(pos.device)[pos]]
        if pos.numel() == 0:
            return
        if iv.kind in ("patch", "resample"):
            assert prepared.baseline is not None
            pos, source_pos = _align(prepared, pos, clock)
            if pos.numel() == 0:
                return
        grid = (pos.view(-1, *([1] * len(inner))), *(i.unsqueeze(0) for i in inner))
    else:
        if target.positions is not None or iv.kind in NEEDS_BASELINE:
            raise SiteError(
                f"site '{target.site}' has no token axis; {iv.kind} with positions or baselines needs a token site"
            )
        grid = inner
    current = x[grid]
    if iv.kind == "zero":
        new = torch.zeros_like(current)
    elif iv.kind == "scale":
        new = current * float(iv.value)  # type: ignore[arg-type]
    elif iv.kind == "steer":
        vec = torch.tensor(iv.value, dtype=x.dtype, device=x.device)
        if vec.numel() != current.shape[-1]:
            raise ForensicsError(
                f"steer on '{iv.site}' has a vector of length {vec.numel()}, but the target's last dimension is {current.shape[-1]}"
            )
        new = current + vec
    elif iv.kind == "clamp" and iv.direction is not None:
        x[grid] = _capped(iv, current)
        return
    elif iv.kind == "clamp":
        new = current.clamp(max=float(iv.value))  # type: ignore[arg-type]
    elif iv.kind == "noise":
        scale = 1.0 if iv.value is None else float(iv.value)  # type: ignore[arg-type]
        std = current.float().std(unbiased=False) if current.numel() > 1 else current.float().abs().mean()
        gen = torch.Generator().manual_seed(int(iv.seed) * 1_000_003 + clock.offset)
        eps = torch.randn(current.shape, generator=gen, dtype=torch.float32)
        new = (current.float() + scale * std * eps.to(current.device)).to(current.dtype)
    elif iv.kind == "mean":
        assert prepared.baseline is not None
        new = prepared.baseline.to(x.dtype)[inner].unsqueeze(0) if has_tokens else prepared.baseline.to(x.dtype)[inner]
        new = new.expand_as(current)
    else:  # patch / resample
        assert prepared.baseline is not None
        base = prepared.baseline.to(x.dtype)
        new = base[(source_pos.view(-1, *([1] * len(inner))), *(i.unsqueeze(0) for i in inner))]
    if iv.direction is not None:
        new = _along(iv, current, new)
    x[grid] = new


def _unit(iv: Intervention, current: torch.Tensor) -> torch.Tensor:
    """û in float64, checked against the target's last dimension."""
    u = torch.tensor(iv.direction, dtype=torch.float64, device=current.device)
    if u.numel() != current.shape[-1]:
        raise ForensicsError(
            f"{iv.kind} on '{iv.site}' has a direction of length {u.numel()}, but the target's last dimension "
            f"is {current.shape[-1]}"
        )
    return u / u.norm()


def _along(iv: Intervention, current: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Keep only the change along ``iv.direction``: current + ((new − current)·û) û."""
    u = _unit(iv, current)
    delta = (new.double() - current.double()) @ u
    return (current.double() + delta.unsqueeze(-1) * u).to(current.dtype)


def _capped(iv: Intervention, current: torch.Tensor) -> torch.Tensor:
    """Cap the component along ``iv.direction`` at ``iv.value``; slices under it are returned as they are."""
    u = _unit(iv, current)
    excess = (current.double() @ u - float(iv.value)).clamp(min=0.0)  # type: ignore[arg-type]
    if not bool(excess.any()):
        return current
    return (current.double() - excess.unsqueeze(-1) * u).to(current.dtype)


def _align(prepared: Prepared, pos: torch.Tensor, clock: Clock) -> tuple[torch.Tensor, torch.Tensor]:
    """Map local positions onto baseline positions; drop those the baseline does not cover."""
    assert prepared.baseline is not None
    t_base = prepared.baseline.shape[0]
    absolute = pos + clock.offset
    if prepared.target.intervention.align == "position":
        source = absolute
    else:
        source = absolute - clock.prompt_len + prepared.baseline_prompt_len
    keep = (source >= 0) & (source < t_base)
    if prepared.target.positions is not None and not bool(keep.all()):
        missing = absolute[~keep].tolist()
        raise ForensicsError(
            f"{prepared.target.intervention.kind} on '{prepared.target.intervention.site}': the baseline has {t_base} "
            f"positions and cannot supply position(s) {missing}"
        )
    return pos[keep], source[keep]


Rows = Sequence[Sequence[Prepared]]


@contextmanager
def intervening(adapter: Adapter, rows: Rows, clock: Clock) -> Iterator[None]:
    """Apply ``rows[i]`` to batch row ``i`` of every forward call inside the block.

    Rows beyond ``len(rows)`` (and rows with no interventions) run clean. One site function
    per site first decides the gates read there, then edits the rows: the site's tensor is
    cloned once per call, never modified in place. Every hook is removed on exit, even on
    errors.
    """
    by_site: dict[str, list[tuple[int, Prepared]]] = defaultdict(list)
    gates: dict[str, set[tuple[int, Gate]]] = defaultdict(set)  # gate site → (row, gate)
    gated: dict[tuple[int, Gate], list[Prepared]] = defaultdict(list)  # who reports each decision
    for row, prepared in enumerate(rows):
        for p in prepared:
            by_site[p.target.site].append((row, p))
            p.gate_open = None
            if p.target.intervention.gate is not None:
                gates[p.target.intervention.gate.site].add((row, p.target.intervention.gate))
                gated[(row, p.target.intervention.gate)].append(p)
    for site in gates:
        if site not in adapter.points:
            raise SiteError(f"gate site {unknown_site_message(site, adapter.sites())[len('site ') :]}")
    opened: dict[tuple[int, Gate], bool] = {}  # decided once per run, on the pass that holds the prompt
    fired: dict[tuple[int, Gate], tuple[int, torch.Tensor]] = {}  # each gates: (offset, positions) of this call

    def decide(site: str, tensor: torch.Tensor) -> None:
        if tensor.dim() < 3:
            return
        for row, gate in gates[site]:
            index = clock.at(row, tensor.shape[0])
            if index is None:
                continue
            start, own = clock.row(row)
            x = tensor[index, start:]  # the row's own positions (no left padding)
            if gate.reads == GATE_EACH:
                mask = gate.fires(x)
                fired[(row, gate)] = (own.offset, mask)
                anywhere = bool(mask.any()) or (own.offset != 0 and bool(opened.get((row, gate))))
                opened[(row, gate)] = anywhere  # whether it fired anywhere in this run so far
            elif own.offset == 0 and x.shape[0] >= own.prompt_len:
                # The prompt pass: this call starts at position 0 and holds the whole prompt.
                opened[(row, gate)] = gate.opens(x[: own.prompt_len])
            else:
                continue
            for p in gated[(row, gate)]:
                p.gate_open = opened[(row, gate)]

    def is_open(row: int, p: Prepared) -> bool:
        gate = p.target.intervention.gate
        if gate is None:
            return True
        if (row, gate) not in opened:
            raise SiteError(
                f"the gate of '{p.target.intervention.site}' reads '{gate.site}', which the model had not reached "
                "when the intervention applied; gate on a site upstream of the intervention"
            )
        return opened[(row, gate)]

    def positions(row: int, p: Prepared, steps: int, own: Clock) -> torch.Tensor | None:
        """An each gate's fired positions in this call (None: no each gate)."""
        gate = p.target.intervention.gate
        if gate is None or gate.reads != GATE_EACH:
            return None
        if steps < 0:
            raise SiteError(f"site '{p.target.site}' has no token axis; an 'each' gate needs a token site")
        offset, mask = fired.get((row, gate), (-1, None))
        if mask is None or offset != own.offset or mask.numel() != steps:
            raise SiteError(
                f"the 'each' gate of '{p.target.intervention.site}' reads '{gate.site}', which this forward call "
                "had not reached when the intervention applied; gate on a token site at or upstream of it"
            )
        return mask

    def edit(tensor: torch.Tensor, call: SiteCall) -> torch.Tensor | None:
        # tensor: (B, T_step, *per-token shape), or (B, C) for a classifier's logits
        if call.site in gates:
            decide(call.site, tensor)
        if call.site not in by_site:
            return None
        new = tensor.clone()
        tokens = new.dim() >= 3
        for row, p in by_site[call.site]:
            index = clock.at(row, new.shape[0])
            if index is None:
                continue
            start, own = clock.row(row) if tokens else (0, clock)
            x = new[index, start:] if start else new[index]  # a view: the row's own positions
            only = positions(row, p, x.shape[0] if tokens else -1, own)
            if only is not None:
                if bool(only.any()):
                    apply_row(x, p, own, only)
            elif is_open(row, p):
                apply_row(x, p, own)
        return new

    with hooks(adapter, dict.fromkeys([*by_site, *gates], edit)):
        yield
