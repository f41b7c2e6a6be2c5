"""Experiment 7 — failure attribution: which layers and units separate failing inputs
from passing ones, cross-checked by ablation (docs/metrics.md §7).

* per layer, a linear probe (standardised features, L2 logistic regression) on per-input
  mean-pooled states; its stratified k-fold *out-of-fold* AUROC says how well the layer
  separates fail from pass;
* per unit, Cohen's d = (μ_fail − μ_pass) / s_pooled from streamed class moments;
* cross-check: on the failing inputs, patch the top-k |d| units of the best layer (before
  the readout layer) to their passing mean and measure how much of the fail–pass gap
  closes at the readout layer (the last inspected site), along its class-mean axis
  v = μ_fail − μ_pass:  gap_closed = mean_i (x_i − x_i^patched)·v / ‖v‖² — compared
  with patching k random units of the same layer. The finding is *confirmed* when the
  best layer separates the classes (out-of-fold AUROC ≥ ``min_auroc``) and the top units
  close at least ``margin`` more of the gap than the random ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.table import Table

from model_forensics.core.config import FailureAttributionConfig
from model_forensics.inspection._json import jsonable
from model_forensics.inspection.collect import Recorded, Sample
from model_forensics.inspection.streaming import Moments, Reservoir
from model_forensics.inspection.summary import pooled_rows

# readout(indices, site or None, units, values) → pooled readout states (n, U) of those inputs
Readout = Callable[[list[int], str | None, list[int], np.ndarray], np.ndarray]

if TYPE_CHECKING:
    from matplotlib.figure import Figure


AttributionSettings = FailureAttributionConfig  # the ``inspection.attribution`` config section


@dataclass
class LayerAttribution:
    site: str
    auroc: float  # out-of-fold probe AUROC
    top_units: list[tuple[int, float]]  # (unit, Cohen's d), largest |d| first
    max_abs_effect: float


@dataclass
class AblationCheck:
    """Does patching the top units to their passing mean make failing inputs look passing?"""

    site: str
    auroc: float  # out-of-fold probe AUROC of the patched layer
    units: list[int]
    random_units: list[int]
    readout: str
    inputs: int
    gap_closed_top: float  # fraction of the readout's fail–pass gap closed by the top units
    gap_closed_random: float  # … by as many random units
    confirmed: bool


@dataclass
class AttributionResult:
    passing: int
    failing: int
    layers: list[LayerAttribution] = field(default_factory=list)
    ablation: AblationCheck | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def best_site(self) -> str | None:
        return max(self.layers, key=lambda la: (la.auroc, la.max_abs_effect)).site if self.layers else None

    def to_json(self) -> dict[str, Any]:
        ab = None
        if self.ablation is not None:
            ab = vars(self.ablation)
        return jsonable(
            {
                "passing": self.passing,
                "failing": self.failing,
                "best_site": self.best_site,
                "layers": [
                    {
                        "site": la.site,
                        "auroc": la.auroc,
                        "max_abs_effect": la.max_abs_effect,
                        "top_units": [{"unit": u, "cohens_d": d} for u, d in la.top_units],
                    }
                    for la in self.layers
                ],
                "ablation": ab,
                "skipped": self.skipped,
            }
        )

    def table(self) -> Table:
        t = Table(
            title=f"Failure attribution ({self.failing} failing vs {self.passing} passing inputs)", title_justify="left"
        )
        for col in ("site", "probe AUROC", "max |d|", "top units (Cohen's d)"):
            t.add_column(col, justify="left" if col in ("site", "top units (Cohen's d)") else "right")
        for la in self.layers:
            tops = ", ".join(f"{u} ({d:+.2f})" for u, d in la.top_units[:4])
            t.add_row(la.site, f"{la.auroc:.3f}", f"{la.max_abs_effect:.2f}", tops)
        if self.ablation is not None:
            a = self.ablation
            verdict = "confirmed" if a.confirmed else "NOT confirmed"
            t.caption = (
                f"ablation at {a.site}: patching the top {len(a.units)} units to their passing mean closes {100 * a.gap_closed_top:.0f}% "
                f"of the fail–pass gap at {a.readout} (random units: {100 * a.gap_closed_random:.0f}%) on {a.inputs} failing inputs — {verdict}"
            )
        return t

    def figure(self) -> Figure:
        from model_forensics.core import plots

        return plots.layer_bars(
            [la.site for la in self.layers],
            {"probe AUROC (out-of-fold)": [la.auroc for la in self.layers]},
            title="Which layers separate failing from passing inputs",
            ylabel="AUROC (0.5 = chance)",
            threshold=0.5,
        )


class AttributionCollector:
    """Streams class-conditional moments and a labelled reservoir of pooled states."""

    def __init__(self, sites: Sequence[str], samples: Sequence[Sample], capacity: int, keys: np.ndarray):
        self.sites = list(sites)
        self.labels = np.array([-1 if s.passed is None else int(not s.passed) for s in samples])  # 1 = failing
        self.capacity = capacity
        self.keys = keys
        self.moments: dict[str, tuple[Moments, Moments]] = {}
        self.pooled: dict[str, Reservoir] = {}

    @property
    def counts(self) -> tuple[int, int]:
        return int(np.sum(self.labels == 0)), int(np.sum(self.labels == 1))

    def update(self, recorded: Recorded) -> None:
        lab = self.labels[recorded.index]
        keep = np.flatnonzero(lab >= 0)
        if len(keep) == 0:
            return
        idx = recorded.index[keep]
        for site in self.sites:
            if site not in recorded.sites:
                continue
            pooled = pooled_rows(recorded.sites[site], recorded.masks[site]).numpy()[keep]  # (n, U)
            if site not in self.moments:
                self.moments[site] = (Moments(pooled.shape[1]), Moments(pooled.shape[1]))
                self.pooled[site] = Reservoir(self.capacity, pooled.shape[1])
            self.moments[site][0].update(pooled[lab[keep] == 0])
            self.moments[site][1].update(pooled[lab[keep] == 1])
            self.pooled[site].update(pooled, self.keys[idx], idx)

    def merge(self, other: AttributionCollector) -> None:
        """Fold in the moments and reservoir of other inputs (a shard of a distributed run)."""
        for site, (passing, failing) in other.moments.items():
            if site not in self.moments:
                self.moments[site] = (Moments(passing.units), Moments(passing.units))
                self.pooled[site] = Reservoir(self.capacity, passing.units)
            self.moments[site][0].merge(passing)
            self.moments[site][1].merge(failing)
            self.pooled[site].merge(other.pooled[site])


def cohens_d(passing: Moments, failing: Moments) -> np.ndarray:
    """(μ_fail − μ_pass) / s_pooled per unit, s²_pooled = (M2_pass + M2_fail) / (n_pass + n_fail − 2)."""
    dof = passing.count + failing.count - 2
    s = np.sqrt((passing.m2 + failing.m2) / max(dof, 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(s > 0, (failing.mean - passing.mean) / s, 0.0)


def probe_auroc(x: np.ndarray, y: np.ndarray, folds: int, seed: int) -> float:
    """Out-of-fold AUROC of a standardised L2 logistic-regression probe."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    k = int(min(folds, np.bincount(y).min()))
    scores = np.zeros(len(y))
    for train, test in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(x, y):
        scores[test] = _probe(x[train], y[train]).decision_function(x[test])
    return float(roc_auc_score(y, scores))


