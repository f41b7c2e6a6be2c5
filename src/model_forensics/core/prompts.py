"""Prompt files: a user's failing variants, benign prompts and clean baselines, read as
hostile input.

Two formats, chosen by the file's suffix:

* ``.jsonl`` (or ``.json``): one JSON value per line, a prompt string or an object
  ``{"prompt": "…", "expected": "Paris", …}`` whose other keys are kept (scalars or
  lists of scalars) for the analyses;
* ``.txt``: one prompt per line, taken as written (only the line break is removed).

Lines that are empty or only whitespace are skipped in both. Everything else that is not
a prompt is an error naming the file and the line: bytes that are not UTF-8, bad JSON,
NaN / Infinity, a duplicate key, an empty prompt, a prompt over ``bundle.max_string_chars``
characters, a file over ``bundle.max_manifest_mb`` (the prompts are stored in the bundle's
manifest, which readers cap at that size) or over ``bundle.max_prompts`` prompts.

::

    read_prompts("failing.jsonl")   # [PromptLine(text="…", fields={}, where="failing.jsonl line 1"), …]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_forensics.core.config import BundleConfig
from model_forensics.core.errors import ForensicsError
from model_forensics.core.manifest import strict_loads

SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".txt": "text"}
_SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class PromptLine:
    """One prompt: its ``text``, the other keys of its JSON object (``fields``), and
    ``where`` it came from (``failing.jsonl line 3``) for messages."""

    text: str
    fields: dict[str, Any] = field(default_factory=dict)
    where: str = "prompt"

    def to_extra(self) -> str | dict[str, Any]:
        """The entry as ``manifest.extras`` stores it: the string, or ``{"prompt": …, **fields}``."""
        return self.text if not self.fields else {"prompt": self.text, **self.fields}


def read_prompts(path: str | Path, limits: BundleConfig | None = None) -> list[PromptLine]:
    """The prompts of a ``.jsonl`` or ``.txt`` file, checked (see the module docstring).

    Args:
        path: the file.
        limits: the ``bundle:`` config section whose caps apply (default: the defaults).
    Returns:
        At least one :class:`PromptLine`, in file order.
    Raises:
        ForensicsError: naming the file (and the line) and what to fix.
    """
    file = Path(path)
    caps = limits or BundleConfig()
    kind = SUFFIXES.get(file.suffix.lower())
    if kind is None:
        raise ForensicsError(
            f"prompt file '{file}' has suffix '{file.suffix}'; use .jsonl (one JSON string or "
            '{"prompt": …} object per line) or .txt (one prompt per line)'
        )
    raw = _read_capped(file, caps.max_manifest_mb)
    prompts: list[PromptLine] = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{file.name} line {number}"
        try:
            text = line.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError as exc:
            raise ForensicsError(f"{where} is not UTF-8 (byte {exc.start}); save the file as UTF-8") from None
        if not text.strip():
            continue
        prompt = _json_prompt(text, where) if kind == "jsonl" else PromptLine(text, {}, where)
        _check_prompt(prompt, caps)
        prompts.append(prompt)
        if len(prompts) > caps.max_prompts:
            raise ForensicsError(
                f"prompt file '{file}' holds over {caps.max_prompts} prompts (bundle.max_prompts); "
                "use fewer, or raise bundle.max_prompts in the config"
            )
    if not prompts:
        raise ForensicsError(f"prompt file '{file}' holds no prompts; write one prompt per line")
    return prompts


def _read_capped(file: Path, max_mb: float) -> bytes:
    if not file.is_file():
        what = "does not exist" if not (file.exists() or file.is_symlink()) else "is not a file"
        raise ForensicsError(f"prompt file '{file}' {what}; pass a .jsonl or .txt file of prompts")
    cap = int(max_mb * 1024 * 1024)
    try:
        with file.open("rb") as handle:
            raw = handle.read(cap + 1)
    except OSError as exc:
        raise ForensicsError(f"cannot read prompt file '{file}' ({exc.strerror}); check its permissions") from None
    if len(raw) > cap:
        raise ForensicsError(
            f"prompt file '{file}' is over {max_mb:g} MB (bundle.max_manifest_mb: its prompts are stored in the "
            "bundle's manifest); use fewer prompts, or raise bundle.max_manifest_mb in the config"
        )
    return raw


def _json_prompt(text: str, where: str) -> PromptLine:
    try:
        value = strict_loads(text, duplicate="duplicate key {key}", constant="{name} is not a JSON number")
    except ValueError as exc:
        raise ForensicsError(
            f'{where} is not valid JSON ({exc}); write a JSON string or {{"prompt": "…"}} object per line'
        ) from None
    except RecursionError:
        raise ForensicsError(f"{where} nests too deeply; write a JSON string or object per line") from None
    if isinstance(value, str):
        return PromptLine(value, {}, where)
    if not isinstance(value, dict) or not isinstance(value.get("prompt"), str):
        got = type(value).__name__ if not isinstance(value, dict) else 'an object without a string "prompt"'
        raise ForensicsError(f'{where} is {got}; write a JSON string or {{"prompt": "…"}} object per line')
    fields = {k: v for k, v in value.items() if k != "prompt"}
    for key, item in fields.items():
        if not isinstance(item, _SCALARS) and not (
            isinstance(item, list) and all(isinstance(x, _SCALARS) for x in item)
        ):
            raise ForensicsError(
                f"{where}: key '{key}' holds a nested {type(item).__name__}; other keys may hold a string, number, "
                "boolean, null or a list of those"
            )
    return PromptLine(value["prompt"], fields, where)


def _check_prompt(prompt: PromptLine, caps: BundleConfig) -> None:
    if not prompt.text.strip():
        raise ForensicsError(f"{prompt.where} holds an empty prompt; remove the line or write the prompt")
    longest = max([len(prompt.text), *(len(v) for v in prompt.fields.values() if isinstance(v, str))])
    if longest > caps.max_string_chars:
        raise ForensicsError(
            f"{prompt.where} holds a {longest}-character string, over bundle.max_string_chars="
            f"{caps.max_string_chars}; shorten it"
        )
