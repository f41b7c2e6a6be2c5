"""Beyond the eight experiments — pruning recommendations, verified by ablation.

Proposal (docs/metrics.md §9): in each neuron site, unit u gets the score
``r_u · w_ℓ`` — its relative mean |activation| (sparsity, measured on the *selection*
inputs only) times its layer's relative sensitivity w_ℓ = Δ_ℓ / mean Δ (1 when the
sensitivity experiment did not run). Units scoring below ``tau`` are candidates.

Verification: the candidates of a site are zero-ablated (a removed neuron contributes
nothing) on *held-out* inputs that took no part in choosing them; a set is kept only if
mean KL(p_full ‖ p_pruned) ≤ ``max_kl`` and top-1 agreement ≥ ``min_agreement``. A failing
set is halved (keeping the lowest scores) up to three times. Finally all kept sets are
ablated together and, while that fails, the set with the largest KL is dropped. Only
verified recommendations are reported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.table import Table

from model_forensics.core.config import PruningConfig
from model_forensics.inspection._json import jsonable

# evaluate({site: units}) → (mean KL nats, top-1 agreement) on the held-out inputs
Evaluate = Callable[[dict[str, list[int]]], tuple[float, float]]


PruningSettings = PruningConfig  # the ``inspection.pruning`` config section


@dataclass
class PruningRecommendation:
    site: str
    units: list[int]
    kl: float
    agreement: float


@dataclass
class PruningResult:
    settings: PruningConfig
    heldout_inputs: int
    proposed: int = 0
    verified: list[PruningRecommendation] = field(default_factory=list)
    combined_kl: float | None = None
    combined_agreement: float | None = None
    rejected: list[dict[str, Any]] = field(default_factory=list)
    evaluations: int = 0

    @property
    def units(self) -> list[str]:
        return [f"{r.site}[{u}]" for r in self.verified for u in r.units]

    def to_json(self) -> dict[str, Any]:
        return jsonable(
            {
                "settings": self.settings.model_dump(),
                "heldout_inputs": self.heldout_inputs,
                "proposed_units": self.proposed,
                "verified_units": len(self.units),
                "verified": [vars(r) for r in self.verified],
                "combined_kl": self.combined_kl,
                "combined_agreement": self.combined_agreement,
                "rejected": self.rejected,
                "evaluations": self.evaluations,
            }
        )

    def table(self) -> Table:
        s = self.settings
        t = Table(
            title=f"Pruning: {len(self.units)} of {self.proposed} proposed units verified on {self.heldout_inputs} held-out inputs "
            f"(KL ≤ {s.max_kl:g} nats, agreement ≥ {s.min_agreement:g})",
            title_justify="left",
        )
        for col in ("site", "units", "KL (nats)", "top-1 agreement"):
            t.add_column(col, justify="left" if col == "site" else "right")
        for r in self.verified:
            t.add_row(r.site, str(len(r.units)), f"{r.kl:.5f}", f"{r.agreement:.3f}")
        if self.combined_kl is not None:
            t.caption = f"all together: KL {self.combined_kl:.5f} nats, agreement {self.combined_agreement:.3f}"
        return t


def propose(
    relative: Mapping[str, np.ndarray], weights: Mapping[str, float], settings: PruningConfig
) -> dict[str, list[int]]:
    """Candidate units per site, lowest score first (see the module docstring)."""
    out: dict[str, list[int]] = {}
    for site, r in relative.items():
        score = r * weights.get(site, 1.0)
        order = np.argsort(score, kind="stable")
        chosen = [int(u) for u in order if score[u] < settings.tau][: int(settings.max_fraction * len(r))]
        if chosen:
            out[site] = chosen
    ranked = sorted(out, key=lambda s: -len(out[s]))[: settings.max_sites]
    return {s: out[s] for s in ranked}


def verify(
    candidates: Mapping[str, Sequence[int]], evaluate: Evaluate, settings: PruningConfig, heldout: int
) -> PruningResult:
    """Keep only candidate sets whose ablation passes on held-out inputs."""
    result = PruningResult(settings, heldout, proposed=sum(len(u) for u in candidates.values()))

    def ok(kl: float, agreement: float) -> bool:
        return kl <= settings.max_kl and agreement >= settings.min_agreement

    for site, units in candidates.items():
        trial = list(units)
        for _ in range(4):
            kl, agreement = evaluate({site: trial})
            result.evaluations += 1
            if ok(kl, agreement):
                result.verified.append(PruningRecommendation(site, trial, kl, agreement))
                break
            result.rejected.append({"site": site, "units": len(trial), "kl": kl, "agreement": agreement})
            trial = trial[: len(trial) // 2]
            if not trial:
                break
    while result.verified:
        kl, agreement = evaluate({r.site: r.units for r in result.verified})
        result.evaluations += 1
        if ok(kl, agreement):
            result.combined_kl, result.combined_agreement = kl, agreement
            break
        worst = max(result.verified, key=lambda r: r.kl)
        result.verified.remove(worst)
        result.rejected.append(
            {
                "site": worst.site,
                "units": len(worst.units),
                "kl": kl,
                "agreement": agreement,
                "reason": "failed jointly",
            }
        )
    return result
