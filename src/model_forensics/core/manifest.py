"""The manifest read as hostile input: strict JSON, the schema's allowlists, and bounds.

A bundle is a file someone sent you. Nothing in it may run code, and nothing may make a
reader allocate, loop or print without bound. Three layers, in order:

1. :func:`parse_json` — UTF-8 only, no duplicate keys, no NaN/Infinity (nor numbers that
   overflow to them), at most ``max_json_depth`` levels, no string over
   ``max_string_chars``, no file over its size cap. Every JSON file of a bundle
   (``manifest.json``, ``cube.json``, each line of ``calls.jsonl``) goes through it.
2. :func:`check_manifest` — the :class:`Manifest` model (pydantic; the JSON Schema
   ``schemas/manifest.schema.json`` is generated from it), whose allowlists cover every
   value that reaches a library call: ``input.generation`` (what
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
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from model_forensics.core.config import BundleConfig
from model_forensics.core.digests import ALGORITHMS, LEGACY
from model_forensics.core.errors import BundleError

FORMAT_NAME = "model-forensics-bundle"
FORMAT_VERSION = "1.3"
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


def load_schema(name: str) -> dict[str, Any]:
    """A JSON Schema shipped with the package: ``manifest`` or ``cube``."""
    return dict(json.loads(_schema_text(name)))


@cache
def _schema_text(name: str) -> str:
    return resources.files("model_forensics.core").joinpath(f"schemas/{name}.schema.json").read_text()


# -- strict JSON -----------------------------------------------------------------------------
def parse_json(raw: bytes, what: str, limits: BundleConfig, max_bytes: float | None = None) -> Any:
    """Parse one JSON document from a bundle, refusing anything a well-formed bundle never holds.

    Args:
        raw: the file's bytes (or one line of ``calls.jsonl``).
        what: how to name it in errors (``manifest.json``, ``calls.jsonl line 3``).
        limits: the reader's bounds.
        max_bytes: size cap for this document (default ``limits.max_manifest_mb``).
    Raises:
        BundleError: not UTF-8, not JSON, a duplicate key, NaN/Infinity (or a number that
            overflows to it), an integer of over 4300 digits, nesting deeper than ``max_json_depth`` or a string longer than ``max_string_chars``.
    """
    cap = limits.max_manifest_mb * 1024 * 1024 if max_bytes is None else max_bytes
    if len(raw) > cap:
        raise BundleError(f"{what} is {len(raw)} bytes, over the {int(cap)}-byte limit; refusing to parse it")
    # Arrays and objects are what make parsing and checking slow; an upper bound on their
    # number (brackets inside strings count too) costs one pass over the bytes in C.
    containers = raw.count(b"{") + raw.count(b"[")
    if containers > limits.max_json_containers:
        raise BundleError(
            f"{what} holds up to {containers} arrays/objects, over max_json_containers={limits.max_json_containers}; "
            "refusing to parse it (raise bundle.max_json_containers if the bundle is trusted)"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BundleError(f"{what} is not UTF-8 (byte {exc.start}); the bundle is corrupt or hostile") from None
    try:
        value = strict_loads(text)
    except RecursionError:
        raise BundleError(f"{what} nests too deeply to parse; refusing it") from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        if isinstance(exc, JSONRefused):
            raise BundleError(f"{what} {exc}") from None
        raise BundleError(f"{what} is not valid JSON ({exc}); the bundle is corrupt") from None
    _check_shape(value, what, limits)
    return value


class JSONRefused(ValueError):
    """What JSON forbids but Python's parser accepts: raised by :func:`strict_loads`."""


def strict_loads(
    text: str,
    *,
    duplicate: str = "repeats the key {key}; a JSON object must not hold a key twice",
    constant: str = "holds {name}, which is not JSON; refusing it",
) -> Any:
    """``json.loads`` that refuses a key twice in one object and NaN / ±Infinity, with
    :class:`JSONRefused` worded by ``duplicate`` (``{key}``: the key, quoted and escaped)
    and ``constant`` (``{name}``). Invalid JSON is a ``ValueError``, too deep a document a
    ``RecursionError``, as with ``json.loads``: every reader of hostile JSON goes through here.
    """

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            seen: set[str] = set()
            key = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
            raise JSONRefused(duplicate.format(key=_show(key)))
        return out

    def refuse_constant(name: str) -> Any:
        raise JSONRefused(constant.format(name=name))

    return json.loads(text, object_pairs_hook=unique_keys, parse_constant=refuse_constant)


