"""Experiment 3 — distribution shift between reference and current inputs.

Per unit u of site ℓ (docs/metrics.md §3), on the reservoirs of one random token per
input (independent across inputs):

    W̃_u  = W1(ref_u, cur_u) / σ_ref,u            normalised Wasserstein distance
    D_u, p_u                                      two-sample KS statistic and p-value
    q_u  = BH-adjusted p_u within the layer       Benjamini–Hochberg FDR
    u shifts    ⇔ q_u ≤ α and W̃_u ≥ min_effect
    ℓ shifts    ⇔ (#shifting units / U) > 0.2

and per layer, on per-input mean-pooled states reduced by PCA, the unbiased MMD² with an
RBF kernel (median-distance bandwidth) and a permutation p-value over inputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.table import Table

from model_forensics.core.config import ShiftConfig
from model_forensics.inspection._json import jsonable
from model_forensics.inspection.summary import ActivationSummary
from model_forensics.inspection.two_sample import benjamini_hochberg, ks_wasserstein, mmd_test

if TYPE_CHECKING:
    from matplotlib.figure import Figure


ShiftSettings = ShiftConfig  # the ``inspection.shift`` config section


@dataclass
class LayerShift:
    """Shift of one site between two sets of inputs."""

    site: str
    units: int
    n_ref: int  # independent samples per unit (inputs in the token reservoir)
    n_cur: int
    unit_wasserstein: np.ndarray | None  # (U,) W̃_u, in reference standard deviations
    unit_ks: np.ndarray | None
    unit_q: np.ndarray | None  # BH-adjusted p-values
    shifted_units: list[int]
    fraction_shifted: float | None
    shifted: bool
    null_wasserstein: float | None = None  # mean W̃ after randomly relabelling the pooled sample: the noise floor
    mmd2: float | None = None
    mmd_p: float | None = None
    mmd_inputs: tuple[int, int] = (0, 0)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def mean_wasserstein(self) -> float:
        return float(np.mean(self.unit_wasserstein)) if self.unit_wasserstein is not None else float("nan")

    def to_json(self) -> dict[str, Any]:
        return jsonable(
            {
                "site": self.site,
                "units": self.units,
                "n_ref": self.n_ref,
                "n_cur": self.n_cur,
                "shifted": self.shifted,
                "fraction_shifted": self.fraction_shifted,
                "shifted_units": self.shifted_units,
                "mean_normalised_wasserstein": self.mean_wasserstein,
                "null_normalised_wasserstein": self.null_wasserstein,
                "mmd2": self.mmd2,
                "mmd_p": self.mmd_p,
                "mmd_inputs": list(self.mmd_inputs),
                "unit_normalised_wasserstein": self.unit_wasserstein,
                "unit_ks": self.unit_ks,
                "unit_q": self.unit_q,
                "skipped": self.skipped,
            }
        )


@dataclass
class ShiftResult:
    """Reference-vs-current shift of every inspected site."""

    settings: ShiftConfig
    layers: list[LayerShift] = field(default_factory=list)

    @property
    def shifted_layers(self) -> list[str]:
        return [layer.site for layer in self.layers if layer.shifted]

    def layer(self, site: str) -> LayerShift:
        return next(layer for layer in self.layers if layer.site == site)

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": self.settings.model_dump(),
            "shifted_layers": self.shifted_layers,
            "layers": [layer.to_json() for layer in self.layers],
        }

    def table(self) -> Table:
        s = self.settings
        t = Table(
            title=f"Distribution shift (BH FDR α = {s.alpha:g}; layer shifts when > {100 * s.layer_fraction:.0f}% of units do)",
            title_justify="left",
        )
        for col in ("site", "units shifted", "mean W₁/σ", "(no-shift level)", "MMD²", "MMD p", "verdict"):
            t.add_column(col, justify="left" if col in ("site", "verdict") else "right")
        for layer in self.layers:
            frac = "—" if layer.fraction_shifted is None else f"{100 * layer.fraction_shifted:.1f}%"
            verdict = (
                "[bold red]SHIFTED[/]" if layer.shifted else ("skipped" if layer.fraction_shifted is None else "ok")
            )
            t.add_row(
                layer.site,
                frac,
                f"{layer.mean_wasserstein:.3f}",
                "—" if layer.null_wasserstein is None else f"{layer.null_wasserstein:.3f}",
                "—" if layer.mmd2 is None else f"{layer.mmd2:.4f}",
                "—" if layer.mmd_p is None else f"{layer.mmd_p:.3f}",
                verdict,
            )
        return t

    def figure(self) -> Figure:
        from model_forensics.core import plots

        return plots.shift_plot(
            [layer.site for layer in self.layers],
            [np.nan if layer.fraction_shifted is None else layer.fraction_shifted for layer in self.layers],
            [layer.mean_wasserstein for layer in self.layers],
            [np.nan if layer.null_wasserstein is None else layer.null_wasserstein for layer in self.layers],
            threshold=self.settings.layer_fraction,
        )


def compare(
    ref: ActivationSummary,
    cur: ActivationSummary,
    sites: Sequence[str],
    settings: ShiftConfig,
    *,
    what: str = "shift",
) -> ShiftResult:
    """Test every site for a shift from ``ref`` to ``cur``.

    Tests whose sample is below the floors in ``settings`` are skipped with a warning and
    the reason is kept in ``LayerShift.skipped``; nothing raises.
    """
    out = ShiftResult(settings)
    warned: set[str] = set()
    for site in sites:
        if site not in ref.moments or site not in cur.moments:
            continue
        layer = _compare_site(site, ref, cur, settings)
        for test, reason in layer.skipped.items():
            if test not in warned:
                warnings.warn(f"{what}: {test} skipped — {reason}", stacklevel=3)
                warned.add(test)
        out.layers.append(layer)
    return out


def _compare_site(site: str, ref: ActivationSummary, cur: ActivationSummary, s: ShiftConfig) -> LayerShift:
    r_tok, c_tok = ref.tokens[site].values(), cur.tokens[site].values()
    units = r_tok.shape[1]
    layer = LayerShift(site, units, len(r_tok), len(c_tok), None, None, None, [], None, False)
    if min(len(r_tok), len(c_tok)) < s.min_samples:
        layer.skipped["per-unit KS/Wasserstein"] = (
            f"needs ≥ {s.min_samples} inputs per side, got {len(r_tok)} reference and {len(c_tok)} current; add inputs"
        )
    else:
        tests = ks_wasserstein(r_tok, c_tok)
        sigma = ref.moments[site].std
        floor = 1e-3 * float(np.nanmean(sigma)) if np.isfinite(sigma).any() else 1e-12
        scale = np.maximum(np.nan_to_num(sigma), max(floor, 1e-12))
        w_norm = tests.wasserstein / scale
        # The same statistic after a random relabelling: W̃'s small-sample level under no shift.
        pooled = np.concatenate([r_tok, c_tok])[np.random.default_rng(s.seed).permutation(len(r_tok) + len(c_tok))]
        layer.null_wasserstein = float(
            np.mean(ks_wasserstein(pooled[: len(r_tok)], pooled[len(r_tok) :]).wasserstein / scale)
        )
        rejected, q = benjamini_hochberg(tests.p_value, s.alpha)
        hits = rejected & (w_norm >= s.min_effect)
        layer.unit_wasserstein, layer.unit_ks, layer.unit_q = w_norm, tests.ks, q
        layer.shifted_units = [int(u) for u in np.flatnonzero(hits)]
        layer.fraction_shifted = float(hits.mean())
        layer.shifted = layer.fraction_shifted > s.layer_fraction
    r_pool, c_pool = ref.pooled[site].values(), cur.pooled[site].values()
    layer.mmd_inputs = (len(r_pool), len(c_pool))
    if min(len(r_pool), len(c_pool)) < s.min_inputs_mmd:
        layer.skipped["MMD"] = (
            f"needs ≥ {s.min_inputs_mmd} inputs per side, got {len(r_pool)} reference and {len(c_pool)} current"
        )
    else:
        mmd = mmd_test(r_pool, c_pool, components=s.components, permutations=s.permutations, seed=s.seed)
        layer.mmd2, layer.mmd_p = mmd.mmd2, mmd.p_value
    return layer
