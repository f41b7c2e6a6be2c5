"""Compressibility features: the Gram-matrix spectrum equals the SVD's, heads batch exactly."""

from __future__ import annotations

import math

import pytest
import torch

from model_forensics.rca.features import FEATURES, features, head_features, spectral_entropy


def _svd_entropy(x: torch.Tensor) -> float:
    """The seed's definition: singular values of x centred over tokens."""
    s = torch.linalg.svdvals(x - x.mean(dim=0, keepdim=True))
    p = s.square() / s.square().sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum()) / math.log(min(x.shape))


@pytest.mark.parametrize("shape", [(12, 128), (128, 12), (40, 40), (3, 2)])
def test_spectral_entropy_equals_the_svd_definition(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g) * torch.rand(shape[1], generator=g) * 5 + 2
    assert spectral_entropy(x) == pytest.approx(_svd_entropy(x), abs=1e-6)


def test_low_rank_activation_has_low_entropy() -> None:
    g = torch.Generator().manual_seed(1)
    rank1 = torch.randn(20, 1, generator=g) @ torch.randn(1, 64, generator=g)
    spread = torch.randn(20, 64, generator=g)
    assert spectral_entropy(rank1) < 0.1 < 0.9 < spectral_entropy(spread)


def test_head_features_equal_per_head_features() -> None:
    z = torch.randn(10, 4, 16, generator=torch.Generator().manual_seed(2))  # (T, H, d_head)
    batched = head_features(z)
    for h in range(4):
        one = features(z[:, h])
        for name in FEATURES:
            assert batched[h][name] == pytest.approx(one[name], abs=1e-9)
