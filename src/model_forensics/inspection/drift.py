"""Experiment 4 — activation drift across an ordered series (time windows, checkpoints,
fine-tunes).

Every step t of the series is compared with the baseline (the reference inputs when
given, otherwise the first step) with the tests of the shift experiment; the *drift
curve* of a layer is its mean normalised Wasserstein distance W̃(t) over the steps
(docs/metrics.md §4). Each step keeps its own bounded summary, so memory grows with the
number of steps, never with the number of inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.table import Table

from model_forensics.core.config import ShiftConfig
from model_forensics.inspection._json import jsonable
from model_forensics.inspection.collect import Sample
from model_forensics.inspection.shift import ShiftResult, compare
from model_forensics.inspection.summary import ActivationSummary

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def series_steps(samples: Sequence[Sample], windows: int = 5) -> list[tuple[str, list[int]]] | None:
    """The ordered steps of a series: (label, input indices) per step, or None when the
    samples carry neither ``group`` nor ``time``.

    ``group`` defines the steps (ordered by their earliest ``time`` if any, else by first
    appearance); with only ``time``, each distinct time is a step, or — past 20 distinct
    values — ``windows`` equal-count windows in time order.
    """
    if any(s.group is not None for s in samples):
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(samples):
            groups.setdefault(s.group if s.group is not None else "(none)", []).append(i)
        times = {g: [samples[i].time for i in idx if samples[i].time is not None] for g, idx in groups.items()}
        if all(times.values()):
            order = sorted(groups, key=lambda g: _time_key(min(times[g], key=_time_key)))
        else:
            order = list(groups)
        return [(g, groups[g]) for g in order]
    timed = [(i, s.time) for i, s in enumerate(samples) if s.time is not None]
    if not timed:
        return None
    timed.sort(key=lambda it: _time_key(it[1]))
    distinct = sorted({_time_key(t) for _, t in timed})
    if len(distinct) <= 20:
        by_time: dict[Any, list[int]] = {}
        labels: dict[Any, str] = {}
        for i, t in timed:
            by_time.setdefault(_time_key(t), []).append(i)
            labels[_time_key(t)] = str(t)
        return [(labels[k], by_time[k]) for k in distinct]
    steps = []
    for chunk in np.array_split(np.arange(len(timed)), windows):
        if len(chunk):
            first, last = timed[chunk[0]][1], timed[chunk[-1]][1]
            steps.append((f"{first}…{last}", [timed[j][0] for j in chunk]))
    return steps


def _time_key(t: Any) -> tuple[int, Any]:
    if isinstance(t, int | float) and not isinstance(t, bool):
        return (0, float(t))
    return (1, str(t))


@dataclass
class DriftResult:
    """Drift of every inspected site along the series."""

    baseline: str
    steps: list[str]
    step_inputs: list[int]
    comparisons: list[ShiftResult] = field(default_factory=list)  # one per step

    @property
    def sites(self) -> list[str]:
        return [layer.site for layer in self.comparisons[0].layers] if self.comparisons else []

    def curve(self, site: str, metric: str = "mean_wasserstein") -> list[float]:
        """One layer's drift curve over the steps: ``mean_wasserstein`` (W̃, in reference
        σ), ``null_wasserstein`` (its no-shift level), ``fraction_shifted``, ``mmd2`` or ``mmd_p``."""
        out = []
        for comparison in self.comparisons:
            layer = comparison.layer(site)
            value = layer.mean_wasserstein if metric == "mean_wasserstein" else getattr(layer, metric)
            out.append(float("nan") if value is None else float(value))
        return out

    def drifting_layers(self) -> list[str]:
        """Sites that shift (shift-experiment rule) at one or more steps."""
        return [s for s in self.sites if any(c.layer(s).shifted for c in self.comparisons)]

    def to_json(self) -> dict[str, Any]:
        return jsonable(
            {
                "baseline": self.baseline,
                "steps": self.steps,
                "step_inputs": self.step_inputs,
                "drifting_layers": self.drifting_layers(),
                "curves": {
                    s: {
                        m: self.curve(s, m)
                        for m in ("mean_wasserstein", "null_wasserstein", "fraction_shifted", "mmd2", "mmd_p")
                    }
                    for s in self.sites
                },
            }
        )

    def table(self) -> Table:
        t = Table(
            title=f"Activation drift vs baseline '{self.baseline}' (mean W₁/σ; * = layer shifted)", title_justify="left"
        )
        t.add_column("site")
        for step in self.steps:
            t.add_column(step, justify="right")
        for site in self.sites:
            cells = []
            for comparison in self.comparisons:
                layer = comparison.layer(site)
                w = layer.mean_wasserstein
                cells.append("—" if not np.isfinite(w) else f"{w:.3f}{'*' if layer.shifted else ''}")
            t.add_row(site, *cells)
        return t

    def figure(self) -> Figure:
        from model_forensics.core import plots

        return plots.drift_plot(
            self.steps,
            {s: self.curve(s) for s in self.sites},
            ylabel=f"mean W₁ / σ vs '{self.baseline}' (reference std units)",
            title="Activation drift per layer",
        )


def drift(
    baseline_name: str,
    baseline: ActivationSummary,
    steps: Sequence[tuple[str, ActivationSummary]],
    sites: Sequence[str],
    settings: ShiftConfig,
) -> DriftResult:
    """Compare each step's summary with the baseline's."""
    out = DriftResult(baseline_name, [name for name, _ in steps], [s.inputs for _, s in steps])
    for name, summary in steps:
        out.comparisons.append(compare(baseline, summary, sites, settings, what=f"drift step '{name}'"))
    return out
