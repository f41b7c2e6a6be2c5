"""Opening a bundle for replay: :class:`SandboxReplayer` and the model it replays with.

``SandboxReplayer(config).load_bundle(path)`` opens the bundle, resolves its model
(:func:`resolve_model`: the manifest's reference, loaded with the recorded dtype and
attention implementation, or an override) and returns a :class:`Session`, which checks
the weights against the recording's sha256.

:func:`read_fix_file` reads the fix set an ``analyze --out`` JSON holds back as
:class:`Intervention`\\ s (gates and directions included), checked as hostile input, so
``session.run(read_fix_file("analysis.json"))`` replays the incident with the fix applied.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model_forensics.core.bundle import Bundle
from model_forensics.core.config import ForensicsConfig, ReplayConfig, load_config
from model_forensics.core.errors import BundleError, ForensicsError, ModelLoadError
from model_forensics.core.manifest import attn_implementation, bundle_relative, strict_loads
from model_forensics.models import loading as model_loading
from model_forensics.models.loading import DTYPES, LoadedModel, model_ref
from model_forensics.models.onnx_model import is_onnx_reference, load_onnx
from model_forensics.replay.interventions import Intervention
from model_forensics.replay.session import Session


class DtypeChangeWarning(UserWarning):
    """A replay runs in another dtype than the recording: not a bit-identical replay."""


class SandboxReplayer:
    """Opens incident bundles as replay :class:`Session`\\ s.

    Args:
        config: YAML path, :class:`ForensicsConfig`, mapping, or None for defaults
            (its ``replay`` section: seed, deterministic, max_batch_size, memory_budget_mb,
            allow_network, allow_subprocess).
        **overrides: any ``replay`` option, e.g. ``max_batch_size=32``, ``allow_network=True``.
    """

    def __init__(self, config: str | Path | ForensicsConfig | dict[str, Any] | None = None, **overrides: Any):
        base = load_config(config).replay
        unknown = sorted(set(overrides) - set(ReplayConfig.model_fields))
        if unknown:
            raise ForensicsError(f"unknown replay options {unknown}; known: {sorted(ReplayConfig.model_fields)}")
        self.config = ReplayConfig.model_validate(
            {**base.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
        )

    def load_bundle(
        self,
        path: str | Path | Bundle,
        *,
        model: str | nn.Module | LoadedModel | None = None,
        tokenizer: Any = None,
        allow_weight_mismatch: bool = False,
        verify: bool = False,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        device_map: str | None = None,
        offload_dir: str | Path | None = None,
        max_memory: dict[str, str | int] | None = None,
    ) -> Session:
        """Open a bundle and load its model, ready to replay.

        Args:
            path: bundle directory, ``.mfb.zip`` or an opened :class:`Bundle`.
            model: override the manifest's model: a reference (``smollm2``, ``zoo:NAME``,
                a directory, a .gguf), an ``nn.Module`` or a :class:`LoadedModel`.
            tokenizer: tokenizer for an ``nn.Module`` override (for text outputs).
            allow_weight_mismatch: replay even if the weights sha256 differs from the
                recording (warns loudly; results are then not a faithful replay).
            verify: run :meth:`Session.verify` now and warn if it is not bit-identical.
            dtype: replay in this dtype (``float16``, ``bfloat16``, …; None: as recorded).
                The weights are checked in the recorded dtype first, then cast; a dtype
                other than the recorded one warns that bit-identity is not expected.
            device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA if available; None:
                where the model was loaded).
            device_map / offload_dir / max_memory: load the manifest's model directory (or
                a reference ``model``) placed by accelerate, as
                :func:`~model_forensics.models.loading.load_offloaded` does: a model larger
                than memory replays with its layers on disk. The weights digest reads
                offloaded layers from disk, so the check against the recording still holds.
        Raises:
            BundleError: unreadable bundle, newer format, failed checksums, or weights that
                differ from the recording (without ``allow_weight_mismatch``).
            ModelLoadError: the model cannot be found (pass ``model=``), or the dtype or
                device is unknown or unavailable.
        Warns:
            WeightMismatchWarning: the weights differ and ``allow_weight_mismatch`` is set.
            DtypeChangeWarning: ``dtype`` differs from the recorded dtype.
        """
        placement = _placement(device_map, offload_dir, max_memory, device, dtype, model)
        target = None if device is None else model_loading.resolve_device(device)  # before any work
        wanted = None if dtype is None else model_loading.parse_dtype(dtype)
        bundle = path if isinstance(path, Bundle) else Bundle.open(path)
        loaded = resolve_model(bundle, model, tokenizer, **placement)
        session = Session(bundle, loaded, self.config, allow_weight_mismatch=allow_weight_mismatch)
        recorded = recorded_dtype(bundle)
        if wanted is not None and wanted != recorded:
            warnings.warn(dtype_note(wanted, recorded), DtypeChangeWarning, stacklevel=2)
        if target is not None or wanted is not None:
            session.model.to(device=target, dtype=wanted)
        if verify:
            report = session.verify()
            if not report.bit_identical:
                warnings.warn(f"replay of '{bundle.name}' is {report.summary()}", stacklevel=2)
        return session


def recorded_dtype(bundle: Bundle) -> torch.dtype:
    """The dtype the bundle's model was recorded in (float32 when the manifest has none)."""
    return DTYPES.get(str(bundle.manifest["model"].get("dtype")), torch.float32)