def _check_shape(value: Any, what: str, limits: BundleConfig) -> None:
    """Depth, string lengths and finite numbers, level by level (no recursion: a deep
    document must not exhaust the stack here either)."""
    max_depth, max_chars = limits.max_json_depth, limits.max_string_chars
    if isinstance(value, str) and len(value) > max_chars:
        raise BundleError(f"{what} is a {len(value)}-character string, over max_string_chars={max_chars}")
    level = [value] if type(value) in (dict, list) else []
    depth = 1
    while level:
        if depth > max_depth:
            raise BundleError(f"{what} nests deeper than max_json_depth={max_depth}; refusing it")
        deeper: list[Any] = []
        for item in level:
            if type(item) is dict:
                if item and max(map(len, item)) > max_chars:
                    raise BundleError(f"{what} holds a key over max_string_chars={max_chars} characters")
                children: Iterable[Any] = item.values()
            else:
                children = item
            for child in children:
                kind = type(child)
                if kind is str:
                    if len(child) > max_chars:
                        raise BundleError(
                            f"{what} holds a {len(child)}-character string, over max_string_chars={max_chars}"
                        )
                elif kind is dict or kind is list:
                    deeper.append(child)
                elif kind is float and not math.isfinite(child):
                    raise BundleError(f"{what} holds a number that overflows to infinity; refusing it")
        level = deeper
        depth += 1


def _show(text: Any, n: int = 60) -> str:
    """A bundle string for an error message: quoted, control characters escaped, clipped."""
    s = str(text)
    s = s if len(s) <= n else s[: n - 1] + "…"
    return ascii(s) if not s.isprintable() else repr(s)


# -- the manifest model -----------------------------------------------------------------------
# pydantic (Rust core) validates a manifest of a million tokens in milliseconds, where a
# JSON Schema validator takes tens of seconds; schemas/manifest.schema.json is generated
# from these models (scripts/write_manifest_schema.py) so other tools can read the format.
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Count = Annotated[int, Field(ge=0, le=2**62)]
TokenId = Annotated[int, Field(ge=0, le=100_000_000)]
Shape = Annotated[list[Count], Field(max_length=8)]
Name = Annotated[str, StringConstraints(max_length=512)]
FloatDtype = Literal["float32", "float16", "bfloat16", "float64"]
TensorDtype = Literal["float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"]
SketchName = Literal["full", "fp16", "int8", "topk"]
AttnImplementation = Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"]


class _Open(BaseModel):
    """A part of the manifest that may carry more keys (read by nothing that calls a library)."""

    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)


