"""Metrics on output scores: pure tensor maths, no model knowledge.

``kl_divergence(p_logits, q_logits)`` is KL(softmax(p) ‖ softmax(q)) in nats along the last
axis: Σ_v p_v (log p_v − log q_v), computed from log-softmax in ``dtype`` (float32 for
replay-side comparisons; inspection passes float64). ``separation_auroc(pos, neg)`` and
``best_accuracy_threshold(pos, neg)`` read how well scores separate two sets.
"""

from __future__ import annotations

import itertools

import torch


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """KL(p ‖ q) per row, in nats. ``p_logits``, ``q_logits``: (..., V) → (...)."""
    p = torch.log_softmax(p_logits.to(dtype), -1)
    q = torch.log_softmax(q_logits.to(dtype), -1)
    return (p.exp() * (p - q)).sum(-1)


def separation_auroc(pos: list[float], neg: list[float]) -> float:
    """P(score of a positive > score of a negative), ties counted half (scikit-learn's ROC
    AUC); NaN when either side is empty."""
    from sklearn.metrics import roc_auc_score

    if not pos or not neg:
        return float("nan")
    return float(roc_auc_score([1] * len(pos) + [0] * len(neg), pos + neg))


def threshold_cuts(scores: list[float]) -> list[float]:
    """The thresholds that split ``scores`` differently under "score > t", ascending: one
    below them all and the midpoints between distinct scores (not one above them all)."""
    cuts = sorted(set(scores))
    return [cuts[0] - 1.0] + [(a + b) / 2 for a, b in itertools.pairwise(cuts)]


def best_accuracy_threshold(pos: list[float], neg: list[float]) -> tuple[float, float]:
    """The threshold t of "score > t ⇔ positive" with the best accuracy (ties: the higher t;
    candidates: :func:`threshold_cuts`), and that accuracy."""
    candidates = threshold_cuts(pos + neg)

    def accuracy(t: float) -> float:
        return (sum(x > t for x in pos) + sum(x <= t for x in neg)) / (len(pos) + len(neg))

    best = max(candidates, key=lambda t: (accuracy(t), t))
    return best, accuracy(best)
