"""Failure predicates: declarative tests of a model output that say "this is the failure".

A predicate is data (``kind`` + ``args``) so it can be stored in a bundle and evaluated
again after any intervention. It holds (returns True) when the output *fails*; a *flip*
is an intervention under which it no longer holds.

Output views: ``text`` is the generated / decoded continuation; ``logits`` is the score
vector the prediction reads, shape (V,) for the next token or (C,) for a classifier.

``class_is`` and ``token_is`` may name their target (``class_is:positive``,
``token_is:HACKED``): such a predicate is *unresolved* until :func:`resolve_predicate`
looks the name up in the model's labels (``config.id2label`` / ``label2id``) or its
tokenizer; the resolved predicate stores the id and keeps the name for display.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import regex as regex_engine
import torch

from model_forensics.core.errors import ForensicsError

_TEXT_KINDS = ("contains", "not_contains", "regex")
_LOGIT_KINDS = ("token_is", "class_is", "logit_diff")
_NAMED = {"token_is": "token", "class_is": "label"}  # kinds that may name their target: kind → id arg
# a regex of literal alternatives: no metacharacter but "|", escapes of punctuation only
_LITERAL_ALTERNATIVES = regex_engine.compile(r"(?:[^\\^$.?*+()\[\]{}]|\\[^0-9A-Za-z])*")


@dataclass(frozen=True)
class Predicate:
    """A failure test: ``kind`` is one of contains, not_contains, regex, token_is,
    class_is, logit_diff; ``args`` its parameters. ``name``: the class label or token text
    a ``class_is`` / ``token_is`` predicate was given by (display only; ``args`` holds the
    id once resolved)."""

    kind: str
    args: dict[str, Any] = field(default_factory=dict)
    regex_timeout_s: float = field(default=1.0, compare=False, repr=False)
    name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in _TEXT_KINDS + _LOGIT_KINDS:
            raise ForensicsError(
                f"predicate kind '{self.kind}' is unknown; use one of {', '.join(_TEXT_KINDS + _LOGIT_KINDS)}"
            )

    @property
    def needs_text(self) -> bool:
        return self.kind in _TEXT_KINDS

    @property
    def resolved(self) -> bool:
        """False for a ``class_is`` / ``token_is`` given by name and not yet looked up."""
        return self.kind not in _NAMED or _NAMED[self.kind] in self.args

    def evaluate(self, text: str | None = None, logits: torch.Tensor | None = None) -> bool:
        """True when the output fails. ``logits``: (V,) or (C,)."""
        if self.needs_text:
            if text is None:
                raise ForensicsError(f"predicate {self.describe()} reads text, but the output has none")
            if self.kind == "contains":
                return str(self.args["text"]) in text
            if self.kind == "not_contains":
                return str(self.args["text"]) not in text
            return self._search(text)
        if logits is None:
            raise ForensicsError(f"predicate {self.describe()} reads logits, but the output has none")
        return bool(self.evaluate_logits(logits.reshape(1, -1))[0])

    @functools.cached_property
    def settles(self) -> bool:
        """Whether a reply's verdict can be settled before the reply ends: ``contains``,
        ``not_contains``, and a ``regex`` of literal alternatives (``A|B``, escapes of
        punctuation only: what ``re.escape`` gives), whose match in a text is a match in
        every continuation of it. Anchors, classes and lookarounds can depend on what follows."""
        if self.kind == "regex":
            return _LITERAL_ALTERNATIVES.fullmatch(str(self.args.get("pattern", ""))) is not None
        return self.kind in ("contains", "not_contains")

    def settled(self, text: str) -> bool:
        """True when the verdict on ``text`` (a reply so far) is the verdict on every reply that
        continues it: once the text or pattern appears (failing for ``contains`` and a literal
        ``regex``, behaving for ``not_contains``). Assumes, as a tokenizer's decoding gives,
        that the text of a longer reply extends the text of its start."""
        if not self.settles:
            return False
        if self.kind == "regex":
            return self._search(text)
        return str(self.args["text"]) in text

    def _search(self, text: str) -> bool:
        # The pattern may come from a bundle someone sent: a catastrophic-backtracking
        # pattern must not hang the reader, so the search runs under a timeout.
        try:
            return regex_engine.search(str(self.args["pattern"]), text, timeout=self.regex_timeout_s) is not None
        except TimeoutError:
            raise ForensicsError(
                f"predicate {self.describe()} took over {self.regex_timeout_s} s on one output "
                "(catastrophic backtracking?); simplify the pattern or raise bundle.regex_timeout_s"
            ) from None
        except regex_engine.error as exc:
            raise ForensicsError(f"predicate {self.describe()} is not a valid regex ({exc})") from None

    def indices(self) -> list[int]:
        """The logit indices a logit predicate reads (empty for text predicates).

        Raises:
            ForensicsError: the predicate names its target and is not resolved yet.
        """
        if not self.resolved:
            raise ForensicsError(
                f"predicate {self.describe()} names its target; resolve it against the model first "
                "(resolve_predicate(predicate, model.config, tokenizer))"
            )
        if self.kind == "token_is":
            return [int(self.args["token"])]
        if self.kind == "class_is":
            return [int(self.args["label"])]
        if self.kind == "logit_diff":
            return [int(self.args["a"]), int(self.args["b"])]
        return []

    def evaluate_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Vectorised form for logit predicates. ``logits``: (N, V) → bool (N,)."""
        if self.indices() and max(self.indices()) >= logits.shape[-1]:
            raise ForensicsError(
                f"predicate {self.describe()} reads index {max(self.indices())}, but the output has only "
                f"{logits.shape[-1]} scores; fix the predicate (or the bundle it came from)"
            )
        if self.kind in _NAMED:
            return logits.argmax(dim=-1) == self.indices()[0]
        if self.kind == "logit_diff":
            diff = logits[:, int(self.args["a"])] - logits[:, int(self.args["b"])]
            return diff > float(self.args.get("threshold", 0.0))
        raise ForensicsError(f"predicate {self.describe()} reads text; it has no logit form")

    def describe(self) -> str:
        """``class_is(1)``; with a name, ``class_is('positive' = 1)`` (``= ?`` while unresolved)."""
        if self.name is not None:
            target = self.args.get(_NAMED[self.kind], "?")
            return f"{self.kind}({self.name!r} = {target})"
        inner = ", ".join(f"{v!r}" for v in self.args.values())
        return f"{self.kind}({inner})"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "args": dict(self.args)}

    @classmethod
    def from_json(cls, data: dict[str, Any], regex_timeout_s: float = 1.0) -> Predicate:
        return cls(kind=data["kind"], args=dict(data.get("args", {})), regex_timeout_s=regex_timeout_s)


