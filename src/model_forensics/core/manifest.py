"""The manifest read as hostile input: strict JSON, the schema's allowlists, and bounds.

A bundle is a file someone sent you. Nothing in it may run code, and nothing may make a
reader allocate, loop or print without bound. Three layers, in order:

1. :func:`parse_json` — UTF-8 only, no duplicate keys, no NaN/Infinity (nor numbers that
   overflow to them), at most ``max_json_depth`` levels, no string over
   ``max_string_chars``, no file over its size cap. Every JSON file of a bundle
   (``manifest.json``, ``cube.json``, each line of ``calls.jsonl``) goes through it.
2. :func:`check_manifest` — the JSON Schema (``schemas/manifest.schema.json``), whose
   allowlists cover every value that reaches a library call: ``input.generation`` (what
   ``model.generate`` receives), ``input.kwargs`` (what ``model(...)`` receives), predicate
   arguments, dtypes, sketches, the attention implementation. A key not on a list —
   ``trust_remote_code``, ``custom_generate``, ``assistant_model``, anything else — is a
   :class:`BundleError` naming it.
3. The configurable bounds of :class:`~model_forensics.core.config.BundleConfig`: generation
   length and beams, input rows and tokens, site count and decoded size (checked from the
   declared shape, before anything is allocated), prompt counts, regex patterns that compile.

:func:`generation_kwargs` and :func:`forward_kwargs` are the only way replay reads the
options it passes to the model; they re-check the allowlist when a replay session is built.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from model_forensics.core.config import BundleConfig
from model_forensics.core.errors import BundleError

DTYPE_ITEMSIZE = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}
_MAX_INT_DIGITS = 40  # a JSON integer longer than this is not a count, an id or a seed


def load_schema(name: str) -> dict[str, Any]:
    """A JSON Schema shipped with the package: ``manifest`` or ``cube``."""
    return dict(json.loads(_schema_text(name)))


@cache
def _schema_text(name: str) -> str:
    return resources.files("model_forensics.core").joinpath(f"schemas/{name}.schema.json").read_text()


@cache
def _validator(name: str) -> jsonschema.protocols.Validator:
    schema = load_schema(name)
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema)  # type: ignore[no-any-return]


# -- strict JSON -----------------------------------------------------------------------------
def parse_json(raw: bytes, what: str, limits: BundleConfig, max_bytes: float | None = None) -> Any:
    """Parse one JSON document from a bundle, refusing anything a well-formed bundle never holds.

    Args:
        raw: the file's bytes (or one line of ``calls.jsonl``).
        what: how to name it in errors (``manifest.json``, ``calls.jsonl line 3``).
        limits: the reader's bounds.
        max_bytes: size cap for this document (default ``limits.max_manifest_mb``).
    Raises:
        BundleError: not UTF-8, not JSON, a duplicate key, NaN/Infinity, a number too long,
            nesting deeper than ``max_json_depth`` or a string longer than ``max_string_chars``.
    """
    cap = limits.max_manifest_mb * 1024 * 1024 if max_bytes is None else max_bytes
    if len(raw) > cap:
        raise BundleError(f"{what} is {len(raw)} bytes, over the {int(cap)}-byte limit; refusing to parse it")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BundleError(f"{what} is not UTF-8 (byte {exc.start}); the bundle is corrupt or hostile") from None
    try:
        value = json.loads(
            text,
            object_pairs_hook=lambda pairs: _unique_keys(pairs, what),
            parse_constant=lambda name: _refuse_constant(name, what),
            parse_float=lambda s: _finite_float(s, what),
            parse_int=lambda s: _bounded_int(s, what),
        )
    except RecursionError:
        raise BundleError(f"{what} nests too deeply to parse; refusing it") from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        if isinstance(exc, _Refused):
            raise BundleError(str(exc)) from None
        raise BundleError(f"{what} is not valid JSON ({exc}); the bundle is corrupt") from None
    _check_shape(value, what, limits)
    return value


class _Refused(ValueError):
    """Raised inside json.loads hooks; turned into a BundleError by parse_json."""


def _unique_keys(pairs: list[tuple[str, Any]], what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"{what} repeats the key {_show(key)}; a JSON object must not hold a key twice")
        out[key] = value
    return out


def _refuse_constant(name: str, what: str) -> Any:
    raise _Refused(f"{what} holds {name}, which is not JSON; refusing it")


def _finite_float(text: str, what: str) -> float:
    if len(text) > 64:
        raise _Refused(f"{what} holds a {len(text)}-character number; refusing it")
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"{what} holds the number {text[:24]}, which overflows to infinity; refusing it")
    return value


def _bounded_int(text: str, what: str) -> int:
    if len(text) > _MAX_INT_DIGITS:
        raise _Refused(f"{what} holds a {len(text)}-digit integer; refusing it")
    return int(text)


def _check_shape(value: Any, what: str, limits: BundleConfig) -> None:
    # Iterative walk: depth and string lengths, without recursion of our own.
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if len(item) > limits.max_string_chars:
                raise BundleError(
                    f"{what} holds a {len(item)}-character string, over max_string_chars={limits.max_string_chars}"
                )
            continue
        if not isinstance(item, dict | list):
            continue
        if depth > limits.max_json_depth:
            raise BundleError(f"{what} nests deeper than max_json_depth={limits.max_json_depth}; refusing it")
        children: Iterable[Any] = item.values() if isinstance(item, dict) else item
        if isinstance(item, dict):
            for key in item:
                if len(key) > limits.max_string_chars:
                    raise BundleError(f"{what} holds a {len(key)}-character key; refusing it")
        stack.extend((child, depth + 1) for child in children)


def _show(text: Any, n: int = 60) -> str:
    """A bundle string for an error message: quoted, control characters escaped, clipped."""
    s = str(text)
    s = s if len(s) <= n else s[: n - 1] + "…"
    return ascii(s) if not s.isprintable() else repr(s)


# -- schema + bounds -------------------------------------------------------------------------
def check_manifest(manifest: Any, limits: BundleConfig, where: str = "manifest.json") -> dict[str, Any]:
    """Check a parsed manifest against the schema's allowlists and the reader's bounds.

    Returns:
        The manifest (unchanged) when it passes.
    Raises:
        BundleError: naming the first key that is not allowed or out of bounds.
    """
    if not isinstance(manifest, dict):
        raise BundleError(f"{where} must hold a JSON object, not {type(manifest).__name__}; the bundle is corrupt")
    _check_version(manifest, where)
    errors = sorted(_validator("manifest").iter_errors(manifest), key=lambda e: list(e.absolute_path))
    if errors:
        raise BundleError(_schema_message(errors[0], where))
    _check_bounds(manifest, limits, where)
    return manifest


def _check_version(manifest: dict[str, Any], where: str) -> None:
    from model_forensics.core.bundle import FORMAT_NAME, FORMAT_VERSION

    if manifest.get("format") != FORMAT_NAME:
        raise BundleError(
            f"{where} is not a model-forensics bundle manifest (format is {_show(manifest.get('format'))})"
        )
    version = manifest.get("format_version")
    major = str(version).split(".")[0] if isinstance(version, str) else None
    if major != FORMAT_VERSION.split(".")[0]:
        raise BundleError(
            f"bundle uses format version {_show(version).strip(chr(39))}, this model-forensics reads {FORMAT_VERSION}; "
            "upgrade model-forensics (pip install -U model-forensics) to read it"
        )


def _schema_message(error: jsonschema.ValidationError, where: str) -> str:
    path = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed)) if isinstance(error.instance, dict) else []
        key = f"{path}.{extra[0]}" if extra else path
        return (
            f"{where}: key {_show(key, 120)} is not allowed (a bundle may only set {', '.join(allowed)} there); "
            "the bundle is hostile or from an incompatible writer, and was not used"
        )
    if error.validator == "not" and error.absolute_path:
        return f"{where}: key {_show(path, 120)} is not allowed; the bundle is hostile and was not used"
    if error.validator == "oneOf" and error.context:
        best = jsonschema.exceptions.best_match(error.context)
        inner = ".".join(str(p) for p in best.absolute_path) or path
        return f"{where} does not match the bundle schema at {inner}: {_clip_message(best.message)}"
    return f"{where} does not match the bundle schema at {path}: {_clip_message(error.message)}"


def _clip_message(message: str, n: int = 200) -> str:
    message = message.encode("ascii", "backslashreplace").decode()
    return message if len(message) <= n else message[: n - 1] + "…"


def _check_bounds(manifest: dict[str, Any], limits: BundleConfig, where: str) -> None:
    sites = manifest["sites"]
    if len(sites) > limits.max_sites:
        raise BundleError(f"{where} declares {len(sites)} sites, over max_sites={limits.max_sites}")
    cap = limits.max_site_mb * 1024 * 1024
    for site, info in sites.items():
        size = math.prod(info["shape"]) * DTYPE_ITEMSIZE[info["dtype"]]
        if size > cap:
            raise BundleError(
                f"{where}: site {_show(site)} declares shape {info['shape'][:8]} ({size} bytes decoded), "
                f"over max_site_mb={limits.max_site_mb}; refusing it before allocating anything"
            )
    for table in ("input", "output"):
        for name, info in manifest[table]["tensors"].items():
            shape = info["shape"]
            if shape and shape[0] > limits.max_input_rows:
                raise BundleError(
                    f"{where}: {table} tensor {_show(name)} has {shape[0]} rows, over max_input_rows={limits.max_input_rows}"
                )
            if len(shape) > 1 and table == "input" and shape[1] > limits.max_input_tokens:
                raise BundleError(
                    f"{where}: input tensor {_show(name)} has {shape[1]} tokens, over max_input_tokens={limits.max_input_tokens}"
                )
    _check_generation(manifest["input"].get("generation") or {}, limits, where)
    for key in ("variants", "benign", "baseline"):
        entries = manifest["extras"].get(key) or []
        if len(entries) > limits.max_prompts:
            raise BundleError(
                f"{where}: extras.{key} holds {len(entries)} prompts, over max_prompts={limits.max_prompts}"
            )
        for entry in entries:
            ids = entry.get("input_ids") if isinstance(entry, dict) else None
            if ids is not None and len(ids[0]) > limits.max_input_tokens:
                raise BundleError(f"{where}: an extras.{key} prompt has {len(ids[0])} tokens, over max_input_tokens")
    predicate = manifest.get("predicate")
    if predicate and predicate["kind"] == "regex":
        try:
            re.compile(predicate["args"]["pattern"])
        except re.error as exc:
            raise BundleError(f"{where}: predicate.args.pattern is not a valid regex ({exc})") from None
    reference = manifest["model"].get("reference")
    if isinstance(reference, str) and ("\x00" in reference or not reference.isprintable()):
        raise BundleError(f"{where}: model.reference {_show(reference)} holds control characters; refusing it")


def _check_generation(generation: dict[str, Any], limits: BundleConfig, where: str) -> None:
    for key in ("max_new_tokens", "max_length", "min_new_tokens", "min_length"):
        value = generation.get(key)
        if value is not None and value > limits.max_new_tokens + (limits.max_input_tokens if "length" in key else 0):
            raise BundleError(
                f"{where}: input.generation.{key}={value} is over the limit (max_new_tokens={limits.max_new_tokens}); "
                "raise bundle.max_new_tokens in the config if this bundle is trusted"
            )
    beams = generation.get("num_beams")
    if beams is not None and beams > limits.max_num_beams:
        raise BundleError(f"{where}: input.generation.num_beams={beams} is over max_num_beams={limits.max_num_beams}")


# -- the values replay passes to library calls ----------------------------------------------
def generation_kwargs(manifest: dict[str, Any], limits: BundleConfig | None = None) -> dict[str, Any]:
    """The recorded ``model.generate`` options, re-checked against the allowlist.

    Raises:
        BundleError: a key not on the allowlist (``custom_generate``, ``trust_remote_code``,
            ``assistant_model``, …) or a value out of bounds.
    """
    generation = dict((manifest.get("input") or {}).get("generation") or {})
    _check_part(generation, ("input", "generation"))
    _check_generation(generation, limits or BundleConfig(), "manifest.json")
    return generation


def forward_kwargs(manifest: dict[str, Any]) -> dict[str, Any]:
    """The recorded scalar ``model(...)`` options, re-checked against the allowlist."""
    kwargs = dict((manifest.get("input") or {}).get("kwargs") or {})
    _check_part(kwargs, ("input", "kwargs"))
    return kwargs


def attn_implementation(manifest: dict[str, Any]) -> str:
    """The attention implementation to load the model with (allowlisted; default eager)."""
    config = (manifest.get("model") or {}).get("config") or {}
    value = config.get("_attn_implementation") or "eager"
    allowed = _part_schema(("model", "config"))["properties"]["_attn_implementation"]["enum"]
    if value not in allowed:
        raise BundleError(f"manifest.json: model.config._attn_implementation {_show(value)} is not allowed")
    return str(value)


def allowed_keys(*path: str) -> frozenset[str]:
    """The keys the schema allows at ``path``, e.g. ``allowed_keys("input", "generation")``."""
    return frozenset(_part_schema(path).get("properties", {}))


def _part_schema(path: tuple[str, ...]) -> dict[str, Any]:
    schema = load_schema("manifest")
    for key in path:
        schema = schema["properties"][key]
    return schema


def _check_part(value: dict[str, Any], path: tuple[str, ...]) -> None:
    schema = {**_part_schema(path), "$defs": load_schema("manifest")["$defs"]}
    validator = jsonschema.validators.validator_for(schema)(schema)
    for error in validator.iter_errors(value):
        error.path.extendleft(reversed(path))
        raise BundleError(_schema_message(error, "manifest.json"))


def bundle_relative(reference: str, root: Path) -> bool:
    """True when a model reference from a manifest points inside the bundle itself (refused:
    a bundle may not ship the model code or files it is loaded with)."""
    try:
        target = Path(reference).expanduser().resolve()
        return target == root.resolve() or root.resolve() in target.parents
    except (OSError, RuntimeError, ValueError):
        return True
