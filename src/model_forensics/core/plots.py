"""Plots on plain arrays (matplotlib): heatmaps, per-layer lines and bars, drift curves,
CKA matrices and rates with confidence intervals. No model knowledge: every function takes
arrays and labels and returns a :class:`matplotlib.figure.Figure`.

Figures are built without pyplot (no global state, no display, no backend switch: saving
renders on Agg); matplotlib is imported inside the functions, so importing this module
costs nothing. Save with ``fig.savefig("x.png")`` or ``.svg``. Colour maps are perceptual:
viridis for magnitudes, a diverging map centred on zero for signed values; every heatmap
has a colour bar that names its quantity and unit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SEQUENTIAL = "viridis"
DIVERGING = "RdBu_r"


def figure(width: float = 7.0, height: float = 4.5) -> Figure:
    """An empty figure with constrained layout, not registered with pyplot."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _thin_ticks(labels: Sequence[str], limit: int = 32) -> tuple[list[int], list[str]]:
    step = max(1, int(np.ceil(len(labels) / limit)))
    idx = list(range(0, len(labels), step))
    return idx, [labels[i] for i in idx]


def heatmap(
    matrix: np.ndarray,
    *,
    row_labels: Sequence[str],
    col_labels: Sequence[str] | None = None,
    title: str,
    colorbar_label: str,
    xlabel: str = "",
    ylabel: str = "",
    diverging: bool = False,
    vmin: float | None = None,
    vmax: float | None = None,
    annotate: bool = False,
) -> Figure:
    """A labelled heatmap of ``matrix`` (rows × cols) with a colour bar.

    ``diverging=True`` centres a diverging map on zero (signed quantities); otherwise
    viridis. NaN cells are drawn blank. ``annotate`` prints values in small matrices.
    """
    m = np.asarray(matrix, dtype=float)
    fig = figure(max(5.0, min(12.0, 3.0 + 0.06 * m.shape[1])), max(3.0, min(10.0, 1.5 + 0.22 * m.shape[0])))
    ax = fig.add_subplot()
    if diverging:
        bound = float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 1.0
        vmin, vmax = -(bound or 1.0), bound or 1.0
    image = ax.imshow(
        np.ma.masked_invalid(m),
        aspect="auto",
        interpolation="nearest",
        cmap=DIVERGING if diverging else SEQUENTIAL,
        vmin=vmin,
        vmax=vmax,
    )
    fig.colorbar(image, ax=ax, label=colorbar_label)
    ticks, labels = _thin_ticks(list(row_labels))
    ax.set_yticks(ticks, labels, fontsize=7)
    if col_labels is not None:
        ticks, labels = _thin_ticks(list(col_labels))
        ax.set_xticks(ticks, labels, fontsize=7, rotation=90)
    if annotate and m.size <= 400:
        for (i, j), value in np.ndenumerate(m):
            if np.isfinite(value):
                ax.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if value < np.nanmean(m) else "black",
                )
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return fig


def activation_heatmap(
    values: Mapping[str, np.ndarray],
    *,
    title: str,
    colorbar_label: str,
    log10: bool = False,
    floor: float | None = None,
) -> Figure:
    """Per-unit values of several sites as one heatmap: one row per site, one column per
    unit (shorter sites padded blank). ``log10`` plots log₁₀ of the values, with values
    below ``floor`` (zeros included) drawn at log₁₀(floor) so that dead units stay visible."""
    sites = list(values)
    width = max((len(v) for v in values.values()), default=1)
    m = np.full((len(sites), width), np.nan)
    for i, site in enumerate(sites):
        v = np.asarray(values[site], dtype=float)
        if log10:
            if floor is not None:
                v = np.maximum(v, floor)
            v = np.where(v > 0, np.log10(np.where(v > 0, v, 1.0)), np.nan)
        m[i, : len(v)] = v
    return heatmap(m, row_labels=sites, title=title, colorbar_label=colorbar_label, xlabel="unit", ylabel="site")


def layer_lines(
    x_labels: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    title: str,
    ylabel: str,
    xlabel: str = "layer",
    log_y: bool = False,
    markers: bool = True,
) -> Figure:
    """One line per series over an ordered x axis (layers, time windows)."""
    fig = figure()
    ax = fig.add_subplot()
    x = np.arange(len(x_labels))
    for name, ys in series.items():
        ax.plot(x, np.asarray(ys, dtype=float), marker="o" if markers else None, markersize=3, label=name)
    ticks, labels = _thin_ticks(list(x_labels), 24)
    ax.set_xticks(ticks, labels, rotation=60, fontsize=7)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=7, ncol=2 if len(series) > 8 else 1)
    return fig