def contains(text: str) -> Predicate:
    """Fails when the output text contains ``text`` (e.g. ``contains("HACKED")``)."""
    return Predicate("contains", {"text": text})


def not_contains(text: str) -> Predicate:
    return Predicate("not_contains", {"text": text})


def regex(pattern: str) -> Predicate:
    return Predicate("regex", {"pattern": pattern})


def token_is(token: int) -> Predicate:
    """Fails when the next-token argmax is ``token``."""
    return Predicate("token_is", {"token": int(token)})


def class_is(label: int) -> Predicate:
    """Fails when a classifier's argmax is ``label``."""
    return Predicate("class_is", {"label": int(label)})


def logit_diff(a: int, b: int, threshold: float = 0.0) -> Predicate:
    """Fails when logit[a] − logit[b] > threshold."""
    return Predicate("logit_diff", {"a": int(a), "b": int(b), "threshold": float(threshold)})


def parse_predicate(spec: str) -> Predicate:
    """Parse a CLI predicate: ``contains:HACKED``, ``regex:^PWN``, ``class_is:1``,
    ``token_is:42``, ``logit_diff:12,7,0.5``; ``class_is:positive`` and ``token_is:HACKED``
    name their target and give an unresolved predicate (see :func:`resolve_predicate`).

    Raises:
        ForensicsError: the spec is malformed.
    """
    kind, sep, value = spec.partition(":")
    if not sep:
        raise ForensicsError(f"predicate '{spec}' needs the form KIND:VALUE, e.g. contains:HACKED or class_is:1")
    try:
        if kind == "logit_diff":
            a, b, *rest = value.split(",")
            return logit_diff(int(a), int(b), float(rest[0]) if rest else 0.0)
        makers = {"contains": contains, "not_contains": not_contains, "regex": regex}
        if kind in makers:
            return makers[kind](value)
        if kind in _NAMED:
            if _is_int(value):
                return Predicate(kind, {_NAMED[kind]: int(value)})
            if not value.strip():
                raise ForensicsError(f"predicate '{spec}' has an empty value; e.g. {kind}:1")
            return Predicate(kind, name=value)
    except ValueError:
        raise ForensicsError(f"predicate '{spec}' has a malformed value for {kind}") from None
    return Predicate(kind)  # raises with the list of kinds