def dtype_note(replayed: torch.dtype, recorded: torch.dtype) -> str:
    """The one line that says a replay in another dtype is not a bit-identical replay."""
    show = str(replayed).removeprefix("torch."), str(recorded).removeprefix("torch.")
    return f"replaying in {show[0]}, recorded in {show[1]}: bit-identity with the recording is not expected"


def _placement(
    device_map: str | None,
    offload_dir: str | Path | None,
    max_memory: dict[str, str | int] | None,
    device: Any,
    dtype: Any,
    model: Any,
) -> dict[str, Any]:
    """``load_bundle``'s accelerate options, checked against the options they exclude."""
    if device_map is None:
        if offload_dir is not None or max_memory is not None:
            raise ForensicsError("offload_dir and max_memory place a model with accelerate; pass device_map='auto' too")
        return {}
    clash = [name for name, value in (("device", device), ("dtype", dtype)) if value is not None]
    if not isinstance(model, str | None):
        clash.append("an already loaded model")
    if clash:
        raise ForensicsError(
            f"device_map={device_map!r} places the weights where accelerate puts them, in the recorded dtype; "
            f"it cannot be combined with {' or '.join(clash)}"
        )
    return {"device_map": device_map, "offload_dir": offload_dir, "max_memory": max_memory}


def resolve_model(
    bundle: Bundle, override: str | nn.Module | LoadedModel | None, tokenizer: Any, **placement: Any
) -> LoadedModel:
    """The model to replay ``bundle`` with: ``override`` (a reference, an ``nn.Module`` with
    ``tokenizer``, or a :class:`LoadedModel`), else the manifest's model reference, loaded
    with ``placement`` (``device_map``, ``offload_dir``, ``max_memory``) when given.

    Raises:
        ModelLoadError: the model cannot be found (the message says to pass ``model=``).
        BundleError: the manifest names a model inside the bundle itself.
    """
    info = bundle.manifest["model"]
    if isinstance(override, LoadedModel):
        return override
    if isinstance(override, nn.Module):
        return LoadedModel(override.eval(), tokenizer, model_ref(override))
    dtype = recorded_dtype(bundle)
    attn = attn_implementation(bundle.manifest)
    # Loads go through the module attribute, so a test (or an embedding tool) that replaces
    # models.loading.load sees replay's loads too.
    if isinstance(override, str):
        return _load(override, dtype, attn, placement)
    reference = info.get("reference")
    if not reference:
        raise ModelLoadError(
            f"bundle '{bundle.name}' was recorded from an in-memory model ({info.get('class')}) with no reference to "
            "load it from; pass the model: load_bundle(path, model=...) or --model PATH"
        )
    if info.get("source") != "zoo" and bundle_relative(str(reference), bundle.source):
        raise BundleError(
            f"bundle '{bundle.name}' names a model inside the bundle itself ({reference!r}); a bundle may not ship "
            "the model it is replayed with. Pass the model you trust: --model / model="
        )
    if info.get("source") == "zoo" and not str(reference).startswith("zoo:"):
        reference = f"zoo:{reference}"
    try:
        return _load(str(reference), dtype, attn, placement)
    except ModelLoadError as exc:
        raise ModelLoadError(
            f"cannot load the model bundle '{bundle.name}' was recorded with: {exc}; pass --model / model= to choose one"
        ) from None


def _load(reference: str, dtype: torch.dtype, attn: str, placement: dict[str, Any]) -> LoadedModel:
    """A reference loaded for replay: ``….onnx`` through onnxruntime (docs/onnx.md), the rest by ``models.loading``."""
    if is_onnx_reference(reference):
        if placement:
            raise ForensicsError(f"'{reference}' runs in onnxruntime on the CPU; device_map does not apply to it")
        return load_onnx(reference)
    return model_loading.load(reference, dtype=dtype, attn_implementation=attn, progress=False, **placement)


FIX_FILE_MAX_BYTES = 64 * 1024 * 1024
_INTERVENTION_TYPES: dict[str, tuple[type, ...]] = {
    "site": (str,),
    "kind": (str,),
    "value": (int, float, list, type(None)),
    "heads": (list, type(None)),
    "neurons": (list, type(None)),
    "positions": (list, type(None)),
    "source": (str, list, type(None)),
    "seed": (int,),
    "align": (str,),
    "direction": (list, type(None)),
    "gate": (dict, type(None)),
}