def _probe(x: np.ndarray, y: np.ndarray) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)).fit(x, y)


def attribution(
    collector: AttributionCollector, readout: Readout | None, settings: FailureAttributionConfig
) -> AttributionResult:
    """Probe every site, rank units by effect size, and cross-check by ablation."""
    n_pass, n_fail = collector.counts
    out = AttributionResult(n_pass, n_fail)
    if min(n_pass, n_fail) < settings.min_per_class:
        out.skipped["attribution"] = (
            f"needs ≥ {settings.min_per_class} passing and failing inputs (a 'passed' field), got {n_pass} passing and {n_fail} failing"
        )
        return out
    labels = collector.labels
    for site in collector.sites:
        if site not in collector.pooled:
            continue
        res = collector.pooled[site]
        y = labels[res.ids]
        if min(np.sum(y == 0), np.sum(y == 1)) < 2:
            continue
        d = cohens_d(*collector.moments[site])
        order = np.argsort(-np.abs(d))[: settings.top_units]
        out.layers.append(
            LayerAttribution(
                site=site,
                auroc=probe_auroc(res.values().astype(np.float64), y, settings.folds, settings.seed),
                top_units=[(int(u), float(d[u])) for u in order],
                max_abs_effect=float(np.abs(d).max()) if len(d) else 0.0,
            )
        )
    if readout is not None and len(out.layers) >= 2:
        out.ablation = _ablation_check(collector, out, readout, settings)
    elif readout is not None:
        out.skipped["ablation check"] = "needs at least two inspected layers (one to patch, a later one to read out)"
    return out


def _ablation_check(
    collector: AttributionCollector, out: AttributionResult, readout: Readout, s: FailureAttributionConfig
) -> AblationCheck:
    readout_site = out.layers[-1].site
    best = max(out.layers[:-1], key=lambda la: (la.auroc, la.max_abs_effect))
    res = collector.pooled[readout_site]
    failing = [int(i) for i in res.ids[collector.labels[res.ids] == 1][: s.max_ablation_inputs]]
    pass_r, fail_r = collector.moments[readout_site]
    axis = fail_r.mean - pass_r.mean  # (U,) the readout's class-mean axis
    norm2 = float(axis @ axis) or 1.0
    units = [u for u, _ in best.top_units]
    width = collector.moments[best.site][0].units
    rng = np.random.default_rng([s.seed, 7])
    pool = np.setdiff1d(np.arange(width), units)
    random_units = [int(u) for u in rng.choice(pool, size=min(len(units), len(pool)), replace=False)]
    pass_mean = collector.moments[best.site][0].mean

    clean = readout(failing, None, [], np.empty(0)).astype(np.float64)

    def gap_closed(patched: np.ndarray) -> float:
        return float(np.mean((clean - patched.astype(np.float64)) @ axis) / norm2)

    top = gap_closed(readout(failing, best.site, units, pass_mean[units]))
    rand = gap_closed(readout(failing, best.site, random_units, pass_mean[random_units]))
    return AblationCheck(
        site=best.site,
        auroc=best.auroc,
        units=units,
        random_units=random_units,
        readout=readout_site,
        inputs=len(failing),
        gap_closed_top=top,
        gap_closed_random=rand,
        confirmed=best.auroc >= s.min_auroc and top - rand >= s.margin,
    )
