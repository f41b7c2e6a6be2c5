"""Representation similarity between two sets of states of the same inputs.

Pure functions: ``x`` (n, d₁) and ``y`` (n, d₂) hold one row per input, in the same
input order. Definitions and formulas: docs/metrics.md.
"""

from __future__ import annotations

import numpy as np


def centered_gram(x: np.ndarray) -> np.ndarray:
    """The linear Gram matrix K = X Xᵀ (n, n) with its diagonal zeroed, as the unbiased
    HSIC estimator needs it (Song et al. 2012)."""
    x = np.asarray(x, dtype=np.float64)
    k = x @ x.T
    np.fill_diagonal(k, 0.0)
    return k


def unbiased_hsic(k: np.ndarray, l_: np.ndarray) -> float:
    """Unbiased HSIC of two zero-diagonal Gram matrices (n ≥ 4).

    HSIC₁ = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n−1)(n−2)) − 2/(n−2) · 1ᵀK̃L̃1] / (n(n−3)).
    """
    n = k.shape[0]
    ones_k = k.sum(axis=0)
    ones_l = l_.sum(axis=0)
    trace = float(np.sum(k * l_))  # tr(KL) for symmetric K, L
    return (trace + ones_k.sum() * ones_l.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * float(ones_k @ ones_l)) / (
        n * (n - 3)
    )


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased linear CKA between two representations of the same n ≥ 4 inputs.

    CKA = HSIC₁(K, L) / √(HSIC₁(K, K) · HSIC₁(L, L)) with K = XXᵀ, L = YYᵀ. Equals 1 for
    identical representations and is invariant to orthogonal transforms and isotropic
    scaling of either side (Kornblith et al. 2019; Nguyen et al. 2021 for the debiasing).
    """
    return cka_from_grams(centered_gram(x), centered_gram(y))


def cka_from_grams(k: np.ndarray, l_: np.ndarray, hkk: float | None = None, hll: float | None = None) -> float:
    """CKA from precomputed zero-diagonal Gram matrices (self-HSICs may be passed in)."""
    if k.shape[0] < 4:
        return float("nan")
    hkk = unbiased_hsic(k, k) if hkk is None else hkk
    hll = unbiased_hsic(l_, l_) if hll is None else hll
    if hkk <= 0 or hll <= 0:
        return float("nan")
    return float(unbiased_hsic(k, l_) / np.sqrt(hkk * hll))


def procrustes_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Orthogonal Procrustes distance d² = 2 − 2‖X̂ᵀŶ‖_* ∈ [0, 2].

    X̂, Ŷ are the column-centred representations scaled to unit Frobenius norm; ‖·‖_* is
    the nuclear norm (sum of singular values), the best alignment over orthogonal maps.
    Widths may differ (the narrower side is implicitly zero-padded). 0 means one
    representation is a rotation/reflection of the other up to scale.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    if nx == 0 or ny == 0:
        return float("nan")
    nuclear = float(np.linalg.svd((x / nx).T @ (y / ny), compute_uv=False).sum())
    return float(max(0.0, 2.0 - 2.0 * nuclear))
