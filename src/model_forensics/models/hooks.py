"""The one hook mechanism: every torch module hook model-forensics adds goes through here.

::

    def keep(tensor, call):             # read: return None
        seen[call.site] = tensor.detach()

    def zero_head(tensor, call):        # replace: return a tensor of the same layout
        out = tensor.clone(); out[..., 3, :] = 0; return out

    with hooks(adapter, sites={"blocks.0.attn.z": zero_head, "blocks.1.mlp": keep},
               before={"": count_pass}, after={"": keep_logits}):
        model(**inputs)

A *site function* gets the site's tensor, cut out of the hooked module's output or input
the way the adapter reads it (:func:`~model_forensics.models.adapters.read`), and a
:class:`SiteCall` saying where it came from. Returning a tensor replaces the site's tensor
(same layout); returning None leaves the run as it was. Input-side sites are read from the
module's first positional argument or, when the caller passed it by keyword, from
``hidden_states=``. Several sites on one module are handled in the order given, each seeing
the payload as the previous one left it. ``before`` / ``after`` take raw module hooks by
module path (``""`` is the model itself): ``before[path](module, args, kwargs)`` may return
``(args, kwargs)`` to replace them, ``after[path](module, args, kwargs, output)`` may return
a new output. Gradients flow through everything, so a site function can keep a tensor for
``torch.autograd.grad``. Every hook is removed on exit, also on errors; nothing else of the
model is touched.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from model_forensics.core.errors import SiteError
from model_forensics.models.adapters import Adapter, HookPoint, read, replace


@dataclass(frozen=True)
class SiteCall:
    """Where a site function's tensor came from.

    Attributes:
        site: the site name.
        point: the adapter's hook point for it.
        module: the hooked module.
        args / kwargs: the module call's arguments.
        recomputed: the tensor is an attention pattern recomputed from q and k because the
            attention implementation did not return it (it cannot be replaced).
    """

    site: str
    point: HookPoint
    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    recomputed: bool = False


SiteFn = Callable[[torch.Tensor, SiteCall], "torch.Tensor | None"]
OnError = Callable[[str, Exception], None]
BeforeFn = Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], Any]
AfterFn = Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], Any]


@contextmanager
def hooks(
    adapter: Adapter,
    sites: Mapping[str, SiteFn] | None = None,
    *,
    before: Mapping[str, BeforeFn] | None = None,
    after: Mapping[str, AfterFn] | None = None,
    recompute_patterns: bool = False,
    on_error: OnError | None = None,
) -> Iterator[None]:
    """Run ``sites`` functions (read or replace) and raw ``before``/``after`` module hooks
    on every forward call of the adapter's model inside the block.

    Args:
        adapter: the model's adapter (it maps sites to modules).
        sites: site name → site function (see the module docstring).
        before / after: module path (``""``: the model) → raw pre / post hook.
        recompute_patterns: when an attention implementation returns no pattern, hand the
            site function one recomputed from q and k (``call.recomputed``).
        on_error: when given, an exception raised by a site function (or by recomputing
            its pattern) is handed to ``on_error(site, exc)`` and the run goes on with that
            site unchanged: what a recorder needs so that it never hurts the host run.
    Raises:
        SiteError: a site or module path the model does not have (nothing is installed).
    """
    outputs: dict[str, list[tuple[str, HookPoint, SiteFn]]] = defaultdict(list)
    inputs: dict[str, list[tuple[str, HookPoint, SiteFn]]] = defaultdict(list)
    for site, fn in (sites or {}).items():
        point = adapter.point(site)
        (outputs if point.io == "output" else inputs)[point.module].append((site, point, fn))
    for path in [*(before or {}), *(after or {})]:
        if path not in adapter.modules:
            raise SiteError(f"the model has no module '{path}'")
    handles: list[RemovableHandle] = []
    try:
        for path, pre in (before or {}).items():
            handles.append(adapter.modules[path].register_forward_pre_hook(pre, with_kwargs=True))
        for name, entries in inputs.items():
            reader = _input_hook(entries, on_error)
            handles.append(adapter.modules[name].register_forward_pre_hook(reader, with_kwargs=True))
        for name, entries in outputs.items():
            writer = _output_hook(adapter, entries, recompute_patterns, on_error)
            handles.append(adapter.modules[name].register_forward_hook(writer, with_kwargs=True))
        for path, post in (after or {}).items():
            handles.append(adapter.modules[path].register_forward_hook(post, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _site(
    fn: SiteFn,
    payload: Any,
    call: SiteCall,
    on_error: OnError | None,
    recompute: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """``fn`` on the site's tensor in ``payload`` (or on a recomputed pattern, whose result
    is ignored: it cannot be written back). With ``on_error``, what reading, recomputing or
    ``fn`` raises goes there instead of into the model."""
    try:
        tensor = read(call.point, payload)
        if tensor is not None:
            return fn(tensor, call)
        if recompute is not None and call.point.pattern:
            fn(recompute(), dataclasses.replace(call, recomputed=True))
        return None
    except Exception as exc:
        if on_error is None:
            raise
        on_error(call.site, exc)
        return None


def _input_hook(entries: list[tuple[str, HookPoint, SiteFn]], on_error: OnError | None) -> BeforeFn:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        by_keyword = not args and "hidden_states" in kwargs
        if not args and not by_keyword:
            return None
        payload: Any = args if args else (kwargs["hidden_states"],)
        changed = False
        for site, point, fn in entries:
            new = _site(fn, payload, SiteCall(site, point, module, args, kwargs), on_error)
            if new is not None:
                payload, changed = replace(point, payload, new), True
        if not changed:
            return None
        if by_keyword:
            return args, {**kwargs, "hidden_states": payload[0]}
        return payload, kwargs

    return hook


def _output_hook(
    adapter: Adapter, entries: list[tuple[str, HookPoint, SiteFn]], recompute: bool, on_error: OnError | None
) -> AfterFn:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        def pattern() -> torch.Tensor:
            return adapter.recompute_pattern(module, args, kwargs)

        payload, changed = output, False
        for site, point, fn in entries:
            call = SiteCall(site, point, module, args, kwargs)
            new = _site(fn, payload, call, on_error, pattern if recompute else None)
            if new is not None:
                payload, changed = replace(point, payload, new), True
        return payload if changed else None

    return hook


def logits_of(output: Any) -> torch.Tensor | None:
    """The scores in a model's output: ``.logits`` of a ModelOutput, the first element of a
    tuple, or the tensor itself; None when there are none."""
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, torch.Tensor):
        return output
    return None
