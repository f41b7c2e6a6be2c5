"""Compression Forensics (CF): which sites computed something unusually (in)compressible?

For every site (and every attention head's slice of ``attn.z``), the compressibility
features of :mod:`model_forensics.rca.features` are computed on the incident and on each
benign baseline run. Each feature becomes a robust z-score against the baseline
distribution (median / MAD); a unit's score is the largest |z| over its features.

Flagging is calibrated, not assumed: a unit is an anomaly when its score exceeds
``anomaly_threshold`` *and* its conformal p-value — (1 + #{baseline runs whose
leave-one-out score ≥ the incident's}) / (n + 1) — is at most the threshold's nominal
two-sided normal rate α (4.55 % for 2.0). Under exchangeability of benign runs that bounds
the false-positive rate per unit by α whatever the features' distribution; with fewer than
1/α − 1 baseline runs nothing can be flagged (reported in ``notes``). The rate is also
measured: the baseline runs are split in interleaved halves, and the fraction of units of
held-out benign runs flagged against the other half is reported (None when a half is too
small for anything to be flaggable).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model_forensics.core.config import CFConfig, ForensicsConfig, load_config
from model_forensics.core.records import fields_json
from model_forensics.rca.features import FEATURES, features
from model_forensics.rca.notes import Note
from model_forensics.rca.progress import Progress, silent
from model_forensics.rca.runs import baseline_inputs, capture
from model_forensics.rca.settings import overridden
from model_forensics.replay import Session

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
    note_records: list[Note] = field(default_factory=list)  # calibration caveats; ``notes`` renders them

    def __getitem__(self, i: Any) -> Any:
        return self.anomalies[i]

    def __len__(self) -> int:
        return len(self.anomalies)

    def __iter__(self) -> Iterator[Anomaly]:
        return iter(self.anomalies)

    @property
    def notes(self) -> list[str]:
        return [str(note) for note in self.note_records]

    @property
    def flagged(self) -> list[Anomaly]:
        return [a for a in self.anomalies if a.flagged]

    def score(self, site: str) -> float:
        """The score of a site or head (0 if CF did not score it)."""
        return next((a.score for a in self.anomalies if a.site == site), 0.0)

    def to_json(self) -> dict[str, Any]:
        return fields_json(
            self,
            notes=self.notes,
            note_records=[note.to_json() for note in self.note_records],
            anomalies=[a.to_json() for a in self.anomalies],
        )


class CompressionForensics:
    """CF over a replay session.

    Args:
        config: YAML path / ForensicsConfig / mapping / None (the defaults); the knobs are
            ``modules.cf``.
        heads: overrides ``modules.cf.heads`` (score every head's slice of z as well).
    """

    def __init__(
        self, config: str | Path | ForensicsConfig | dict[str, Any] | None = None, *, heads: bool | None = None
    ):
        self.config: CFConfig = overridden(
            load_config(config).modules.cf, "the CompressionForensics(...) keywords", heads=heads
        )

    def analyze(
        self, session: Session, baseline: Sequence[str | Path] = (), progress: Progress = silent
    ) -> AnomalyReport:
        """Score every site (and head) of the incident against the benign baseline.

        Args:
            session: a replay :class:`~model_forensics.replay.Session`.
            baseline: extra baseline bundles (same model) beyond the session's own benign
                prompts and clean baselines.
            progress: called with ("compression forensics", runs captured, runs).
        """
        before = session.forward_passes
        refs = baseline_inputs(session, baseline, limit=self.config.baseline_samples)
        heads = self.config.heads
        incident = unit_features(capture(session, session.inputs, "layer", ["blocks.*.attn.z"]), heads)
        reference = []
        for i, batch in enumerate(refs):
            progress("compression forensics", i, len(refs))
            reference.append(unit_features(capture(session, batch, "layer", ["blocks.*.attn.z"]), heads))
        progress("compression forensics", len(refs), len(refs))
        units = [u for u in incident if all(u in r for r in reference)]
        alpha = math.erfc(self.config.anomaly_threshold / math.sqrt(2))
        anomalies = [self._score(u, incident[u], [r[u] for r in reference], alpha) for u in units]
        anomalies.sort(key=lambda a: -a.score)
        notes: list[Note] = []
        needed = math.ceil(1 / alpha) - 1
        if len(reference) + 1 < 1 / alpha:
            numbers = {"baselines": len(reference), "min_p_value": 1 / (len(reference) + 1), "alpha": alpha}
            notes.append(Note("too_few_baselines", {**numbers, "needed": needed}))
        fpr = _held_out_fpr(reference, units, self.config.anomaly_threshold, alpha)
        if fpr is None:
            notes.append(Note("false_positive_rate_not_measured", {"baselines": len(reference), "needed": needed}))
        return AnomalyReport(
            anomalies=anomalies,
            threshold=self.config.anomaly_threshold,
            baseline_size=len(reference),
            false_positive_rate=fpr,
            nominal_rate_per_feature=alpha,
            nominal_rate_max=alpha,
            forward_passes=session.forward_passes - before,
            note_records=notes,
        )

    def _score(self, unit: str, value: dict[str, float], reference: list[dict[str, float]], alpha: float) -> Anomaly:
        ref = np.array([[r[name] for name in FEATURES] for r in reference])  # (n, F)
        here = np.array([value[name] for name in FEATURES])
        z = _robust_z(here, ref)
        score = float(np.abs(z).max())
        null = _loo_scores(ref)
        p_value = (1 + int((null >= score).sum())) / (len(null) + 1)
        evidence = {
            name: {"value": float(here[j]), "median": float(np.median(ref[:, j])), "z": float(z[j])}
            for j, name in enumerate(FEATURES)
        }
        evidence["conformal"] = {"p_value": p_value, "alpha": alpha}
        flagged = score > self.config.anomaly_threshold and p_value <= alpha
        return Anomaly(unit, score, flagged, evidence)


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


def _robust_z(values: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Robust z of ``values`` (F,) or (m, F) against reference rows ``ref`` (n, F)."""
    med = np.median(ref, axis=0)
    mad = np.median(np.abs(ref - med), axis=0) * 1.4826
    return np.asarray((values - med) / np.maximum(mad, 1e-6 + 1e-3 * np.abs(med)))


def _loo_scores(ref: np.ndarray) -> np.ndarray:
    """Each reference run's score (max |z| over features) against the other runs."""
    n = len(ref)
    return np.array([np.abs(_robust_z(ref[i], np.delete(ref, i, axis=0))).max() for i in range(n)])


def _held_out_fpr(
    reference: list[dict[str, dict[str, float]]], units: list[str], threshold: float, alpha: float, splits: int = 5
) -> float | None:
    """Fraction of units of held-out benign runs flagged against the other half, averaged
    over ``splits`` seeded random halvings. Random halves keep the runs exchangeable, which
    the conformal p-values need; a fixed split (e.g. interleaved) can put systematically
    different runs on each side (bert-sentiment-bypass: 21 % flagged interleaved, 2–3 %
    on random halves)."""
    half = len(reference) // 2
    if len(reference) < 8 or len(reference) - half + 1 < 1 / alpha:
        return None  # too few runs: nothing could be flagged, so a rate of 0 would mean nothing
    rng = np.random.default_rng(0)
    flagged = total = 0
    for _ in range(splits):
        order = rng.permutation(len(reference))
        calibration = [reference[i] for i in order[half:]]
        held_out = [reference[i] for i in order[:half]]
        for unit in units:
            ref = np.array([[r[unit][f] for f in FEATURES] for r in calibration])
            null = _loo_scores(ref)
            test = np.array([[r[unit][f] for f in FEATURES] for r in held_out])
            scores = np.abs(_robust_z(test, ref)).max(axis=1)
            for score in scores:
                p_value = (1 + int((null >= score).sum())) / (len(null) + 1)
                flagged += bool(score > threshold and p_value <= alpha)
                total += 1
    return flagged / total if total else None
