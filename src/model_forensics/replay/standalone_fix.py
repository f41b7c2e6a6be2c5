"""apply_fix: a model-forensics fix as plain PyTorch hooks; model-forensics is not needed.

``model-forensics fix export`` copies this file verbatim into the export as
``apply_fix.py``, next to ``fix.json`` (the interventions, with every site resolved to a
module path of the model and every baseline mean written out). It imports only torch and
the standard library, so it ships with a model to wherever the model runs::

    import apply_fix
    handle = apply_fix.apply_fix(model)      # reads fix.json beside this file
    model.generate(**inputs)                  # runs with the fix applied
    handle.remove()                           # and without it again

It applies each intervention exactly as model-forensics' replay does (same arithmetic, same
order: forward order of sites, list order at one site): zero, scale, mean, steer and clamp,
narrowed to heads, neurons, token positions or a direction, optionally behind a gate that
reads the prompt (``last``, ``max``) or every position of every forward call (``each``: the
intervention applies at the positions whose projection exceeds the threshold only). A run starts at a forward call with an empty key/value cache (or no
cache argument at all); generation steps after it continue that run, so token positions
and gate decisions span the whole generation. Rows of one batch share one prompt length
(left-pad or run prompts one by one).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "model-forensics-fix/1"
KINDS = ("zero", "scale", "mean", "steer", "clamp")


class FixHandle:
    """The hooks :func:`apply_fix` added; :meth:`remove` takes them all off again."""

    def __init__(self, handles: list[Any], gates: dict[int, list[bool]]):
        self._handles = handles
        self.gates = gates  # gate index → whether it opened, per batch row, in the latest run

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> FixHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def apply_fix(model: nn.Module, spec: str | Path | dict[str, Any] | None = None) -> FixHandle:
    """Hook the fix in ``spec`` (default: fix.json beside this file) into ``model``."""
    if spec is None:
        spec = Path(__file__).with_name("fix.json")
    data = spec if isinstance(spec, dict) else json.loads(Path(spec).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} fix file")
    modules = dict(model.named_modules())
    clock = {"offset": 0, "prompt_len": 0}
    opened: dict[int, list[bool]] = {}
    gates = [g for g in data.get("gates", [])]
    # (module, io, tuple index) → [("gate" | "edit", item)]: gates are read before edits
    edits: dict[tuple[str, str, int], list[tuple[str, dict[str, Any]]]] = {}
    for i, gate in enumerate(gates):
        gate["_index"] = i
        edits.setdefault(_where(gate["point"]), []).append(("gate", gate))
    for item in data["interventions"]:
        if item["kind"] not in KINDS:
            raise ValueError(f"intervention kind {item['kind']!r} is not one apply_fix can apply")
        edits.setdefault(_where(item["point"]), []).append(("edit", item))
    for module, _, _ in edits:
        if module not in modules:
            raise ValueError(f"the model has no module {module!r}; is this the model the fix was exported for?")

    fired: dict[int, tuple[int, torch.Tensor]] = {}  # each gates: (offset, (B, T) fired) of this call
    each_gates = {i for i, gate in enumerate(gates) if gate["reads"] == "each"}
    handles = [model.register_forward_pre_hook(_clock_hook(clock), with_kwargs=True)]
    for (module, io, index), entries in edits.items():
        fn = _site_function(entries, clock, opened, fired, each_gates)
        if io == "input":
            handles.append(modules[module].register_forward_pre_hook(_input_hook(fn), with_kwargs=True))
        else:
            handles.append(modules[module].register_forward_hook(_output_hook(fn, index), with_kwargs=True))
    return FixHandle(handles, opened)


def _where(point: dict[str, Any]) -> tuple[str, str, int]:
    return str(point["module"]), str(point["io"]), int(point.get("index") or 0)


# -- hooks ------------------------------------------------------------------------------------
def _clock_hook(clock: dict[str, int]) -> Callable[..., None]:
    def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor):
            ids = kwargs.get("inputs_embeds")
        steps = int(ids.shape[1]) if isinstance(ids, torch.Tensor) and ids.dim() >= 2 else 0
        cache = kwargs.get("past_key_values")
        cached = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        if cached == 0:
            clock["offset"], clock["prompt_len"] = 0, steps
        else:
            clock["offset"] = cached

    return pre


def _input_hook(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
    def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

    return pre


def _output_hook(fn: Callable[[torch.Tensor], torch.Tensor], index: int) -> Callable[..., Any]:
    def post(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if isinstance(output, tuple | list):
            return type(output)((*output[:index], fn(output[index]), *output[index + 1 :]))
        return fn(output)

    return post


def _site_function(
    entries: list[tuple[str, dict[str, Any]]],
    clock: dict[str, int],
    opened: dict[int, list[bool]],
    fired: dict[int, tuple[int, torch.Tensor]],
    each_gates: set[int],
) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(payload: torch.Tensor) -> torch.Tensor:
        for role, item in entries:
            point = item["point"]
            x = _read(point, payload)
            if role == "gate":
                _decide(item, x, clock, opened, fired)
                continue
            gate = item.get("gate")
            if gate is not None and gate not in opened:
                raise RuntimeError(f"the gate of {item['site']!r} had not been read when it applied")
            each = fired.get(gate) if gate is not None else None
            if gate is not None and gate in each_gates and (each is None or each[0] != clock["offset"]):
                raise RuntimeError(f"the 'each' gate of {item['site']!r} had not been read in this forward call")
            new = x.clone()
            for row in range(new.shape[0]):
                if each is not None:
                    if bool(each[1][row].any()):
                        _apply_row(new[row], item, point, clock, each[1][row])
                elif gate is None or opened[gate][row]:
                    _apply_row(new[row], item, point, clock)
            payload = _replace(point, payload, new)
        return payload

    return fn


def _read(point: dict[str, Any], payload: torch.Tensor) -> torch.Tensor:
    t = payload
    if point.get("span") is not None:
        t = t[..., point["span"][0] : point["span"][1]]
    if point.get("heads") is not None:
        t = t.unflatten(-1, (point["heads"], -1))
    if point.get("channels") and t.dim() == 4:
        t = t.flatten(2).transpose(1, 2).contiguous()
    return t


def _replace(point: dict[str, Any], payload: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    if point.get("heads") is not None:
        new = new.flatten(-2)
    if point.get("span") is not None:
        out = payload.clone()
        out[..., point["span"][0] : point["span"][1]] = new
        return out
    if point.get("channels") and payload.dim() == 4:
        return new.transpose(1, 2).reshape(payload.shape)
    return new


def _decide(
    gate: dict[str, Any],
    x: torch.Tensor,
    clock: dict[str, int],
    opened: dict[int, list[bool]],
    fired: dict[int, tuple[int, torch.Tensor]],
) -> None:
    prompt_len = clock["prompt_len"]
    u = torch.tensor(gate["direction"], dtype=torch.float64, device=x.device)
    if gate["reads"] == "each" and x.dim() >= 3:
        mask = (x.double() @ (u / u.norm())) > float(gate["above"])  # (B, T)
        before = opened.get(gate["_index"]) if clock["offset"] != 0 else None
        opened[gate["_index"]] = [bool(m.any()) or bool(before and before[r]) for r, m in enumerate(mask)]
        fired[gate["_index"]] = (clock["offset"], mask)
        return
    if x.dim() < 3 or clock["offset"] != 0 or x.shape[1] < prompt_len:
        return
    decisions = []
    for row in range(x.shape[0]):
        proj = x[row, :prompt_len].double() @ (u / u.norm())
        score = float(proj[-1] if gate["reads"] == "last" else proj.max())
        decisions.append(score > float(gate["above"]))
    opened[gate["_index"]] = decisions


# -- the arithmetic (as model_forensics.replay.interventions.apply_row) ------------------------
def _apply_row(
    x: torch.Tensor, item: dict[str, Any], point: dict[str, Any], clock: dict[str, int], only: Any = None
) -> None:
    heads_layout = point.get("heads") is not None
    has_tokens = x.dim() >= (3 if heads_layout else 2)
    last = x.shape[-1]
    neurons = torch.arange(last) if item.get("neurons") is None else torch.tensor(item["neurons"])
    if heads_layout:
        heads = torch.arange(x.shape[-2]) if item.get("heads") is None else torch.tensor(item["heads"])
        inner: tuple[torch.Tensor, ...] = (heads[:, None], neurons[None, :])
    else:
        inner = (neurons,)
    if has_tokens:
        steps = x.shape[0]
        if item.get("positions") is None:
            pos = torch.arange(steps, device=x.device)
        else:
            absolute = [p + clock["prompt_len"] if p < 0 else p for p in item["positions"]]
            local = [p - clock["offset"] for p in absolute if clock["offset"] <= p < clock["offset"] + steps]
            pos = torch.tensor(local, dtype=torch.long, device=x.device)
        if only is not None:  # an each gate: the positions it fired at
            pos = pos[only.to(pos.device)[pos]]
        if pos.numel() == 0:
            return
        grid = (pos.view(-1, *([1] * len(inner))), *(i.unsqueeze(0) for i in inner))
    else:
        grid = inner
    current = x[grid]
    kind = item["kind"]
    direction = item.get("direction")
    if kind == "zero":
        new = torch.zeros_like(current)
    elif kind == "scale":
        new = current * float(item["value"])
    elif kind == "steer":
        new = current + torch.tensor(item["value"], dtype=x.dtype, device=x.device)
    elif kind == "clamp" and direction is not None:
        u = _unit(direction, current)
        excess = (current.double() @ u - float(item["value"])).clamp(min=0.0)
        if bool(excess.any()):
            x[grid] = (current.double() - excess.unsqueeze(-1) * u).to(current.dtype)
        return
    elif kind == "clamp":
        new = current.clamp(max=float(item["value"]))
    else:  # mean
        base = torch.tensor(item["baseline"], dtype=x.dtype, device=x.device)[inner]
        new = (base.unsqueeze(0) if has_tokens else base).expand_as(current)
    if direction is not None:
        u = _unit(direction, current)
        delta = (new.double() - current.double()) @ u
        new = (current.double() + delta.unsqueeze(-1) * u).to(current.dtype)
    x[grid] = new


def _unit(direction: list[float], current: torch.Tensor) -> torch.Tensor:
    u = torch.tensor(direction, dtype=torch.float64, device=current.device)
    if u.numel() != current.shape[-1] or not math.isfinite(float(u.norm())):
        raise ValueError(f"a direction of length {u.numel()} does not fit a slice of width {current.shape[-1]}")
    return u / u.norm()
