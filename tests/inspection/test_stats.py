"""Activation statistics equal the two-pass values over every real token row."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from model_forensics.inspection import ModelInspector


class Scaled(nn.Module):
    """layer(x) = x · (1, 2, …, U): known per-unit scale on variable-length sequences."""

    def __init__(self, units: int = 4):
        super().__init__()
        self.layer = nn.Linear(units, units, bias=False)
        with torch.no_grad():
            self.layer.weight.copy_(torch.diag(torch.arange(1.0, units + 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def test_streamed_statistics_equal_the_two_pass_values_on_padded_batches():
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randn((int(n), 4), generator=g) ** 3 for n in torch.randint(3, 12, (50,), generator=g)]
    res = ModelInspector(Scaled()).run(seqs, experiments=["stats"])
    assert res.stats is not None
    layer = res.stats.layer("layer")
    rows = torch.cat(seqs).numpy().astype(np.float64) * np.arange(1, 5)
    assert layer.rows == len(rows)
    np.testing.assert_allclose(layer.unit_mean, rows.mean(0), rtol=1e-6)
    np.testing.assert_allclose(layer.unit_std, rows.std(0, ddof=1), rtol=1e-6)
    np.testing.assert_allclose(layer.unit_kurtosis, stats.kurtosis(rows, axis=0), rtol=1e-5)
    np.testing.assert_allclose(layer.unit_max, rows.max(0), rtol=1e-6)
    assert layer.kurtosis == pytest.approx(stats.kurtosis(rows.reshape(-1)), rel=1e-5)
    assert layer.quantile_rows == 50  # one random token per input
    assert np.all(layer.unit_quantiles["0.01"] <= layer.unit_quantiles["0.99"])