class _Closed(BaseModel):
    """An allowlist: every key that reaches a library call is named here; others are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class TensorInfo(_Open):
    shape: Shape
    dtype: TensorDtype


class ModelConfig(_Open):
    """The Hugging Face config as recorded; only the attention implementation is ever used."""

    attn_implementation: AttnImplementation | None = Field(default=None, alias="_attn_implementation")

    @model_validator(mode="after")
    def _no_remote_code(self) -> ModelConfig:
        for key in ("trust_remote_code", "auto_map", "custom_pipelines"):
            if key in (self.model_extra or {}):
                raise ValueError(f"key '{key}' is not allowed: a bundle never asks for remote code")
        return self


class ModelSpec(_Open):
    name: Annotated[str, StringConstraints(max_length=4096)]
    source: Literal["zoo", "local", "gguf", "module"]
    reference: Annotated[str, StringConstraints(max_length=4096)] | None
    revision: Annotated[str, StringConstraints(max_length=256)] | None = None
    weights_sha256: Sha256
    architecture: Annotated[str, StringConstraints(max_length=256)]
    class_name: Annotated[str, StringConstraints(max_length=256)] | None = Field(default=None, alias="class")
    dtype: FloatDtype
    n_layers: Annotated[int, Field(ge=0, le=100_000)] | None = None
    n_heads: Annotated[int, Field(ge=0, le=100_000)] | None = None
    n_kv_heads: Annotated[int, Field(ge=0, le=100_000)] | None = None
    config: ModelConfig = Field(default_factory=ModelConfig)


class GenerationSettings(_Closed):
    """Options of the recorded ``model.generate`` call: the only ones replay passes on."""

    max_new_tokens: Annotated[int, Field(ge=1)] | None = None
    max_length: Annotated[int, Field(ge=1)] | None = None
    min_new_tokens: Annotated[int, Field(ge=0)] | None = None
    min_length: Annotated[int, Field(ge=0)] | None = None
    do_sample: bool | None = None
    num_beams: Annotated[int, Field(ge=1)] | None = None
    num_return_sequences: Annotated[int, Field(ge=1, le=64)] | None = None
    temperature: Annotated[float, Field(gt=0, le=1000)] | None = None
    top_k: Annotated[int, Field(ge=0, le=10_000_000)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    typical_p: Annotated[float, Field(ge=0, le=1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=1000)] | None = None
    length_penalty: Annotated[float, Field(ge=-1000, le=1000)] | None = None
    no_repeat_ngram_size: Annotated[int, Field(ge=0, le=1024)] | None = None
    early_stopping: bool | None = None
    use_cache: bool | None = None
    pad_token_id: TokenId | None = None
    bos_token_id: TokenId | None = None
    eos_token_id: TokenId | Annotated[list[TokenId], Field(max_length=64)] | None = None


class ForwardKwargs(_Closed):
    """Scalar options of the recorded forward call: the only ones replay passes on."""

    use_cache: bool | None = None
    output_attentions: bool | None = None
    output_hidden_states: bool | None = None
    logits_to_keep: Annotated[int, Field(ge=0, le=1_000_000)] | None = None


class InputSpec(_Open):
    mode: Literal["forward", "generate"]
    tensors: dict[Name, TensorInfo]
    kwargs: ForwardKwargs = Field(default_factory=ForwardKwargs)
    text: str | None = None
    tokens: list[str] = Field(default_factory=list)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)


class OutputSpec(_Open):
    tensors: dict[Name, TensorInfo]
    logits_sha256: Sha256 | None
    step_logits_sha256: list[Sha256] = Field(default_factory=list)
    logits_shape: Shape | None = None
    text: str | None = None
    prediction: Count | None = None


class TextArgs(_Closed):
    text: Annotated[str, StringConstraints(max_length=10_000)]


class RegexArgs(_Closed):
    pattern: Annotated[str, StringConstraints(max_length=1000)]


class TokenArgs(_Closed):
    token: TokenId


class LabelArgs(_Closed):
    label: TokenId


class LogitDiffArgs(_Closed):
    a: TokenId
    b: TokenId
    threshold: Annotated[float, Field(ge=-1e30, le=1e30)] = 0.0


class TextPredicate(_Closed):
    kind: Literal["contains", "not_contains"]
    args: TextArgs
    holds: bool | None


class RegexPredicate(_Closed):
    kind: Literal["regex"]
    args: RegexArgs
    holds: bool | None


class TokenPredicate(_Closed):
    kind: Literal["token_is"]
    args: TokenArgs
    holds: bool | None


class ClassPredicate(_Closed):
    kind: Literal["class_is"]
    args: LabelArgs
    holds: bool | None


class LogitDiffPredicate(_Closed):
    kind: Literal["logit_diff"]
    args: LogitDiffArgs
    holds: bool | None


PredicateSpec = Annotated[
    TextPredicate | RegexPredicate | TokenPredicate | ClassPredicate | LogitDiffPredicate, Field(discriminator="kind")
]


class SiteInfo(_Open):
    shape: Shape
    dtype: FloatDtype
    sketch: SketchName
    sha256: Sha256
    stored_sha256: Sha256 | None = None
    nbytes: Count
    module: Annotated[str, StringConstraints(max_length=1024)] | None = None
    recomputed: bool = False


class TorchSettings(_Open):
    num_threads: Annotated[int, Field(ge=1, le=4096)] | None = None


class Determinism(_Open):
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None
    torch: TorchSettings


class Provenance(_Open):
    commit_hash: Annotated[str, StringConstraints(max_length=128)] | None
    package_versions: dict[
        Annotated[str, StringConstraints(max_length=128)], Annotated[str, StringConstraints(max_length=128)]
    ]


class RecorderSpec(_Open):
    granularity: Literal["layer", "head", "neuron", "all"] | None = None
    sketch: SketchName | None = None
    compression_ratio: Annotated[float, Field(gt=0, le=1)] | None = None


class PromptText(_Open):
    prompt: str


class PromptIds(_Open):
    input_ids: Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=1)]


Pixel = Annotated[float, Field(ge=-1e6, le=1e6)]


class PromptPixels(_Open):
    """An image input: ``{"pixel_values": [[[…]]]}``, one image (C, H, W) of finite
    numbers, at most 64 channels and 1024 × 1024 pixels (the manifest's size cap bounds
    the total)."""

    pixel_values: Annotated[
        list[
            Annotated[
                list[Annotated[list[Pixel], Field(min_length=1, max_length=1024)]], Field(min_length=1, max_length=1024)
            ]
        ],
        Field(min_length=1, max_length=64),
    ]


Prompt = str | PromptText | PromptIds | PromptPixels


class Extras(_Open):
    variants: list[Prompt] = Field(default_factory=list)
    benign: list[Prompt] = Field(default_factory=list)
    baseline: list[Prompt] = Field(default_factory=list)


class FileEntry(_Closed):
    """A data file's size and digest. ``digest`` names how ``sha256`` was computed: the
    algorithm over the file's bytes (``sha256``, ``blake3``), or (``sha256-entries``, format
    1.2; ``blake3-entries``, 1.3; safetensors files) the algorithm over the digest of its
    header and of each entry (see :func:`model_forensics.core.bundle.entries_digest`). The
    key keeps its name ``sha256`` whatever the algorithm (older readers look it up)."""

    sha256: Sha256
    bytes: Count
    digest: Literal["sha256", "sha256-entries", "blake3", "blake3-entries"] = "sha256"


class FileTable(_Closed):
    """sha256 and size of every data file; all five are mandatory."""

    inputs: FileEntry = Field(alias="inputs.safetensors")
    outputs: FileEntry = Field(alias="outputs.safetensors")
    activations: FileEntry = Field(alias="activations.safetensors")
    cube: FileEntry = Field(alias="cube.json")
    calls: FileEntry = Field(alias="calls.jsonl")


class Manifest(_Open):
    """``manifest.json`` of format 1 (1.0 to 1.3; newer minor versions may add keys).

    ``hash`` (1.3) names the algorithm of every content digest in the bundle (each file's,
    each site's ``stored_sha256`` and ``sha256``, the outputs' ``logits_sha256`` and
    ``step_logits_sha256``, each turn's ``logits_sha256``); absent, it is sha256. See
    :mod:`model_forensics.core.digests`."""

    format: Literal["model-forensics-bundle"]
    format_version: Annotated[str, StringConstraints(pattern=r"^[0-9]{1,4}\.[0-9]{1,4}$")]
    hash: Literal["sha256", "blake3"] = "sha256"
    name: Annotated[str, StringConstraints(min_length=1, max_length=255)]
    created: Annotated[str, StringConstraints(max_length=64)]
    model: ModelSpec
    input: InputSpec
    output: OutputSpec
    predicate: PredicateSpec | None = None
    sites: dict[Name, SiteInfo]
    dropped_sites: list[Name]
    partial: dict[Name, Annotated[str, StringConstraints(max_length=4096)]] = Field(default_factory=dict)
    determinism: Determinism
    provenance: Provenance
    recorder: RecorderSpec
    extras: Extras
    files: FileTable


def manifest_json_schema() -> dict[str, Any]:
    """The JSON Schema of the manifest, generated from :class:`Manifest`."""
    schema = Manifest.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "model-forensics/manifest-1.schema.json"
    return schema


# -- checking ----------------------------------------------------------------------------------
def check_manifest(manifest: Any, limits: BundleConfig, where: str = "manifest.json") -> dict[str, Any]:
    """Check a parsed manifest against the allowlists and the reader's bounds.

    Returns:
        The manifest (unchanged) when it passes.
    Raises:
        BundleError: naming the first key that is not allowed or out of bounds.
    """
    if not isinstance(manifest, dict):
        raise BundleError(f"{where} must hold a JSON object, not {type(manifest).__name__}; the bundle is corrupt")
    _check_version(manifest, where)
    _check_hash(manifest, where)
    validate_format(manifest, where)
    _check_bounds(manifest, limits, where)
    return manifest


def validate_format(manifest: dict[str, Any], where: str = "manifest.json") -> None:
    """Check a manifest against :class:`Manifest` only (no configurable bounds): what a
    writer checks before it writes.

    Raises:
        BundleError: naming the first key that is not allowed or malformed.
    """
    try:
        Manifest.model_validate(manifest)
    except ValidationError as exc:
        raise BundleError(_validation_message(exc, where)) from None


def _check_version(manifest: dict[str, Any], where: str) -> None:
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


def _check_hash(manifest: dict[str, Any], where: str) -> None:
    algorithm = manifest.get("hash", LEGACY)
    if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
        raise BundleError(
            f"{where}: hash {_show(algorithm)} is not a digest algorithm this model-forensics knows "
            f"({', '.join(ALGORITHMS)}); the bundle is from a newer or foreign writer: upgrade model-forensics "
            "(pip install -U model-forensics) or record the bundle again"
        )


def _validation_message(exc: ValidationError, where: str, prefix: tuple[str, ...] = ()) -> str:
    error = exc.errors(include_url=False)[0]
    loc = [*prefix, *(str(part) for part in error["loc"] if not _is_union_tag(part))]
    path = ".".join(loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        return (
            f"{where}: key {_show(path, 120)} is not allowed (a bundle may only set the keys model-forensics "
            "knows there); the bundle is hostile or from an incompatible writer, and was not used"
        )
    message = _clip_message(str(error["msg"]))
    if "not allowed" in message:
        return f"{where}: {path}: {message}; the bundle is hostile and was not used"
    return f"{where} does not match the bundle format at {path}: {message}"


def _is_union_tag(part: Any) -> bool:
    # pydantic puts the chosen union member into the location (e.g. 'str', 'PromptIds',
    # 'int', 'list[...]', or a discriminator value); it is not a key of the manifest.
    text = str(part)
    return text in _MEMBER_TAGS or "[" in text or text.endswith(("Predicate", "Prompt")) or text.startswith("Prompt")


_MEMBER_TAGS = {"str", "int", "float", "bool", "list", "dict", "function-after", "constrained-str", "constrained-int"}


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
    _check_part(GenerationSettings, generation, "input.generation")
    _check_generation(generation, limits or BundleConfig(), "manifest.json")
    return generation


def forward_kwargs(manifest: dict[str, Any]) -> dict[str, Any]:
    """The recorded scalar ``model(...)`` options, re-checked against the allowlist."""
    kwargs = dict((manifest.get("input") or {}).get("kwargs") or {})
    _check_part(ForwardKwargs, kwargs, "input.kwargs")
    return kwargs


def attn_implementation(manifest: dict[str, Any]) -> str:
    """The attention implementation to load the model with (allowlisted; default eager)."""
    config = dict((manifest.get("model") or {}).get("config") or {})
    _check_part(ModelConfig, config, "model.config")
    return str(config.get("_attn_implementation") or "eager")


def allowed_keys(part: type[BaseModel]) -> frozenset[str]:
    """The keys an allowlisted part accepts, e.g. ``allowed_keys(GenerationSettings)``."""
    return frozenset(field.alias or name for name, field in part.model_fields.items())


def _check_part(part: type[BaseModel], value: dict[str, Any], prefix: str) -> None:
    try:
        part.model_validate(value)
    except ValidationError as exc:
        raise BundleError(_validation_message(exc, "manifest.json", tuple(prefix.split(".")))) from None


def bundle_relative(reference: str, root: Path) -> bool:
    """True when a model reference from a manifest points inside the bundle itself (refused:
    a bundle may not ship the model code or files it is loaded with)."""
    try:
        target = Path(reference).expanduser().resolve()
        return target == root.resolve() or root.resolve() in target.parents
    except (OSError, RuntimeError, ValueError):
        return True
