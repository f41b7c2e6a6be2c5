"""Record one prompt end to end: tokenize, run (forward or greedy generation), write a bundle.

This is what ``model-forensics record`` and ``demo`` call; it is plain library code so
the same recording can be made from Python. :func:`record_incident` also stores a user's
own failing variants, benign prompts and clean baselines in ``manifest.extras``, each run
through the model with the predicate first: variants that do not fail, and benign or
baseline prompts that do, are left out (and counted), so that ``analyze`` finds a usable
set in the bundle and needs nothing else::

    result = record_incident(loaded, prompt, "incident", predicate=contains("HACKED"), max_new_tokens=4,
                             variants=read_prompts("failing.jsonl"), benign=read_prompts("benign.jsonl"))
    for check in result.checks:
        print(check.message)      # "12 of 15 variants fail the predicate; keeping those 12"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model_forensics.core.bundle import check_writable_target
from model_forensics.core.errors import ForensicsError
from model_forensics.core.predicates import Predicate, resolve_predicate
from model_forensics.core.prompts import PromptLine
from model_forensics.models.hooks import logits_of
from model_forensics.models.inputs import pixel_values
from model_forensics.models.loading import LoadedModel
from model_forensics.recorder.hooks import RecorderHooks


def encode_prompt(loaded: LoadedModel, prompt: str, chat: bool | None = None) -> dict[str, torch.Tensor]:
    """Token ids for ``prompt``; chat models get their chat template (``chat=None``: auto).

    Raises:
        ForensicsError: the model has no tokenizer, or the prompt exceeds its context.
    """
    tok = tokenizer_of(loaded)
    use_chat = bool(getattr(tok, "chat_template", None)) if chat is None else chat
    if use_chat:
        return encode_messages(loaded, [{"role": "user", "content": prompt}])
    return checked_encoding(loaded, tok(prompt, return_tensors="pt"))


def encode_messages(loaded: LoadedModel, messages: Sequence[dict[str, str]]) -> dict[str, torch.Tensor]:
    """Token ids for chat ``messages`` (``[{"role": "user", "content": …}]``) through the
    tokenizer's chat template, with the generation prompt added.

    Raises:
        ForensicsError: the model has no tokenizer or no chat template, or the text
            exceeds its context.
    """
    tok = tokenizer_of(loaded)
    if not getattr(tok, "chat_template", None):
        raise ForensicsError(
            f"model '{loaded.ref.name}' has no chat template, so chat messages cannot be encoded; "
            "pass the prompt as a string (or token ids) instead"
        )
    enc = tok.apply_chat_template(list(messages), add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return checked_encoding(loaded, enc)


def tokenizer_of(loaded: LoadedModel) -> Any:
    """``loaded``'s tokenizer; a model without one is refused (ForensicsError)."""
    if loaded.tokenizer is None:
        raise ForensicsError(f"model '{loaded.ref.name}' has no tokenizer; pass token ids from Python instead")
    return loaded.tokenizer


def checked_encoding(loaded: LoadedModel, enc: Any) -> dict[str, torch.Tensor]:
    """The tensors of a tokenizer's output, refused when longer than the model's context."""
    batch = {k: v for k, v in dict(enc).items() if isinstance(v, torch.Tensor)}
    limit = getattr(getattr(loaded.model, "config", None), "max_position_embeddings", None)
    n = int(batch["input_ids"].shape[1])
    if limit is not None and n > int(limit):
        raise ForensicsError(
            f"the prompt is {n} tokens long but '{loaded.ref.name}' reads at most {limit}; shorten the prompt"
        )
    return batch


