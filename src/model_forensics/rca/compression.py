"""Compression Forensics (CF): which sites computed something unusually (in)compressible?

For every site (and every attention head's slice of ``attn.z``), the compressibility
features of :mod:`model_forensics.rca.features` are computed on the incident and on each
benign baseline run. Each feature becomes a robust z-score against the baseline
distribution (median / MAD); a unit's score is the largest |z| over its features and it is
an anomaly when that exceeds ``anomaly_threshold``. The false-positive rate is measured,
not assumed: leave-one-out over the baseline runs (each benign run scored against the
others) gives the fraction of benign units flagged, reported beside the nominal rate of
the threshold (two-sided normal tail, per feature and for the max over features).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model_forensics.core.config import CFConfig, ForensicsConfig, load_config
from model_forensics.rca.features import FEATURES, features, robust_z
from model_forensics.rca.runs import baseline_inputs, capture

_UNIT_KINDS = ("attn", "mlp", "resid_post")


@dataclass
class Anomaly:
    """One site or head: its score (max |z| over features) and the evidence."""

    site: str
    score: float
    flagged: bool
    features: dict[str, dict[str, float]]

    def to_json(self) -> dict[str, Any]:
        return {"site": self.site, "score": self.score, "flagged": self.flagged, "features": self.features}


@dataclass
class AnomalyReport(Sequence[Anomaly]):
    """CF's ranked anomalies (highest score first) with its calibration."""

    anomalies: list[Anomaly]
    threshold: float
    baseline_size: int
    false_positive_rate: float | None
    nominal_rate_per_feature: float
    nominal_rate_max: float
    forward_passes: int
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, i: Any) -> Any:
        return self.anomalies[i]

    def __len__(self) -> int:
        return len(self.anomalies)

    def __iter__(self) -> Iterator[Anomaly]:
        return iter(self.anomalies)

    @property
    def flagged(self) -> list[Anomaly]:
        return [a for a in self.anomalies if a.flagged]

    def score(self, site: str) -> float:
        """The score of a site or head (0 if CF did not score it)."""
        return next((a.score for a in self.anomalies if a.site == site), 0.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "baseline_size": self.baseline_size,
            "false_positive_rate": self.false_positive_rate,
            "nominal_rate_per_feature": self.nominal_rate_per_feature,
            "nominal_rate_max": self.nominal_rate_max,
            "forward_passes": self.forward_passes,
            "notes": self.notes,
            "anomalies": [a.to_json() for a in self.anomalies],
        }


class CompressionForensics:
    """CF over a replay session. ``config``: YAML path / ForensicsConfig / None (defaults)."""

    def __init__(self, config: str | Path | ForensicsConfig | None = None, *, heads: bool = True):
        self.config: CFConfig = load_config(config).modules.cf
        self.heads = heads

    def analyze(self, session: Any, baseline: Sequence[str | Path] = ()) -> AnomalyReport:
        """Score every site (and head) of the incident against the benign baseline.

        Args:
            session: a replay :class:`~model_forensics.replay.Session`.
            baseline: extra baseline bundles (same model) beyond the session's own benign
                prompts and clean baselines.
        """
        before = session.forward_passes
        refs = baseline_inputs(session, baseline, limit=self.config.baseline_samples)
        incident = unit_features(capture(session, session.inputs), self.heads)
        reference = [unit_features(capture(session, batch), self.heads) for batch in refs]
        units = [u for u in incident if all(u in r for r in reference)]
        anomalies = [self._score(u, incident[u], [r[u] for r in reference]) for u in units]
        anomalies.sort(key=lambda a: -a.score)
        fpr = _leave_one_out_fpr(reference, units, self.config.anomaly_threshold) if len(reference) >= 3 else None
        per_feature = math.erfc(self.config.anomaly_threshold / math.sqrt(2))
        notes = [] if fpr is not None else ["fewer than 3 baseline runs: false-positive rate not measured"]
        return AnomalyReport(
            anomalies=anomalies,
            threshold=self.config.anomaly_threshold,
            baseline_size=len(reference),
            false_positive_rate=fpr,
            nominal_rate_per_feature=per_feature,
            nominal_rate_max=1 - (1 - per_feature) ** len(FEATURES),
            forward_passes=session.forward_passes - before,
            notes=notes,
        )

    def _score(self, unit: str, value: dict[str, float], reference: list[dict[str, float]]) -> Anomaly:
        evidence = {}
        for name in FEATURES:
            ref = torch.tensor([r[name] for r in reference])
            evidence[name] = {"value": value[name], "median": float(ref.median()), "z": robust_z(value[name], ref)}
        score = max(abs(e["z"]) for e in evidence.values())
        return Anomaly(unit, score, score > self.config.anomaly_threshold, evidence)


def unit_features(sites: dict[str, torch.Tensor], heads: bool) -> dict[str, dict[str, float]]:
    """Features per unit: layer-level sites, plus ``blocks.L.attn.head.H`` from z (T, H, dh)."""
    out: dict[str, dict[str, float]] = {}
    for site, x in sites.items():
        kind = site.split(".", 2)[-1] if site.startswith("blocks.") else site
        if kind in _UNIT_KINDS or site == "embed":
            out[site] = features(x)
        elif heads and kind == "attn.z":
            for h in range(x.shape[1]):
                out[site.removesuffix(".z") + f".head.{h}"] = features(x[:, h])
    return out


def _leave_one_out_fpr(reference: list[dict[str, dict[str, float]]], units: list[str], threshold: float) -> float:
    flagged = total = 0
    for i, sample in enumerate(reference):
        others = reference[:i] + reference[i + 1 :]
        for unit in units:
            score = max(
                abs(robust_z(sample[unit][name], torch.tensor([o[unit][name] for o in others]))) for name in FEATURES
            )
            flagged += score > threshold
            total += 1
    return flagged / total if total else 0.0