def _is_int(value: str) -> bool:
    try:
        int(value)
    except ValueError:
        return False
    return True


def resolve_predicate(predicate: Predicate, config: Any = None, tokenizer: Any = None) -> Predicate:
    """Look a named ``class_is`` / ``token_is`` target up in the model; others pass unchanged.

    Args:
        predicate: possibly unresolved (``class_is:positive``, ``token_is:HACKED``).
        config: the model's config; its ``id2label`` / ``label2id`` name the classes.
        tokenizer: the model's tokenizer; the token is a vocabulary entry (``ĠHACKED``) or a
            text that encodes to exactly one token.
    Returns:
        The predicate with the id in ``args`` and the name in ``name``.
    Raises:
        ForensicsError: the name is unknown (the message lists the labels), or the text is
            several tokens or none.
    """
    if predicate.resolved:
        return predicate
    assert predicate.name is not None
    name = predicate.name
    target = _label_id(name, config) if predicate.kind == "class_is" else _token_id(name, tokenizer)
    return replace(predicate, args={_NAMED[predicate.kind]: target})


def _label_id(name: str, config: Any) -> int:
    labels: dict[str, int] = {}
    id2label: Mapping[Any, Any] = getattr(config, "id2label", None) or {}
    label2id: Mapping[Any, Any] = getattr(config, "label2id", None) or {}
    for i, label in id2label.items():
        labels.setdefault(str(label), int(i))
    for label, i in label2id.items():
        labels.setdefault(str(label), int(i))
    if not labels:
        raise ForensicsError(
            f"class_is:{name} names a class, but the model has no class labels (config.id2label); "
            "give the class id instead, e.g. class_is:1"
        )
    if name in labels:
        return labels[name]
    folded = [i for label, i in labels.items() if label.casefold() == name.casefold()]
    if len(set(folded)) == 1:
        return folded[0]
    listed = ", ".join(f"{label} ({i})" for label, i in sorted(labels.items(), key=lambda kv: kv[1]))
    raise ForensicsError(f"class_is:{name}: the model has no class '{name}'; its classes are {listed}")


def _token_id(text: str, tokenizer: Any) -> int:
    if tokenizer is None:
        raise ForensicsError(
            f"token_is:{text} names a token, but the model has no tokenizer; give the token id, e.g. token_is:42"
        )
    vocab = tokenizer.get_vocab()
    if text in vocab:
        return int(vocab[text])
    ids = [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]
    unk = getattr(tokenizer, "unk_token_id", None)
    if ids and unk not in ids and len(ids) == 1:
        return ids[0]
    if not ids or (unk is not None and unk in ids and len(ids) == 1):
        raise ForensicsError(
            f"token_is:{text}: '{text}' is not in the tokenizer's vocabulary; "
            "use contains:TEXT for text, or give the token id (token_is:ID)"
        )
    pieces = [str(p) for p in tokenizer.convert_ids_to_tokens(ids)]
    hint = ""
    spaced = [int(i) for i in tokenizer.encode(" " + text, add_special_tokens=False)]
    if len(spaced) == 1 and spaced[0] != unk:
        hint = f"; ' {text}' (with a leading space) is one token: token_is:{spaced[0]}"
    raise ForensicsError(
        f"token_is:{text}: '{text}' is {len(ids)} tokens ({' | '.join(pieces)}), and token_is reads one; "
        f"use contains:{text} for text, or one token id{hint}"
    )
