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

Two rankers (``modules.cf.ranker``):
    features   the seed's: the compressibility features above, scored per site and head.
    relative   compression relative to the benign distribution (:mod:`~model_forensics.rca.codebook`):
               a low-rank codebook per unit is fitted on one seeded half of the baseline
               runs, and a unit's score is the robust z of the bits its codebook misses
               on the incident against the same bits on the other half (one-sided: only
               worse-than-benign reconstruction is unusual). Scores sites, heads and MLP
               neurons. The conformal p-value is the split one,
               (1 + #{calibration runs with at least the incident's bits}) / (n + 1),
               and the false-positive rate is measured leave-one-out on the calibration
               half, which the codebook never saw.
    auto       :data:`AUTO_RANKER`, the ranker that wins on the zoo's ground truth
               (benchmarks/results/rca_eval.md).
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
from model_forensics.rca.codebook import Codebook, Moments, run_bits
from model_forensics.rca.features import FEATURES, features, head_features
from model_forensics.rca.notes import Note
from model_forensics.rca.progress import Progress, silent
from model_forensics.rca.runs import Inputs, baseline_inputs, capture
from model_forensics.rca.settings import overridden
from model_forensics.replay import Session

_UNIT_KINDS = ("attn", "mlp", "resid_post")
AUTO_RANKER = "relative"  # ranks the zoo's planted units best (benchmarks/results/rca_eval.md)


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
    ranker: str = "features"  # which ranker scored the units (``modules.cf.ranker``)

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
        """The score of a site, head or neuron (0 if CF did not score it)."""
        if len(self._scores) != len(self.anomalies):
            self._scores = {a.site: a.score for a in self.anomalies}
        return self._scores.get(site, 0.0)

    _scores: dict[str, float] = field(default_factory=dict, init=False, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        out = fields_json(
            self,
            notes=self.notes,
            note_records=[note.to_json() for note in self.note_records],
            anomalies=[a.to_json() for a in self.anomalies],
        )
        out.pop("_scores")
        return out


class CompressionForensics:
    """CF over a replay session.

    Args:
        config: YAML path / ForensicsConfig / mapping / None (the defaults); the knobs are
            ``modules.cf``.
        heads: overrides ``modules.cf.heads`` (score every head's slice of z as well).
        ranker: overrides ``modules.cf.ranker`` (``features`` / ``relative`` / ``auto``).
    """

    def __init__(
        self,
        config: str | Path | ForensicsConfig | dict[str, Any] | None = None,
        *,
        heads: bool | None = None,
        ranker: str | None = None,
    ):
        self.config: CFConfig = overridden(
            load_config(config).modules.cf, "the CompressionForensics(...) keywords", heads=heads, ranker=ranker
        )

    @property
    def ranker(self) -> str:
        """The ranker ``analyze`` uses (``auto`` resolved)."""
        return AUTO_RANKER if self.config.ranker == "auto" else self.config.ranker

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
        if self.ranker == "relative":
            return self._relative(session, refs, before, progress)
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
        needed = math.ceil(1 / alpha) - 1
        return self._report(
            anomalies,
            len(reference),
            _held_out_fpr(reference, units, self.config.anomaly_threshold, alpha),
            session.forward_passes - before,
            needed=needed,
            fpr_runs=len(reference),
            fpr_needed=needed,
        )

    def _relative(self, session: Session, refs: list[Inputs], before: int, progress: Progress) -> AnomalyReport:
        """The relative ranker: codebooks fitted on one seeded half of ``refs``, the
        incident's missed bits z-scored against the other half's."""
        order = np.random.default_rng(0).permutation(len(refs))
        fit, calibration = [refs[i] for i in order[: len(refs) // 2]], [refs[i] for i in order[len(refs) // 2 :]]
        moments: dict[str, Moments] = {}
        for i, batch in enumerate(fit):
            progress("compression forensics", i, len(refs))
            for name, (x, _, _) in _codebook_groups(capture(session, batch, "layer", _RELATIVE_SITES)).items():
                if name in moments:
                    moments[name].add(x)
                else:
                    moments[name] = Moments.of(x)
        books = {name: Codebook.fit(m, self.config.codebook_variance) for name, m in moments.items()}
        units: list[str] = []
        reference = []
        for i, batch in enumerate(calibration):
            progress("compression forensics", len(fit) + i, len(refs))
            units, bits = _missed_bits(books, capture(session, batch, "layer", _RELATIVE_SITES))
            reference.append(bits)
        progress("compression forensics", len(refs), len(refs))
        _, incident = _missed_bits(books, capture(session, session.inputs, "layer", _RELATIVE_SITES))
        ref = np.stack(reference)  # (n, U)
        alpha = math.erfc(self.config.anomaly_threshold / math.sqrt(2))
        z = _robust_z(incident, ref)
        med = np.median(ref, axis=0)
        p_values = (1 + (ref >= incident).sum(axis=0)) / (len(ref) + 1)
        flagged = (z > self.config.anomaly_threshold) & (p_values <= alpha)
        anomalies = [
            Anomaly(
                unit,
                float(z[j]),
                bool(flagged[j]),
                {
                    "relative_bits": {"value": float(incident[j]), "median": float(med[j]), "z": float(z[j])},
                    "conformal": {"p_value": float(p_values[j]), "alpha": alpha},
                },
            )
            for j, unit in enumerate(units)
        ]
        needed = math.ceil(1 / alpha) - 1
        # half the benign runs fit the codebooks, so flagging needs twice the calibration runs
        return self._report(
            anomalies,
            len(ref),
            _loo_fpr(ref, self.config.anomaly_threshold, alpha),
            session.forward_passes - before,
            needed=2 * needed,
            fpr_runs=len(refs),
            fpr_needed=needed + 1,
            ranker="relative",
        )

    def _report(
        self,
        anomalies: list[Anomaly],
        baseline_size: int,
        fpr: float | None,
        forward_passes: int,
        *,
        needed: int,
        fpr_runs: int,
        fpr_needed: int,
        ranker: str = "features",
    ) -> AnomalyReport:
        """The report of either ranker: ``anomalies`` ranked, with the calibration notes.

        Args:
            baseline_size: the benign runs the incident's p-values are computed against.
            fpr: the held-out false-positive rate (None: not measurable).
            needed: benign runs a p-value at α needs (said when ``baseline_size`` is short of it).
            fpr_runs / fpr_needed: benign runs there are / needed to measure ``fpr`` (said when it is None).
        """
        alpha = math.erfc(self.config.anomaly_threshold / math.sqrt(2))
        anomalies.sort(key=lambda a: -a.score)
        notes: list[Note] = []
        if baseline_size + 1 < 1 / alpha:
            numbers = {"baselines": baseline_size, "min_p_value": 1 / (baseline_size + 1), "alpha": alpha}
            notes.append(Note("too_few_baselines", {**numbers, "needed": needed}))
        if fpr is None:
            notes.append(Note("false_positive_rate_not_measured", {"baselines": fpr_runs, "needed": fpr_needed}))
        return AnomalyReport(
            anomalies=anomalies,
            threshold=self.config.anomaly_threshold,
            baseline_size=baseline_size,
            false_positive_rate=fpr,
            nominal_rate_per_feature=alpha,
            nominal_rate_max=alpha,
            forward_passes=forward_passes,
            note_records=notes,
            ranker=ranker,
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
            for h, value in enumerate(head_features(x)):
                out[site.removesuffix(".z") + f".head.{h}"] = value
    return out


_RELATIVE_SITES = ["blocks.*.attn.z", "blocks.*.mlp.post"]


def _codebook_groups(sites: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, list[str], bool]]:
    """Per codebook group: its tokens (B, T, d), its units, whether a unit is one dimension
    (MLP neurons) or a whole row of the group (sites; heads, B of them)."""
    out: dict[str, tuple[torch.Tensor, list[str], bool]] = {}
    for site, x in sites.items():
        kind = site.split(".", 2)[-1] if site.startswith("blocks.") else site
        if kind in _UNIT_KINDS or site == "embed":
            out[site] = (x.reshape(1, x.shape[0], -1), [site], False)
        elif kind == "attn.z":  # (T, H, d_head)
            base = site.removesuffix(".z")
            out[site] = (x.transpose(0, 1), [f"{base}.head.{h}" for h in range(x.shape[1])], False)
        elif kind == "mlp.post":  # (T, d_mlp)
            out[site] = (x[None], [f"{site}[{i}]" for i in range(x.shape[-1])], True)
    return out


def _missed_bits(books: dict[str, Codebook], sites: dict[str, torch.Tensor]) -> tuple[list[str], np.ndarray]:
    """The units and each one's run bits (U,) under its group's codebook."""
    units: list[str] = []
    bits: list[torch.Tensor] = []
    for name, (x, names, per_dim) in _codebook_groups(sites).items():
        if name not in books:
            continue
        per_token = books[name].bits(x)  # (B, T, d)
        units += names
        bits.append(run_bits(per_token[0].T if per_dim else per_token.sum(-1)))
    return units, torch.cat(bits).double().numpy()


def _loo_fpr(ref: np.ndarray, threshold: float, alpha: float) -> float | None:
    """Fraction of (calibration run, unit) pairs flagged against the other calibration
    runs (one-sided z and split-conformal p-value, as for the incident)."""
    n = len(ref)
    if n < 1 / alpha:
        return None
    flagged = 0
    for i in range(n):
        others = np.delete(ref, i, axis=0)
        z = _robust_z(ref[i], others)
        p_values = (1 + (others >= ref[i]).sum(axis=0)) / n
        flagged += int(((z > threshold) & (p_values <= alpha)).sum())
    return flagged / (n * ref.shape[1])


def _robust_z(values: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Robust z of ``values`` (…, F) or (…, m, F) against reference rows ``ref`` (…, n, F)."""
    med = np.median(ref, axis=-2)  # (…, F)
    scale = np.maximum(np.median(np.abs(ref - med[..., None, :]), axis=-2) * 1.4826, 1e-6 + 1e-3 * np.abs(med))
    if values.ndim == ref.ndim:  # rows of values: (…, m, F)
        med, scale = med[..., None, :], scale[..., None, :]
    return np.asarray((values - med) / scale)


def _loo_scores(ref: np.ndarray) -> np.ndarray:
    """Each reference run's score (max |z| over features) against the other runs, (n,)."""
    n = len(ref)
    others = np.array([[j for j in range(n) if j != i] for i in range(n)], dtype=int).reshape(n, n - 1)
    return np.abs(_robust_z(ref, ref[others])).max(axis=-1)  # ref (n, F) against (n, n−1, F)


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
