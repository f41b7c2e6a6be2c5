"""Failure predicates: declarative tests of a model output that say "this is the failure".

A predicate is data (``kind`` + ``args``) so it can be stored in a bundle and evaluated
again after any intervention. It holds (returns True) when the output *fails*; a *flip*
is an intervention under which it no longer holds.

Output views: ``text`` is the generated / decoded continuation; ``logits`` is the score
vector the prediction reads, shape (V,) for the next token or (C,) for a classifier.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import regex as regex_engine
import torch

from model_forensics.core.errors import ForensicsError

_TEXT_KINDS = ("contains", "not_contains", "regex")
_LOGIT_KINDS = ("token_is", "class_is", "logit_diff")


@dataclass(frozen=True)
class Predicate:
    """A failure test: ``kind`` is one of contains, not_contains, regex, token_is,
    class_is, logit_diff; ``args`` its parameters."""

    kind: str
    args: dict[str, Any] = field(default_factory=dict)
    regex_timeout_s: float = field(default=1.0, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in _TEXT_KINDS + _LOGIT_KINDS:
            raise ForensicsError(
                f"predicate kind '{self.kind}' is unknown; use one of {', '.join(_TEXT_KINDS + _LOGIT_KINDS)}"
            )

    @property
    def needs_text(self) -> bool:
        return self.kind in _TEXT_KINDS

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
        """The logit indices a logit predicate reads (empty for text predicates)."""
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
        if self.kind in ("token_is", "class_is"):
            target = int(self.args["token"] if self.kind == "token_is" else self.args["label"])
            return logits.argmax(dim=-1) == target
        if self.kind == "logit_diff":
            diff = logits[:, int(self.args["a"])] - logits[:, int(self.args["b"])]
            return diff > float(self.args.get("threshold", 0.0))
        raise ForensicsError(f"predicate {self.describe()} reads text; it has no logit form")

    def describe(self) -> str:
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
    ``token_is:42``, ``logit_diff:12,7,0.5``.

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
        if kind == "class_is":
            return class_is(int(value))
        if kind == "token_is":
            return token_is(int(value))
    except ValueError:
        raise ForensicsError(f"predicate '{spec}' has a malformed value for {kind}") from None
    return Predicate(kind)  # raises with the list of kinds
