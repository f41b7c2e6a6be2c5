"""Per-unit KS/Wasserstein, BH FDR and MMD agree with their definitions and control errors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from model_forensics.inspection.two_sample import benjamini_hochberg, ks_wasserstein, mmd_test


def test_ks_and_wasserstein_match_scipy_with_ties():
    rng = np.random.default_rng(2)
    a = np.maximum(rng.normal(size=(150, 3)), 0)  # many exact zeros
    b = np.maximum(rng.normal(0.3, 1.0, size=(90, 3)), 0)
    res = ks_wasserstein(a, b)
    for u in range(3):
        ref = stats.ks_2samp(a[:, u], b[:, u], method="asymp")
        assert res.ks[u] == pytest.approx(ref.statistic)
        assert res.p_value[u] == pytest.approx(
            ref.pvalue, rel=0.25, abs=1e-3
        )  # limiting distribution: a little conservative
        assert res.wasserstein[u] == pytest.approx(stats.wasserstein_distance(a[:, u], b[:, u]))


def test_benjamini_hochberg_matches_the_step_up_rule():
    p = np.array([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216])
    rejected, q = benjamini_hochberg(p, 0.05)
    assert rejected.tolist() == [True, True] + [False] * 8
    assert q[0] == pytest.approx(0.01)


def test_fdr_controls_false_discoveries_on_no_shift_data_across_50_seeds():
    # Under the global null BH bounds P(any discovery) by alpha; 50 seeds × 64 units each.
    with_discovery = 0
    for seed in range(50):
        rng = np.random.default_rng(seed)
        ref, cur = rng.normal(size=(200, 64)), rng.normal(size=(200, 64))
        rejected, _ = benjamini_hochberg(ks_wasserstein(ref, cur).p_value, 0.05)
        with_discovery += bool(rejected.any())
    # Bin(50, 0.05): P(X ≥ 7) ≈ 1.2%; the asymptotic KS p-value is slightly conservative.
    assert with_discovery <= 6


def test_mmd_detects_a_mean_shift_and_not_its_absence():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(60, 20))
    assert mmd_test(x, rng.normal(0.6, 1, size=(60, 20)), permutations=200).p_value < 0.01
    null_p = [
        mmd_test(rng.normal(size=(40, 20)), rng.normal(size=(40, 20)), permutations=100, seed=s).p_value
        for s in range(20)
    ]
    assert np.mean(np.array(null_p) < 0.05) <= 0.2
