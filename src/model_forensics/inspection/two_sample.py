"""Two-sample statistics: per-unit KS and Wasserstein, Benjamini–Hochberg, MMD².

Pure functions on arrays; no model knowledge. Definitions and formulas: docs/metrics.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class UnitTests:
    """Per-unit two-sample results for one layer (arrays of length ``units``)."""

    ks: np.ndarray  # KS statistic D = sup |F_ref − F_cur|
    p_value: np.ndarray  # asymptotic KS p-value
    wasserstein: np.ndarray  # W1(ref, cur), in activation units


def ks_wasserstein(ref: np.ndarray, cur: np.ndarray) -> UnitTests:
    """KS statistic, its p-value and W1 for every column of ``ref`` (n, U) vs ``cur`` (m, U).

    One sort of the pooled sample per unit gives both empirical CDFs; ties (exact zeros of
    ReLU units, say) are handled by evaluating the CDFs only after the last of equal values.
    The p-value is the limiting Kolmogorov distribution, P(K > √(n_e)·D) with the effective
    sample size n_e = n·m/(n+m). It is vectorised and ~10⁴× faster than the finite-n
    ``kstwo`` tail that ``scipy.stats.ks_2samp(method="asymp")`` uses, and slightly more
    conservative at small n (within ~15 % of it for n_e ≈ 50, closer as n_e grows).
    """
    n, m = ref.shape[0], cur.shape[0]
    pooled = np.concatenate([ref, cur]).astype(np.float64)  # (n+m, U)
    from_ref = np.concatenate([np.ones(n), np.zeros(m)])
    order = np.argsort(pooled, axis=0, kind="stable")
    values = np.take_along_axis(pooled, order, axis=0)
    is_ref = from_ref[order]  # (n+m, U)
    cdf_ref = np.cumsum(is_ref, axis=0) / n
    cdf_cur = np.cumsum(1.0 - is_ref, axis=0) / m
    gap = np.abs(cdf_ref - cdf_cur)
    last_of_tie = np.ones_like(values, dtype=bool)
    last_of_tie[:-1] = values[1:] != values[:-1]
    d = np.where(last_of_tie, gap, 0.0).max(axis=0)
    # W1 = ∫ |F_ref − F_cur| dx: the gap is constant between consecutive pooled values.
    w = (gap[:-1] * np.diff(values, axis=0)).sum(axis=0)
    from scipy.special import kolmogorov  # the survival function of the Kolmogorov distribution

    p = kolmogorov(np.sqrt(n * m / (n + m)) * d)
    return UnitTests(ks=d, p_value=np.clip(p, 0.0, 1.0), wasserstein=w)


def benjamini_hochberg(p: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """BH step-up: (rejected mask, adjusted p-values / q-values) for a family of tests.

    Controls the expected false-discovery proportion at ``alpha`` for independent or
    positively dependent tests (Benjamini & Hochberg 1995; Benjamini & Yekutieli 2001).
    """
    p = np.asarray(p, dtype=np.float64)
    k = len(p)
    if k == 0:
        return np.zeros(0, dtype=bool), np.zeros(0)
    order = np.argsort(p)
    ranked = p[order] * k / np.arange(1, k + 1)
    q_sorted = np.minimum.accumulate(ranked[::-1])[::-1]
    q = np.empty(k)
    q[order] = np.minimum(q_sorted, 1.0)
    return q <= alpha, q


@dataclass
class MMDTest:
    """Layer-level kernel two-sample test on pooled input representations."""

    mmd2: float  # unbiased MMD² estimate (can be slightly negative under the null)
    p_value: float  # permutation p-value, (1 + #{perm ≥ observed}) / (1 + permutations)
    bandwidth: float  # RBF σ (median pairwise distance of the pooled sample)
    components: int  # PCA dimensions used


def mmd_test(x: np.ndarray, y: np.ndarray, *, components: int = 32, permutations: int = 200, seed: int = 0) -> MMDTest:
    """MMD² (RBF kernel, median bandwidth) between ``x`` (n, d) and ``y`` (m, d), with a
    permutation p-value over inputs.

    Both samples are first projected on the top ``components`` principal directions of
    the pooled sample. PCA, bandwidth and kernel matrix depend on the pooled sample only,
    never on which side a row came from, so permuting labels gives an exact test.
    """
    n, m = x.shape[0], y.shape[0]
    z = np.concatenate([x, y]).astype(np.float64)
    z = z - z.mean(axis=0)
    k = max(1, min(components, z.shape[0] - 1, z.shape[1]))
    # PCA by SVD of the centred pooled sample: rows · right singular vectors.
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    z = z @ vt[:k].T  # (n+m, k)
    sq = np.sum(z * z, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0.0)
    off = d2[np.triu_indices(n + m, 1)]
    sigma = float(np.sqrt(np.median(off))) if off.size and np.median(off) > 0 else 1.0
    kernel = np.exp(-d2 / (2.0 * sigma * sigma))

    rng = np.random.default_rng(seed)
    labels = np.zeros((n + m, permutations + 1))
    labels[:n, 0] = 1.0
    for j in range(1, permutations + 1):
        labels[rng.permutation(n + m)[:n], j] = 1.0
    mmd = _unbiased_mmd2(kernel, labels, n, m)
    observed = float(mmd[0])
    p = (1.0 + float(np.sum(mmd[1:] >= observed))) / (1.0 + permutations)
    return MMDTest(mmd2=observed, p_value=p, bandwidth=sigma, components=k)


def _unbiased_mmd2(kernel: np.ndarray, a: np.ndarray, n: int, m: int) -> np.ndarray:
    # a: (N, P) indicator of the first sample for P labelings; the diagonal of an RBF
    # kernel is 1, so Σ_{i≠j} k over one side is aᵀKa − (side size).
    b = 1.0 - a
    ka = kernel @ a
    kb = kernel @ b
    sxx = np.sum(a * ka, axis=0) - n
    syy = np.sum(b * kb, axis=0) - m
    sxy = np.sum(b * ka, axis=0)
    mmd2: np.ndarray = sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2.0 * sxy / (n * m)  # (P,)
    return mmd2
