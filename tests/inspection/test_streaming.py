"""Streaming moments and reservoirs agree with their two-pass definitions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from model_forensics.inspection.streaming import Moments, Reservoir, item_keys


def test_streaming_moments_equal_two_pass_formulas():
    rng = np.random.default_rng(0)
    data = rng.standard_t(5, size=(1000, 3)) * [1, 10, 0.1] + [0, 5, -3]
    acc = Moments(3)
    for chunk in np.array_split(data, [1, 7, 300, 301, 800]):
        acc.update(chunk)
    assert acc.count == 1000
    np.testing.assert_allclose(acc.mean, data.mean(0), rtol=1e-12)
    np.testing.assert_allclose(acc.std, data.std(0, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(acc.kurtosis, stats.kurtosis(data, axis=0), rtol=1e-10)
    np.testing.assert_allclose(acc.skewness, stats.skew(data, axis=0), rtol=1e-10)
    np.testing.assert_array_equal(acc.max, data.max(0))


def test_pooled_moments_treat_all_units_as_one_distribution():
    rng = np.random.default_rng(1)
    data = rng.normal(size=(200, 4)) * [1, 2, 3, 4] + [0, 1, 2, 3]
    acc = Moments(4)
    acc.update(data)
    pooled = acc.pooled()
    flat = data.reshape(-1)
    assert pooled.mean[0] == pytest.approx(flat.mean())
    assert pooled.kurtosis[0] == pytest.approx(stats.kurtosis(flat))


def test_reservoir_is_bounded_and_keeps_the_smallest_keys():
    keys = item_keys(5000, seed=3)
    res = Reservoir(100, 2)
    for start in range(0, 5000, 64):
        ids = np.arange(start, min(start + 64, 5000))
        res.update(np.stack([ids, ids], 1).astype(float), keys[ids], ids)
    assert len(res) == 100 and res.seen == 5000
    assert set(res.ids) == set(np.argsort(keys)[:100])


def test_item_keys_do_not_depend_on_how_many_items_follow():
    np.testing.assert_array_equal(item_keys(10, 7), item_keys(1000, 7)[:10])
