"""Candidate failing variants of an incident prompt, generated from the prompt alone.

``record --variants auto`` runs them through the model and keeps those that still fail
(:func:`~model_forensics.recorder.session.record_incident`). Two kinds of family:

* the robustness experiment's perturbations (:mod:`~model_forensics.inspection.robustness`:
  ``typos``, ``case``, ``synonyms``, ``whitespace``, ``paraphrase`` (a neutral prefix));
* paraphrase templates on the prompt's words. The first and the last word stay where
  they are (the instruction frame, and the cue a causal model predicts after); the inner
  words are ``reorder``\\ ed (rotated, which moves an injected instruction through the
  text), ``swap``\\ ped (two of them), ``substitute``\\ d (one replaced by another word of
  the prompt: different surrounding text in the prompt's own vocabulary, the word-level
  form of the sensitivity experiment's token substitution) or ``wrap``\\ ped (a neutral
  clause inserted after the first word).

Deterministic: variant ``v`` of family ``f`` uses ``numpy.random.default_rng([seed, f, v])``,
and the families take turns, so the first ``count`` variants do not depend on ``count``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from model_forensics.core.errors import ForensicsError
from model_forensics.inspection.robustness import FAMILIES as PERTURBATIONS

CLAUSES = ("as asked", "please", "now", "as follows", "for me")


def _inner(words: list[str]) -> tuple[str, list[str], str] | None:
    return (words[0], words[1:-1], words[-1]) if len(words) >= 4 else None


def _reorder(text: str, rng: np.random.Generator) -> str | None:
    parts = _inner(text.split())
    if parts is None:
        return None
    first, inner, last = parts
    k = int(rng.integers(1, len(inner)))
    return " ".join([first, *inner[k:], *inner[:k], last])


def _swap(text: str, rng: np.random.Generator) -> str | None:
    parts = _inner(text.split())
    if parts is None:
        return None
    first, inner, last = parts
    i, j = (int(x) for x in rng.choice(len(inner), size=2, replace=False))
    inner[i], inner[j] = inner[j], inner[i]
    return " ".join([first, *inner, last])


def _substitute(text: str, rng: np.random.Generator) -> str | None:
    parts = _inner(text.split())
    if parts is None:
        return None
    first, inner, last = parts
    i = int(rng.integers(len(inner)))
    others = sorted({w for w in inner if w != inner[i]})
    if not others:
        return None
    inner[i] = others[int(rng.integers(len(others)))]
    return " ".join([first, *inner, last])


def _wrap(text: str, rng: np.random.Generator) -> str | None:
    words = text.split()
    if len(words) < 2:
        return None
    clause = CLAUSES[int(rng.integers(len(CLAUSES)))]
    return " ".join([words[0], clause, *words[1:]])


TEMPLATES: dict[str, Callable[[str, np.random.Generator], str | None]] = {
    "reorder": _reorder,
    "swap": _swap,
    "substitute": _substitute,
    "wrap": _wrap,
}
FAMILIES: dict[str, Callable[[str, np.random.Generator], str | None]] = {**PERTURBATIONS, **TEMPLATES}


def auto_variants(prompt: str, *, count: int = 32, seed: int = 0, families: Sequence[str] | None = None) -> list[str]:
    """Up to ``count`` distinct variants of ``prompt`` (none equal to it), the families
    taking turns.

    Args:
        prompt: the incident prompt.
        count: how many to generate (fewer when the families run out of new ones).
        seed: the seed of every family's draws (see the module docstring).
        families: names from :data:`FAMILIES` (default: all).
    Returns:
        The variants, in generation order.
    Raises:
        ForensicsError: an unknown family, or ``count`` < 1.
    """
    names = list(FAMILIES) if families is None else list(families)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        raise ForensicsError(f"unknown variant families {unknown or '(none given)'}; choose from {', '.join(FAMILIES)}")
    if count < 1:
        raise ForensicsError(f"count={count}: ask for at least one variant")
    out: list[str] = []
    seen = {prompt}
    for attempt in range(3 * count):  # a family that keeps repeating itself gives up its turns
        for name in names:
            rng = np.random.default_rng([seed, list(FAMILIES).index(name), attempt])
            new = FAMILIES[name](prompt, rng)
            if new is not None and new.strip() and new not in seen:
                seen.add(new)
                out.append(new)
                if len(out) == count:
                    return out
    return out