def record_prompt(
    loaded: LoadedModel,
    prompt: str,
    out: str | Path,
    *,
    recorder: RecorderHooks | None = None,
    max_new_tokens: int = 0,
    predicate: Predicate | None = None,
    overwrite: bool = False,
    chat: bool | None = None,
    extras: dict[str, Any] | None = None,
    sign_key: str | Path | None = None,
) -> Path:
    """Record ``prompt`` on ``loaded`` into a bundle at ``out``.

    ``max_new_tokens > 0`` records a greedy generation (prompt + generated positions);
    0 records a single forward pass. ``out`` is checked before the model runs.

    Raises:
        BundleError: ``out`` exists (without ``overwrite``), or is anything but a bundle.
        ForensicsError: the prompt cannot be encoded, or nothing could be recorded.
    """
    target = Path(out)
    check_writable_target(target, overwrite)
    rec = recorder or RecorderHooks()
    check_max_new_tokens(rec, max_new_tokens)
    predicate = resolved_predicate(loaded, predicate)
    if predicate is not None and predicate.name is not None:
        extras = {"predicate_name": predicate.name, **(extras or {})}
    batch = encode_prompt(loaded, prompt, chat)
    with rec.install_hooks(loaded.model, loaded.tokenizer):
        torch.manual_seed(0)
        if max_new_tokens > 0:
            pad = getattr(loaded.tokenizer, "eos_token_id", None)
            rec.generate(batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        else:
            with torch.no_grad():
                loaded.model(**batch)
        return rec.create_bundle(
            target,
            predicate=predicate,
            overwrite=overwrite,
            extras={"prompt": prompt, **(extras or {})},
            seed=0,
            sign_key=sign_key,
        )


def check_max_new_tokens(rec: RecorderHooks, max_new_tokens: int) -> None:
    """Refuse a generation length the bundle readers would refuse (``bundle.max_new_tokens``)."""
    limit = rec.config_tree.bundle.max_new_tokens
    if not 0 <= max_new_tokens <= limit:
        raise ForensicsError(
            f"max_new_tokens={max_new_tokens} is outside 0..{limit}: readers refuse bundles that ask for more "
            "(bundle.max_new_tokens in the config)"
        )


def resolved_predicate(loaded: LoadedModel, predicate: Predicate | None) -> Predicate | None:
    """``predicate`` with a named class or token looked up in ``loaded`` (class_is:positive)."""
    if predicate is None:
        return None
    return resolve_predicate(predicate, getattr(loaded.model, "config", None), loaded.tokenizer)


# -- a user's own incident: variants, benign prompts and baselines checked at record time ------
class NoFailingVariants(ForensicsError):
    """None of the given variants fails the predicate (the CLI exits with code 1)."""


ROLES = {
    "variants": "variants",
    "benign": "benign prompts",
    "baseline": "clean baseline prompts",
    "near_miss": "near misses",
}


@dataclass
class PromptSetCheck:
    """What recording did with one prompt set.

    Attributes:
        role: ``variants`` (kept when they fail), ``benign`` or ``baseline`` (kept when
            they pass).
        source: where the set came from (a file name, ``auto``).
        given: how many prompts were given (for ``auto``: generated).
        kept: how many are stored in the bundle.
        dropped: where each left-out prompt came from (``benign.jsonl line 3``).
    """

    role: str
    source: str
    given: int
    kept: int
    dropped: list[str] = field(default_factory=list)

    @property
    def failing(self) -> int:
        """How many prompts of the set fail the predicate."""
        return self.kept if self.role == "variants" else len(self.dropped)

    @property
    def message(self) -> str:
        """One line for the user, e.g. ``12 of 15 variants fail the predicate; keeping those 12``."""
        what = ROLES[self.role]
        origin = f" ({self.source})"
        if self.role == "variants":
            return f"{self.failing} of {self.given} {what}{origin} fail the predicate; keeping those {self.kept}"
        if not self.dropped:
            return f"all {self.given} {what}{origin} pass the predicate; keeping them"
        shown = ", ".join(self.dropped[:5]) + (", …" if len(self.dropped) > 5 else "")
        return (
            f"{self.failing} of {self.given} {what}{origin} fail the predicate; dropping them ({shown}), "
            f"keeping {self.kept}"
        )

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "given": self.given, "kept": self.kept, "dropped": list(self.dropped)}


@dataclass
class IncidentRecording:
    """The bundle :func:`record_incident` wrote and what it did with each prompt set."""

    path: Path
    checks: list[PromptSetCheck]


PromptsLike = Sequence[PromptLine | str]


