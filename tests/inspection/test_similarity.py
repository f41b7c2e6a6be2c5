"""CKA and Procrustes: identity, invariances and unrelated representations."""

from __future__ import annotations

import numpy as np
import pytest

from model_forensics.inspection.similarity import linear_cka, procrustes_distance


def test_cka_of_a_representation_with_itself_is_one_and_invariant():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(50, 12)) @ rng.normal(size=(12, 12))
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, x @ q) == pytest.approx(1.0)
    assert linear_cka(x, 7.5 * x) == pytest.approx(1.0)
    assert abs(linear_cka(x, rng.normal(size=(50, 12)))) < 0.2


def test_procrustes_distance_is_zero_for_rotations_and_positive_otherwise():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(40, 8))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert procrustes_distance(x, 3 * x @ q) == pytest.approx(0.0, abs=1e-9)
    assert procrustes_distance(x, rng.normal(size=(40, 8))) > 0.5