def read_fix_file(path: str | Path) -> list[Intervention]:
    """The interventions of a saved fix set, checked as hostile input.

    Args:
        path: JSON written by ``analyze --out`` / ``analyze --json`` (an analysis whose
            ``fix_set.interventions`` holds :meth:`Intervention.to_json` dicts), or a
            :meth:`FixSet.to_json` dict on its own.
    Returns:
        The fix set's interventions, in order (apply them together: ``session.run(fix)``).
    Raises:
        ForensicsError: the file is missing, too large, not strict JSON, holds no fix set,
            or an intervention in it is malformed (the message names which and why).
    """
    data = read_fix_json(path)
    return fix_interventions(data, f"fix file '{Path(path)}'")


def read_fix_json(path: str | Path) -> Any:
    """A fix file's JSON (an analysis or a fix set), size-capped and strictly parsed; its
    interventions are checked by :func:`fix_interventions`."""
    file = Path(path)
    what = f"fix file '{file}'"
    if not file.is_file():
        raise ForensicsError(f"{what} does not exist or is not a file; pass the JSON that `analyze --out` wrote")
    try:
        size = file.stat().st_size
        if size > FIX_FILE_MAX_BYTES:
            raise ForensicsError(f"{what} is {size} bytes, over the {FIX_FILE_MAX_BYTES}-byte limit; refusing it")
        raw = file.read_bytes()
    except OSError as exc:
        raise ForensicsError(f"cannot read {what}: {exc.strerror or exc}") from None
    return _strict_json(raw, what)


def fix_interventions(data: Any, what: str) -> list[Intervention]:
    """The interventions of parsed fix-file JSON (``fix_set.interventions`` of an analysis, or a
    fix set's own ``interventions``), each checked as hostile input."""
    fix = data.get("fix_set", data) if isinstance(data, dict) else None
    if isinstance(data, dict) and "fix_set" in data and fix is None:
        raise ForensicsError(f"{what} holds no fix set (an analysis without a search); run `analyze` without triage")
    items = fix.get("interventions") if isinstance(fix, dict) else None
    if not isinstance(items, list) or not items:
        raise ForensicsError(
            f"{what} holds no fix set: expected an analysis JSON with fix_set.interventions (a non-empty list); "
            "pass the file `analyze --out FILE` wrote"
        )
    return [_fix_intervention(item, f"{what}: intervention {i}") for i, item in enumerate(items)]


def _strict_json(raw: bytes, what: str) -> Any:
    try:
        return strict_loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ForensicsError(f"{what} is not UTF-8 (byte {exc.start}); pass the JSON `analyze --out` wrote") from None
    except RecursionError:
        raise ForensicsError(f"{what} nests too deeply to parse; refusing it") from None
    except ValueError as exc:
        raise ForensicsError(f"{what} is not valid JSON ({exc}); pass the JSON `analyze --out` wrote") from None


def _fix_intervention(item: Any, what: str) -> Intervention:
    """One ``Intervention.to_json()`` dict from a fix file: key types checked before it is built."""
    if not isinstance(item, dict):
        raise ForensicsError(f"{what} is a {type(item).__name__}, not an object like Intervention.to_json()")
    unknown = sorted(str(k) for k in set(item) - set(_INTERVENTION_TYPES))
    if unknown:
        raise ForensicsError(f"{what} has unknown keys {unknown}; known keys: {sorted(_INTERVENTION_TYPES)}")
    for key, value in item.items():
        types = _INTERVENTION_TYPES[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise ForensicsError(f"{what}: '{key}' cannot be {type(value).__name__} ({str(value)[:60]!r})")
    for key in ("heads", "neurons", "positions"):
        if item.get(key) is not None and not all(isinstance(v, int) and not isinstance(v, bool) for v in item[key]):
            raise ForensicsError(f"{what}: '{key}' must be a list of integers")
    for key in ("value", "direction"):
        values = item.get(key)
        if isinstance(values, list) and not all(_finite(v) for v in values):
            raise ForensicsError(f"{what}: '{key}' must be a list of finite numbers")
    if isinstance(item.get("source"), list) and not all(isinstance(v, str) for v in item["source"]):
        raise ForensicsError(f"{what}: 'source' must be a path or a list of paths")
    if "site" not in item:
        raise ForensicsError(f"{what} has no 'site'")
    gate = item.get("gate")
    if gate is not None and not (
        isinstance(gate.get("site"), str)
        and isinstance(gate.get("direction"), list)
        and all(_finite(v) for v in gate["direction"])
        and _finite(gate.get("above"))
        and isinstance(gate.get("reads", "last"), str)
        and set(gate) <= {"site", "direction", "above", "reads"}
    ):
        raise ForensicsError(f"{what}: its gate must be {{'site', 'direction': [numbers], 'above': number, 'reads'}}")
    try:
        return Intervention.from_json(item)
    except ForensicsError as exc:
        raise ForensicsError(f"{what}: {exc}") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise ForensicsError(f"{what} is malformed ({exc})") from None


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