def record_incident(
    loaded: LoadedModel,
    prompt: str,
    out: str | Path,
    *,
    predicate: Predicate,
    variants: PromptsLike = (),
    benign: PromptsLike = (),
    baseline: PromptsLike = (),
    near_miss: PromptsLike = (),
    sources: dict[str, str] | None = None,
    variants_generated: bool = False,
    recorder: RecorderHooks | None = None,
    max_new_tokens: int = 0,
    overwrite: bool = False,
    chat: bool | None = None,
    extras: dict[str, Any] | None = None,
    sign_key: str | Path | None = None,
) -> IncidentRecording:
    """Record ``prompt`` like :func:`record_prompt`, with the user's prompt sets in
    ``manifest.extras`` (``variants``, ``benign``, ``baseline``; docs/replay.md).

    Each prompt is encoded as the replayer will encode it and run with the incident's
    settings (``max_new_tokens``, greedy); the predicate decides what is kept: variants that
    fail, benign and baseline prompts that pass. Nothing is written when no variant fails.

    Args:
        predicate: the failure test (a named ``class_is`` / ``token_is`` is resolved here).
        variants / benign / baseline: prompts (:class:`PromptLine` from
            :func:`~model_forensics.core.prompts.read_prompts`, or strings); empty: none given.
        near_miss: prompts that carry the trigger but on which the model behaves (kept
            when they pass, like benign prompts); ``analyze`` measures a fix's side effects on them.
        sources: per role, where its prompts came from, for messages (default: ``given``).
        variants_generated: the variants were generated (``auto_variants``), not given: one
            that the model cannot read (longer than its context) is dropped, not refused.
    Returns:
        The bundle's path and one :class:`PromptSetCheck` per prompt set given.
    Raises:
        NoFailingVariants: variants were given and none fails.
        ForensicsError: a prompt cannot be encoded (the message names its file and line),
            or the same errors as :func:`record_prompt`.
    """
    rec = recorder or RecorderHooks()
    check_writable_target(Path(out), overwrite)
    check_max_new_tokens(rec, max_new_tokens)
    resolved = resolved_predicate(loaded, predicate)
    assert resolved is not None
    sets = {"variants": variants, "benign": benign, "baseline": baseline, "near_miss": near_miss}
    given = {role: [_as_line(p, role, i) for i, p in enumerate(prompts)] for role, prompts in sets.items() if prompts}
    encoded = {
        role: [_encode_line(loaded, line, chat, lenient=variants_generated and role == "variants") for line in lines]
        for role, lines in given.items()
    }
    kept_extras: dict[str, Any] = {}
    checks: list[PromptSetCheck] = []
    for role, lines in given.items():
        fails = [batch is not None and prompt_fails(loaded, batch, resolved, max_new_tokens) for batch in encoded[role]]
        keep = [f if role == "variants" else not f for f in fails]
        check = PromptSetCheck(
            role,
            (sources or {}).get(role, "given"),
            len(lines),
            sum(keep),
            [line.where for line, k in zip(lines, keep, strict=True) if not k],
        )
        if role == "variants" and check.kept == 0:
            raise NoFailingVariants(
                f"none of the {check.given} variants ({check.source}) fails the predicate {resolved.describe()}, "
                "so the bundle would carry no failing variant; check the predicate, --max-new-tokens and the variants"
            )
        checks.append(check)
        kept_extras[role] = [line.to_extra() for line, k in zip(lines, keep, strict=True) if k]
    kept_extras["prompt_sets"] = {check.role: check.to_json() for check in checks}
    path = record_prompt(
        loaded,
        prompt,
        out,
        recorder=rec,
        max_new_tokens=max_new_tokens,
        predicate=resolved,
        overwrite=overwrite,
        chat=chat,
        extras={**(extras or {}), **kept_extras},
        sign_key=sign_key,
    )
    return IncidentRecording(path, checks)


def _as_line(prompt: PromptLine | str, role: str, index: int) -> PromptLine:
    if isinstance(prompt, PromptLine):
        return prompt
    if not isinstance(prompt, str) or not prompt.strip():
        raise ForensicsError(f"{role} prompt {index} is {prompt!r}; give non-empty strings or PromptLines")
    return PromptLine(prompt, {}, f"{role} prompt {index}")


