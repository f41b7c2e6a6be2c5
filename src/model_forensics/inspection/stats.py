"""Experiment 2 — activation statistics per layer and per unit, streamed.

Mean, std, skewness, excess kurtosis, min and max come from merged streaming moments
over every real token row (exact to float64 rounding, O(units) memory). Quantiles come
from the bounded reservoir of one random token per input (docs/metrics.md §2 states the
estimand and its error).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.table import Table

from model_forensics.inspection._json import jsonable
from model_forensics.inspection.summary import ActivationSummary

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class LayerStats:
    """Statistics of one site: layer-level scalars (all units pooled) and per-unit arrays."""

    site: str
    rows: int  # token rows seen
    quantile_rows: int  # rows in the quantile reservoir
    mean: float
    std: float
    kurtosis: float
    max_abs: float
    quantiles: dict[str, float]  # layer-level, over the reservoir
    unit_mean: np.ndarray
    unit_std: np.ndarray
    unit_skewness: np.ndarray
    unit_kurtosis: np.ndarray
    unit_min: np.ndarray
    unit_max: np.ndarray
    unit_quantiles: dict[str, np.ndarray]  # q → (U,)

    @property
    def outlier_units(self) -> list[int]:
        """Units whose extreme value lies more than 6 layer standard deviations from the
        layer mean (the "massive activation" units of LLM residual streams)."""
        if not np.isfinite(self.std) or self.std == 0:
            return []
        reach = np.maximum(np.abs(self.unit_max - self.mean), np.abs(self.unit_min - self.mean))
        return [int(u) for u in np.flatnonzero(reach > 6 * self.std)]

    def to_json(self, per_unit: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "site": self.site,
            "rows": self.rows,
            "quantile_rows": self.quantile_rows,
            "mean": self.mean,
            "std": self.std,
            "kurtosis": self.kurtosis,
            "max_abs": self.max_abs,
            "quantiles": self.quantiles,
            "outlier_units": self.outlier_units,
        }
        if per_unit:
            out["units"] = {
                "mean": self.unit_mean,
                "std": self.unit_std,
                "skewness": self.unit_skewness,
                "kurtosis": self.unit_kurtosis,
                "min": self.unit_min,
                "max": self.unit_max,
                "quantiles": self.unit_quantiles,
            }
        return jsonable(out)


@dataclass
class StatsResult:
    """Activation statistics of every inspected site."""

    layers: list[LayerStats] = field(default_factory=list)

    def layer(self, site: str) -> LayerStats:
        return next(layer for layer in self.layers if layer.site == site)

    def to_json(self) -> dict[str, Any]:
        return {"quantile_levels": list(QUANTILES), "layers": [layer.to_json() for layer in self.layers]}

    def table(self) -> Table:
        t = Table(title="Activation statistics (all units of a site pooled)", title_justify="left")
        for col in ("site", "mean", "std", "excess kurtosis", "max |a|", "q01", "median", "q99", "outlier units"):
            t.add_column(col, justify="left" if col == "site" else "right")
        for layer in self.layers:
            t.add_row(
                layer.site,
                f"{layer.mean:.4g}",
                f"{layer.std:.4g}",
                f"{layer.kurtosis:.3g}",
                f"{layer.max_abs:.4g}",
                f"{layer.quantiles.get('0.01', np.nan):.3g}",
                f"{layer.quantiles.get('0.5', np.nan):.3g}",
                f"{layer.quantiles.get('0.99', np.nan):.3g}",
                str(len(layer.outlier_units)),
            )
        return t

    def figure(self) -> Figure:
        from model_forensics.core import plots

        return plots.activation_heatmap(
            {layer.site: layer.unit_std for layer in self.layers},
            title="Per-unit activation standard deviation",
            colorbar_label="log₁₀ std (activation units)",
            log10=True,
        )


def activation_stats(summary: ActivationSummary) -> StatsResult:
    """Turn a streamed summary into :class:`StatsResult`."""
    out = StatsResult()
    qs = np.asarray(QUANTILES)
    for site in summary.sites:
        m = summary.moments[site]
        res = summary.tokens[site]
        pooled = m.pooled()
        unit_q = res.quantiles(qs)
        flat = res.values().reshape(-1).astype(np.float64)
        layer_q = np.quantile(flat, qs) if flat.size else np.full(len(qs), np.nan)
        out.layers.append(
            LayerStats(
                site=site,
                rows=m.count,
                quantile_rows=len(res),
                mean=float(pooled.mean[0]),
                std=float(pooled.std[0]),
                kurtosis=float(pooled.kurtosis[0]),
                max_abs=float(max(np.abs(m.min).max(), np.abs(m.max).max())) if m.count else float("nan"),
                quantiles={str(q): float(v) for q, v in zip(QUANTILES, layer_q, strict=True)},
                unit_mean=m.mean,
                unit_std=m.std,
                unit_skewness=m.skewness,
                unit_kurtosis=m.kurtosis,
                unit_min=m.min,
                unit_max=m.max,
                unit_quantiles={str(q): unit_q[i] for i, q in enumerate(QUANTILES)},
            )
        )
    return out