def drift_plot(
    times: Sequence[str], curves: Mapping[str, Sequence[float]], *, ylabel: str, title: str = "Activation drift"
) -> Figure:
    """Drift curves: one line per layer over the ordered series (time windows, checkpoints),
    coloured by depth along viridis so early and late layers are told apart."""
    from matplotlib import cm, colors

    fig = figure()
    ax = fig.add_subplot()
    x = np.arange(len(times))
    norm = colors.Normalize(vmin=0, vmax=max(1, len(curves) - 1))
    mapper = cm.ScalarMappable(norm=norm, cmap=SEQUENTIAL)
    for i, ys in enumerate(curves.values()):
        ax.plot(
            x,
            np.asarray(ys, dtype=float),
            color=mapper.to_rgba(np.array([i]))[0],
            marker="o",
            markersize=3,
            linewidth=1.2,
        )
    fig.colorbar(mapper, ax=ax, label="layer (depth order)")
    if not any(np.isfinite(np.asarray(ys, dtype=float)).any() for ys in curves.values()):
        ax.text(0.5, 0.5, "no step had enough inputs for the tests", transform=ax.transAxes, ha="center", va="center")
    ax.set_xticks(x, list(times), rotation=45, fontsize=7)
    ax.set_title(title)
    ax.set_xlabel("series step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig


def sensitivity_plot(layers: Sequence[str], families: Mapping[str, Sequence[float]], *, ylabel: str) -> Figure:
    """Layer sensitivity graph: per-layer activation change for each perturbation family."""
    return layer_lines(layers, families, title="Layer sensitivity to input perturbations", ylabel=ylabel, log_y=False)


def cka_matrix(
    matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], *, row_model: str, col_model: str
) -> Figure:
    """Layer × layer linear CKA between two models (0 = unrelated, 1 = same up to rotation
    and scale)."""
    return heatmap(
        matrix,
        row_labels=rows,
        col_labels=cols,
        title="Linear CKA (unbiased) between layers",
        colorbar_label="CKA (dimensionless, 0–1)",
        xlabel=col_model,
        ylabel=row_model,
        vmin=0.0,
        vmax=1.0,
        annotate=len(rows) * len(cols) <= 100,
    )


def layer_bars(
    layers: Sequence[str],
    values: Mapping[str, Sequence[float]],
    *,
    title: str,
    ylabel: str,
    threshold: float | None = None,
) -> Figure:
    """Grouped bars per layer (one bar per named quantity), with an optional threshold line."""
    fig = figure()
    ax = fig.add_subplot()
    x = np.arange(len(layers))
    width = 0.8 / max(1, len(values))
    for i, (name, ys) in enumerate(values.items()):
        ax.bar(x + i * width - 0.4 + width / 2, np.asarray(ys, dtype=float), width, label=name)
    if threshold is not None:
        ax.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ticks, labels = _thin_ticks(list(layers), 32)
    ax.set_xticks(ticks, labels, rotation=60, fontsize=7)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return fig


def rates_with_ci(
    names: Sequence[str],
    rates: Sequence[float],
    low: Sequence[float],
    high: Sequence[float],
    *,
    title: str,
    ylabel: str,
) -> Figure:
    """Horizontal bars with confidence-interval whiskers (robustness per family)."""
    fig = figure(6.0, 1.2 + 0.45 * len(names))
    ax = fig.add_subplot()
    y = np.arange(len(names))
    r = np.asarray(rates, dtype=float)
    err = np.vstack([r - np.asarray(low, dtype=float), np.asarray(high, dtype=float) - r])
    ax.barh(y, r, xerr=np.nan_to_num(err), color="#3b528b", capsize=3)
    ax.set_yticks(y, list(names))
    ax.invert_yaxis()  # first name on top
    ax.set_xlim(0, 1.05)
    ax.set_xlabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return fig


def shift_plot(
    layers: Sequence[str],
    fraction: Sequence[float],
    wasserstein: Sequence[float],
    no_shift_level: Sequence[float],
    *,
    threshold: float,
    title: str = "Distribution shift: reference → current",
) -> Figure:
    """Two panels over the layers: the fraction of units that shift (bars, with the layer
    threshold), and the mean normalised W₁ with its no-shift level (lines)."""
    fig = figure(7.0, 5.5)
    top, bottom = fig.subplots(2, 1, sharex=True)
    x = np.arange(len(layers))
    top.bar(x, np.nan_to_num(np.asarray(fraction, dtype=float)), color="#3b528b")
    top.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"layer shifts above {threshold:g}")
    top.set_ylabel("fraction of units shifted")
    top.set_ylim(0, 1)
    top.legend(fontsize=7)
    top.set_title(title)
    bottom.plot(
        x, np.asarray(wasserstein, dtype=float), marker="o", markersize=3, color="#21918c", label="mean W₁ / σ_ref"
    )
    bottom.plot(x, np.asarray(no_shift_level, dtype=float), linestyle=":", color="gray", label="no-shift level")
    bottom.set_ylabel("W₁ (reference σ units)")
    bottom.legend(fontsize=7)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    ticks, labels = _thin_ticks(list(layers), 32)
    bottom.set_xticks(ticks, labels, rotation=60, fontsize=7)
    return fig


def token_bars(
    labels: Sequence[str],
    values: Sequence[float] | np.ndarray,
    *,
    title: str,
    ylabel: str,
    interval: tuple[float, float] | None = None,
) -> Figure:
    """One bar per labelled item (source tokens, prompts), signed values on a diverging
    colour scale centred on zero; ``interval`` shades a (low, high) band (a bootstrap CI
    of the mean, drawn with its mean line)."""
    from matplotlib import colormaps

    v = np.nan_to_num(np.asarray(values, dtype=float))
    fig = figure(max(5.0, min(14.0, 2.0 + 0.3 * len(v))), 4.0)
    ax = fig.add_subplot()
    bound = float(np.max(np.abs(v))) if v.size and np.max(np.abs(v)) > 0 else 1.0
    ax.bar(np.arange(len(v)), v, color=colormaps[DIVERGING](0.5 + 0.5 * v / bound))
    ax.axhline(0.0, color="black", linewidth=0.8)
    if interval is not None:
        low, high = interval
        ax.axhspan(low, high, color="gray", alpha=0.25, label=f"95% CI of the mean [{low:.3g}, {high:.3g}]")
        ax.axhline(float(np.mean(v)) if v.size else 0.0, color="gray", linestyle="--", linewidth=1)
        ax.legend(fontsize=7)
    ticks, names = _thin_ticks(list(labels), 48)
    ax.set_xticks(ticks, names, rotation=60, fontsize=7, ha="right")
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    return fig
