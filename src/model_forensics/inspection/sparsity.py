"""Experiment 1 — sparsity: exact zeros, near-zeros and dormant units per layer.

For site ℓ with units u and real token rows t (docs/metrics.md §1):

    zero_fraction(ℓ)      = #{a_tu = 0} / (T·U)
    near_zero_fraction(ℓ) = #{|a_tu| < ε} / (T·U)
    r_u                   = mean_t |a_tu| / mean_u' mean_t |a_tu'|
    dormant(ℓ)            = {u : r_u < τ}          (τ = 0.025 by default)

All counts stream: memory is O(units) per site.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.table import Table

from model_forensics.core.records import fields_json
from model_forensics.inspection._json import jsonable
from model_forensics.inspection.collect import Recorded

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class SparsityLayer:
    """Sparsity of one site."""

    site: str
    units: int
    rows: int
    zero_fraction: float
    near_zero_fraction: float
    dormant_units: list[int]
    relative_mean_abs: np.ndarray  # (U,) r_u
    unit_zero_fraction: np.ndarray  # (U,) fraction of rows where the unit is exactly 0

    def to_json(self) -> dict[str, Any]:
        return jsonable(fields_json(self))


@dataclass
class SparsityResult:
    """Per-site sparsity with the thresholds used."""

    epsilon: float
    tau: float
    layers: list[SparsityLayer] = field(default_factory=list)

    @property
    def dormant(self) -> list[str]:
        """Every dormant unit as a selector, e.g. ``blocks.0.mlp.post[13]``."""
        return [f"{layer.site}[{u}]" for layer in self.layers for u in layer.dormant_units]

    def layer(self, site: str) -> SparsityLayer:
        return next(layer for layer in self.layers if layer.site == site)

    def to_json(self) -> dict[str, Any]:
        return fields_json(self, dormant=self.dormant, layers=[layer.to_json() for layer in self.layers])

    def table(self) -> Table:
        t = Table(title=f"Sparsity (ε = {self.epsilon:g}, dormant: r < τ = {self.tau:g})", title_justify="left")
        for col in ("site", "units", "exact zeros", f"|a| < {self.epsilon:g}", "dormant units"):
            t.add_column(col, justify="left" if col in ("site", "dormant units") else "right")
        for layer in self.layers:
            listed = ", ".join(map(str, layer.dormant_units[:8])) + (" …" if len(layer.dormant_units) > 8 else "")
            t.add_row(
                layer.site,
                str(layer.units),
                f"{100 * layer.zero_fraction:.2f}%",
                f"{100 * layer.near_zero_fraction:.2f}%",
                f"{len(layer.dormant_units)}" + (f" ({listed})" if listed else ""),
            )
        return t

    def figure(self) -> Figure:
        from model_forensics.core import plots

        return plots.activation_heatmap(
            {layer.site: layer.relative_mean_abs for layer in self.layers},
            title=f"Unit activity: mean |a| / layer mean (dormant below τ = {self.tau:g}, dark)",
            colorbar_label="log₁₀ relative mean |a|",
            log10=True,
            floor=self.tau / 10,
        )


class SparsityCollector:
    """Streams the counts behind :class:`SparsityResult` over ``sites``.

    ``exclude`` (bool per global input index) marks held-out inputs: they count for the
    result but not for :attr:`selection_mean_abs`, which pruning proposals read so that
    their verification inputs were never used to choose them.
    """

    def __init__(self, sites: Sequence[str], epsilon: float, tau: float, exclude: np.ndarray | None = None):
        self.sites = list(sites)
        self.epsilon = epsilon
        self.tau = tau
        self.exclude = exclude
        self.rows: dict[str, int] = {}
        self.zeros: dict[str, np.ndarray] = {}
        self.near: dict[str, np.ndarray] = {}
        self.abs_sum: dict[str, np.ndarray] = {}
        self.select_sum: dict[str, np.ndarray] = {}
        self.select_rows: dict[str, int] = {}

    def update(self, recorded: Recorded) -> None:
        held = self.exclude[recorded.index] if self.exclude is not None else np.zeros(len(recorded.index), dtype=bool)
        for site in self.sites:
            if site not in recorded.sites:
                continue
            rows, mask = recorded.sites[site], recorded.masks[site]
            x = rows[mask].double().numpy()  # (n_real, U)
            if site not in self.rows:
                u = x.shape[1]
                self.rows[site], self.select_rows[site] = 0, 0
                self.zeros[site], self.near[site] = np.zeros(u), np.zeros(u)
                self.abs_sum[site], self.select_sum[site] = np.zeros(u), np.zeros(u)
            a = np.abs(x)
            self.rows[site] += x.shape[0]
            self.zeros[site] += (x == 0).sum(0)
            self.near[site] += (a < self.epsilon).sum(0)
            self.abs_sum[site] += a.sum(0)
            keep = (~held)[:, None].repeat(mask.shape[1], 1)[mask.numpy()]
            self.select_rows[site] += int(keep.sum())
            self.select_sum[site] += a[keep].sum(0)

    def merge(self, other: SparsityCollector) -> None:
        """Fold in the counts of other inputs (a shard of a distributed run): counts and sums add."""
        for site, rows in other.rows.items():
            if site not in self.rows:
                self.rows[site], self.select_rows[site] = 0, 0
                for acc in (self.zeros, self.near, self.abs_sum, self.select_sum):
                    acc[site] = np.zeros_like(other.abs_sum[site])
            self.rows[site] += rows
            self.select_rows[site] += other.select_rows[site]
            self.zeros[site] += other.zeros[site]
            self.near[site] += other.near[site]
            self.abs_sum[site] += other.abs_sum[site]
            self.select_sum[site] += other.select_sum[site]

    def selection_mean_abs(self, site: str) -> np.ndarray:
        """Per-unit mean |a| over the non-held-out rows."""
        return self.select_sum[site] / max(1, self.select_rows[site])

    def result(self) -> SparsityResult:
        out = SparsityResult(self.epsilon, self.tau)
        for site in self.sites:
            if site not in self.rows:
                continue
            n = max(1, self.rows[site])
            mean_abs = self.abs_sum[site] / n
            rel = relative_activity(mean_abs)
            u = len(mean_abs)
            out.layers.append(
                SparsityLayer(
                    site=site,
                    units=u,
                    rows=self.rows[site],
                    zero_fraction=float(self.zeros[site].sum() / (n * u)),
                    near_zero_fraction=float(self.near[site].sum() / (n * u)),
                    dormant_units=[int(i) for i in np.flatnonzero(rel < self.tau)],
                    relative_mean_abs=rel,
                    unit_zero_fraction=self.zeros[site] / n,
                )
            )
        return out


def relative_activity(mean_abs: np.ndarray) -> np.ndarray:
    """r_u = mean|a_u| / mean over units of mean|a_u'| (0 everywhere for an all-zero layer)."""
    layer_mean = float(mean_abs.mean()) if len(mean_abs) else 0.0
    return mean_abs / layer_mean if layer_mean > 0 else np.zeros_like(mean_abs)