def _encode_line(
    loaded: LoadedModel, line: PromptLine, chat: bool | None, lenient: bool = False
) -> dict[str, torch.Tensor] | None:
    """The prompt's inputs; an error names the line (``lenient``: None instead)."""
    try:
        return encode_prompt(loaded, line.text, chat)
    except ForensicsError as exc:
        if lenient:
            return None
        raise ForensicsError(f"{line.where}: {exc}") from None


def prompt_fails(
    loaded: LoadedModel, batch: dict[str, torch.Tensor], predicate: Predicate, max_new_tokens: int = 0
) -> bool:
    """Whether ``predicate`` holds on the model's output for ``batch`` (one row), run as
    :func:`record_prompt` runs it: one forward pass, or greedy generation of
    ``max_new_tokens``; the text is the generated continuation or the decoded next token."""
    model, tok = loaded.model, loaded.tokenizer
    prompt_len = int(batch["input_ids"].shape[1])
    torch.manual_seed(0)
    with torch.no_grad():
        if max_new_tokens > 0:
            pad = getattr(tok, "eos_token_id", None)
            out = model.generate(  # type: ignore[operator]
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                return_dict_in_generate=True,
                output_logits=True,
            )
            last = out.logits[-1][0]
            text = None if tok is None else str(tok.decode(out.sequences[0, prompt_len:], skip_special_tokens=True))
        else:
            logits = logits_of(model(**batch))
            if logits is None:
                raise ForensicsError(f"model '{loaded.ref.name}' returned no logits; the predicate cannot be checked")
            last = logits[0, -1] if logits.dim() == 3 else logits[0]
            next_token = [int(last.argmax())]  # a token model's text is its next token; a classifier has none
            text = None if tok is None or logits.dim() != 3 else str(tok.decode(next_token, skip_special_tokens=True))
    return predicate.evaluate(text=text, logits=last)


# -- tensor inputs: images and other models without a tokenizer -------------------------------
def record_inputs(
    loaded: LoadedModel,
    inputs: Mapping[str, torch.Tensor],
    out: str | Path,
    *,
    recorder: RecorderHooks | None = None,
    predicate: Predicate | None = None,
    overwrite: bool = False,
    extras: dict[str, Any] | None = None,
    sign_key: str | Path | None = None,
) -> Path:
    """Record one forward pass of ``loaded`` on ready tensors (``model(**inputs)``) into a
    bundle at ``out``: what a model without a tokenizer needs, e.g. an image classifier
    called with ``pixel_values`` (1, C, H, W). ``out`` is checked before the model runs.

    Example::

        record_inputs(zoo.load("cnn-digits-badnets"), {"pixel_values": pixel_values(image)}, "incident",
                      predicate=class_is(0))

    Raises:
        BundleError: ``out`` exists (without ``overwrite``), or is anything but a bundle.
        ForensicsError: nothing could be recorded.
    """
    target = Path(out)
    check_writable_target(target, overwrite)
    rec = recorder or RecorderHooks()
    predicate = resolved_predicate(loaded, predicate)
    if predicate is not None and predicate.name is not None:
        extras = {"predicate_name": predicate.name, **(extras or {})}
    with rec.install_hooks(loaded.model, loaded.tokenizer):
        torch.manual_seed(0)
        with torch.no_grad():
            loaded.model(**inputs)
        return rec.create_bundle(
            target, predicate=predicate, overwrite=overwrite, extras=dict(extras or {}), seed=0, sign_key=sign_key
        )


def record_image(
    loaded: LoadedModel, image: Any, out: str | Path, *, predicate: Predicate | None = None, **options: Any
) -> Path:
    """:func:`record_inputs` for one image: ``image`` is a (C, H, W) tensor or nested list
    (checked by :func:`~model_forensics.models.inputs.pixel_values`), passed to the model as
    ``pixel_values`` (1, C, H, W); ``options`` as for :func:`record_inputs`."""
    return record_inputs(loaded, {"pixel_values": pixel_values(image)}, out, predicate=predicate, **options)
