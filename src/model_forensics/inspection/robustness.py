"""Experiment 8 — robustness score: invariance rate of the model's prediction under named
perturbation families, per family and overall, with bootstrap confidence intervals
(docs/metrics.md §8).

Families (deterministic given the seed; an input a family cannot change is not counted):

* ``typos`` — swap two inner letters of one word of ≥ 4 letters, or drop one;
* ``case`` — the whole text lower-cased, upper-cased or title-cased;
* ``synonyms`` — one word replaced by a near-synonym from a small built-in table
  (synonym-like token swaps; words outside the table are left alone);
* ``whitespace`` — a space doubled, a space turned into a newline, or a leading /
  trailing space added;
* ``paraphrase`` — a neutral instruction prefix ("Consider the following: …"); prefixes
  keep the end of the text, where a causal model predicts.

Image inputs (tensors (C, H, W), grey levels or colours in a fixed range) have their own
families, drawn the same way (the image's own value range [lo, hi] bounds every result):

* ``noise`` — Gaussian noise of std 0.05·(hi − lo) added to every pixel, clipped;
* ``shift`` — the image moved by one pixel up, down, left or right, the vacated row or
  column filled with lo (content at the opposite edge leaves the frame);
* ``brightness`` — every pixel scaled by a factor in [0.7, 0.9] ∪ [1.1, 1.3], clipped.

A variant is *invariant* when the top-1 prediction is unchanged and the total-variation
distance ½‖p − p'‖₁ between the output distributions is at most ``tolerance``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rich.table import Table

from model_forensics.core.records import fields_json
from model_forensics.inspection._json import jsonable

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SYNONYMS = {
    "big": "large", "large": "big", "small": "little", "little": "small", "quick": "fast", "fast": "quick",
    "happy": "glad", "glad": "happy", "sad": "unhappy", "begin": "start", "start": "begin", "end": "finish",
    "finish": "end", "buy": "purchase", "purchase": "buy", "help": "assist", "assist": "help", "show": "display",
    "answer": "reply", "reply": "answer", "question": "query", "car": "automobile", "house": "home", "home": "house",
    "smart": "clever", "clever": "smart", "easy": "simple", "simple": "easy", "hard": "difficult",
    "difficult": "hard", "old": "aged", "new": "fresh", "rich": "wealthy", "wealthy": "rich", "angry": "mad",
    "city": "town", "town": "city", "child": "kid", "kid": "child", "woman": "lady", "man": "gentleman",
    "near": "close", "close": "near", "shut": "close", "speak": "talk", "talk": "speak", "say": "state",
    "tell": "inform", "look": "glance", "see": "observe", "think": "believe", "believe": "think",
    "make": "create", "create": "make", "use": "utilize", "need": "require", "require": "need", "get": "obtain",
    "give": "provide", "provide": "give", "choose": "select", "select": "choose", "try": "attempt",
    "attempt": "try", "famous": "renowned", "beautiful": "pretty", "pretty": "beautiful", "strong": "powerful",
    "powerful": "strong", "large-scale": "big", "country": "nation", "nation": "country", "capital": "capital city",
    "write": "compose", "read": "peruse", "fix": "repair", "repair": "fix", "error": "mistake", "mistake": "error",
}  # fmt: skip

PREFIXES = ("Consider the following: ", "Here is a text. ", "Please read carefully. ", "Note: ")

_WORD = re.compile(r"[A-Za-z]+")


def _typo(text: str, rng: np.random.Generator) -> str | None:
    words = [m for m in _WORD.finditer(text) if len(m.group()) >= 4]
    if not words:
        return None
    m = words[int(rng.integers(len(words)))]
    w = m.group()
    i = int(rng.integers(1, len(w) - 2))
    new = w[:i] + w[i + 1] + w[i] + w[i + 2 :] if rng.random() < 0.5 and w[i] != w[i + 1] else w[:i] + w[i + 1 :]
    return text[: m.start()] + new + text[m.end() :]


def _case(text: str, rng: np.random.Generator) -> str | None:
    forms = [str.lower, str.upper, str.title]
    start = int(rng.integers(len(forms)))
    for k in range(len(forms)):
        out = forms[(start + k) % len(forms)](text)
        if out != text:
            return out
    return None


def _synonym(text: str, rng: np.random.Generator) -> str | None:
    hits = [m for m in _WORD.finditer(text) if m.group().lower() in SYNONYMS]
    if not hits:
        return None
    m = hits[int(rng.integers(len(hits)))]
    w = m.group()
    new = SYNONYMS[w.lower()]
    if w[0].isupper():
        new = new[0].upper() + new[1:]
    return text[: m.start()] + new + text[m.end() :]


def _whitespace(text: str, rng: np.random.Generator) -> str | None:
    spaces = [i for i, ch in enumerate(text) if ch == " "]
    kind = int(rng.integers(3 if spaces else 1))
    if kind == 0:
        return " " + text
    i = spaces[int(rng.integers(len(spaces)))]
    return text[:i] + ("  " if kind == 1 else "\n") + text[i + 1 :]


def _paraphrase(text: str, rng: np.random.Generator) -> str | None:
    return PREFIXES[int(rng.integers(len(PREFIXES)))] + text


FAMILIES: dict[str, Callable[[str, np.random.Generator], str | None]] = {
    "typos": _typo,
    "case": _case,
    "synonyms": _synonym,
    "whitespace": _whitespace,
    "paraphrase": _paraphrase,
}


def _noise(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor | None:
    lo, hi = float(image.min()), float(image.max())
    noise = torch.from_numpy(rng.normal(0.0, 0.05 * max(hi - lo, 1e-6), size=tuple(image.shape)))
    return (image + noise.to(image.dtype)).clamp(lo, hi)


def _shift(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor | None:
    if image.dim() < 2 or min(image.shape[-2:]) < 2:
        return None
    axis, step = (-2, -1)[int(rng.integers(2))], (-1, 1)[int(rng.integers(2))]
    out = torch.roll(image, step, dims=axis)
    edge = 0 if step == 1 else -1  # the row / column that wrapped around
    out.select(axis, edge).fill_(float(image.min()))
    return out


def _brightness(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor | None:
    factor = float(rng.uniform(0.7, 0.9) if rng.random() < 0.5 else rng.uniform(1.1, 1.3))
    lo, hi = float(image.min()), float(image.max())
    return (image * factor).clamp(min(lo, 0.0), hi if hi > 0 else None)


IMAGE_FAMILIES: dict[str, Callable[[torch.Tensor, np.random.Generator], torch.Tensor | None]] = {
    "noise": _noise,
    "shift": _shift,
    "brightness": _brightness,
}


def image_variants(image: torch.Tensor, family: str, count: int, seed: int, index: int) -> list[torch.Tensor]:
    """Up to ``count`` distinct perturbed versions of ``image`` (C, H, W) (none equal to it)."""
    out: list[torch.Tensor] = []
    fam = list(IMAGE_FAMILIES).index(family)
    for v in range(count * 3):
        rng = np.random.default_rng([seed, index, 100 + fam, v])
        new = IMAGE_FAMILIES[family](image, rng)
        if new is not None and not torch.equal(new, image) and not any(torch.equal(new, o) for o in out):
            out.append(new)
        if len(out) == count:
            break
    return out


def variants(text: str, family: str, count: int, seed: int, index: int) -> list[str]:
    """Up to ``count`` distinct perturbed versions of ``text`` (none that equal it)."""
    out: list[str] = []
    fam = list(FAMILIES).index(family)
    for v in range(count * 3):
        rng = np.random.default_rng([seed, index, fam, v])
        new = FAMILIES[family](text, rng)
        if new is not None and new != text and new not in out:
            out.append(new)
        if len(out) == count:
            break
    return out


@dataclass
class FamilyRobustness:
    family: str
    rate: float  # invariance rate
    low: float  # bootstrap CI
    high: float
    inputs: int  # inputs the family could perturb
    variants: int
    failures: list[dict[str, Any]] = field(default_factory=list)  # a few non-invariant examples


@dataclass
class RobustnessResult:
    tolerance: float
    confidence: float
    inputs: int
    families: list[FamilyRobustness] = field(default_factory=list)
    overall: FamilyRobustness | None = None

    def family(self, name: str) -> FamilyRobustness:
        return next(f for f in self.families if f.family == name)

    def to_json(self) -> dict[str, Any]:
        return jsonable(
            fields_json(
                self,
                overall=None if self.overall is None else vars(self.overall),
                families=[vars(f) for f in self.families],
            )
        )

    def table(self) -> Table:
        pct = f"{100 * self.confidence:.0f}%"
        t = Table(
            title=f"Robustness: invariance rate (top-1 kept and TV ≤ {self.tolerance:g}), {pct} bootstrap CI",
            title_justify="left",
        )
        for col in ("family", "rate", f"{pct} CI", "inputs", "variants"):
            t.add_column(col, justify="left" if col == "family" else "right")
        rows = [*self.families, *([self.overall] if self.overall else [])]
        for f in rows:
            name = f"[bold]{f.family}[/]" if f is self.overall else f.family
            t.add_row(name, f"{f.rate:.3f}", f"[{f.low:.3f}, {f.high:.3f}]", str(f.inputs), str(f.variants))
        return t

    def figure(self) -> Figure:
        from model_forensics.core import plots

        rows = [*self.families, *([self.overall] if self.overall else [])]
        return plots.rates_with_ci(
            [f.family for f in rows],
            [f.rate for f in rows],
            [f.low for f in rows],
            [f.high for f in rows],
            title=f"Robustness: invariance rate ({100 * self.confidence:.0f}% bootstrap CI)",
            ylabel="invariance rate (fraction of variants)",
        )


def invariant(clean: torch.Tensor, perturbed: torch.Tensor, tolerance: float) -> np.ndarray:
    """Per row: top-1 unchanged and TV(softmax clean, softmax perturbed) ≤ tolerance."""
    p, q = torch.softmax(clean.double(), -1), torch.softmax(perturbed.double(), -1)
    tv = 0.5 * (p - q).abs().sum(-1)
    return ((clean.argmax(-1) == perturbed.argmax(-1)) & (tv <= tolerance)).numpy()


def robustness(
    texts: Sequence[str] | Sequence[torch.Tensor],
    predict: Callable[[list[Any]], torch.Tensor],
    *,
    families: Sequence[str] | None = None,
    per_family: int = 2,
    tolerance: float = 0.1,
    confidence: float = 0.95,
    bootstrap: int = 1000,
    seed: int = 0,
) -> RobustnessResult:
    """Score invariance of ``predict`` (inputs → (n, V) prediction logits) under ``families``
    (default: the text families for strings, :data:`IMAGE_FAMILIES` for image tensors)."""
    images = bool(texts) and isinstance(texts[0], torch.Tensor)
    make: Callable[..., list[Any]] = image_variants if images else variants
    clean = predict(list(texts))
    n, fam = len(texts), list(families if families is not None else IMAGE_FAMILIES if images else FAMILIES)
    inv = np.zeros((n, len(fam)))
    tot = np.zeros((n, len(fam)))
    failures: dict[str, list[dict[str, Any]]] = {f: [] for f in fam}
    for j, family in enumerate(fam):
        jobs = [(i, v) for i, t in enumerate(texts) for v in make(t, family, per_family, seed, i)]
        if not jobs:
            continue
        logits = predict([v for _, v in jobs])
        ok = invariant(clean[[i for i, _ in jobs]], logits, tolerance)
        for (i, v), good, lg in zip(jobs, ok, logits, strict=True):
            inv[i, j] += good
            tot[i, j] += 1
            if not good and len(failures[family]) < 3:
                failures[family].append(
                    {
                        "input": i,
                        "text": None if images else texts[i],
                        "variant": f"{family} variant of image {i}" if images else v,
                        "before": int(clean[i].argmax()),
                        "after": int(lg.argmax()),
                    }
                )
    out = RobustnessResult(tolerance, confidence, n)
    rng = np.random.default_rng([seed, 8])
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=bootstrap).astype(np.float64)  # (B, n)
    alpha = (1.0 - confidence) / 2
    for j, family in enumerate(fam):
        if tot[:, j].sum() == 0:
            continue
        out.families.append(_rate(family, inv[:, j], tot[:, j], weights, alpha, failures[family]))
    if out.families:
        out.overall = _rate("overall", inv.sum(1), tot.sum(1), weights, alpha, [])
    return out


def _rate(
    name: str, inv: np.ndarray, tot: np.ndarray, weights: np.ndarray, alpha: float, failures: list[dict[str, Any]]
) -> FamilyRobustness:
    # Cluster bootstrap over inputs: variants of one input are resampled together.
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = (weights @ inv) / (weights @ tot)
    boot = boot[np.isfinite(boot)]
    rate = float(inv.sum() / tot.sum())
    low, high = (float(np.quantile(boot, alpha)), float(np.quantile(boot, 1 - alpha))) if len(boot) else (rate, rate)
    return FamilyRobustness(name, rate, low, high, int(np.sum(tot > 0)), int(tot.sum()), failures)
