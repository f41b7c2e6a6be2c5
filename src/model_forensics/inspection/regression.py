"""Experiment 5 — cross-model regression: the inspected (baseline) model against a
candidate ("new") model on the same inputs.

* representation similarity per layer pair: unbiased linear CKA for every (baseline
  layer, candidate layer) pair — a layer × layer matrix — and the orthogonal Procrustes
  distance for depth-matched pairs, on per-input mean-pooled states (docs/metrics.md §5);
* output agreement at each input's prediction position: top-1 agreement and
  KL(p_baseline ‖ p_candidate);
* regressions: inputs with a ``label`` that the baseline got right and the candidate
  gets wrong (and improvements, the reverse).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rich.table import Table

from model_forensics.core.errors import ForensicsError
from model_forensics.core.metrics import kl_divergence
from model_forensics.core.records import fields_json
from model_forensics.inspection._json import jsonable
from model_forensics.inspection.collect import Recorded, Sample
from model_forensics.inspection.similarity import centered_gram, cka_from_grams, procrustes_distance, unbiased_hsic
from model_forensics.inspection.summary import ActivationSummary

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def check_tokenizers(baseline: Any, candidate: Any, texts: Sequence[str], names: tuple[str, str]) -> None:
    """Raise unless both tokenizers turn ``texts`` into the same ids.

    Raises:
        ForensicsError: they differ; the message shows the first difference and how to align.
    """
    if baseline is None or candidate is None or baseline is candidate:
        return
    for text in texts[:32]:
        a, b = list(baseline(text)["input_ids"]), list(candidate(text)["input_ids"])
        if a != b:
            raise ForensicsError(
                f"models '{names[0]}' and '{names[1]}' tokenize the data differently "
                f"({text[:40]!r} → {a[:8]}… vs {b[:8]}…; vocabularies {_size(baseline)} vs {_size(candidate)}); "
                "cross-model regression compares outputs position by position, so both must share a tokenizer: "
                "compare checkpoints or fine-tunes of the same base model, or pass the baseline's tokenizer "
                "for both (ModelInspector.run(..., compare_tokenizer=tokenizer)) if the candidate's vocabulary is a superset"
            )


def _size(tok: Any) -> int | str:
    try:
        return len(tok)
    except TypeError:
        return "?"


def is_correct(prediction: int, label: Any, tokenizer: Any) -> bool | None:
    """Whether a top-1 prediction matches ``label``: an int is a class / token id; a
    string is the expected continuation, matched when the predicted token (stripped,
    case-folded, non-empty) is a prefix of it. None when there is no label."""
    if label is None:
        return None
    if isinstance(label, bool):
        return None
    if isinstance(label, int):
        return prediction == label
    if isinstance(label, str) and tokenizer is not None:
        token = str(tokenizer.decode([prediction])).strip().lower()
        return bool(token) and label.strip().lower().startswith(token)
    return None


@dataclass
class RegressionCase:
    """One input the candidate gets wrong and the baseline got right (or the reverse)."""

    index: int
    text: str | None
    label: Any
    baseline_prediction: str
    candidate_prediction: str

    def to_json(self) -> dict[str, Any]:
        return jsonable(vars(self))


@dataclass
class RegressionResult:
    """Baseline vs candidate: CKA matrix, Procrustes per depth-matched pair, outputs."""

    baseline: str
    candidate: str
    rows: list[str]  # baseline sites
    cols: list[str]  # candidate sites
    cka: np.ndarray  # (len(rows), len(cols))
    procrustes: list[tuple[str, str, float]]  # (baseline site, candidate site, d²)
    similarity_inputs: int
    inputs: int
    agreement: float  # top-1 agreement rate
    mean_kl: float  # mean KL(p_baseline ‖ p_candidate), nats
    labelled: int
    baseline_accuracy: float | None
    candidate_accuracy: float | None
    regressions: list[RegressionCase] = field(default_factory=list)
    improvements: list[RegressionCase] = field(default_factory=list)
    disagreements: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return jsonable(
            fields_json(
                self,
                cka_diagonal=self.diagonal(),
                procrustes=[{"baseline": a, "candidate": b, "d2": d} for a, b, d in self.procrustes],
                regressions=[r.to_json() for r in self.regressions],
                improvements=[r.to_json() for r in self.improvements],
            )
        )

    def diagonal(self) -> list[float]:
        """CKA of depth-matched layer pairs (the Procrustes pairs)."""
        out = []
        for a, b, _ in self.procrustes:
            out.append(float(self.cka[self.rows.index(a), self.cols.index(b)]))
        return out

    def table(self) -> Table:
        acc = ""
        if self.baseline_accuracy is not None and self.candidate_accuracy is not None:
            acc = f"; accuracy {self.baseline_accuracy:.3f} → {self.candidate_accuracy:.3f} on {self.labelled} labelled"
        t = Table(
            title=f"Regression {self.baseline} → {self.candidate}: top-1 agreement {self.agreement:.3f}, "
            f"mean KL {self.mean_kl:.4f} nats{acc}; {len(self.regressions)} regressions, {len(self.improvements)} improvements",
            title_justify="left",
        )
        for col in ("baseline site", "candidate site", "CKA", "Procrustes d²"):
            t.add_column(col, justify="left" if "site" in col else "right")
        for (a, b, d), c in zip(self.procrustes, self.diagonal(), strict=True):
            t.add_row(a, b, f"{c:.3f}", f"{d:.3f}")
        return t

    def figure(self) -> Figure:
        from model_forensics.core import plots

        return plots.cka_matrix(self.cka, self.rows, self.cols, row_model=self.baseline, col_model=self.candidate)


class OutputComparison:
    """Streams per-input output agreement between two models run on the same batches."""

    def __init__(self, samples: Sequence[Sample], tokenizer: Any):
        self.samples = samples
        self.tokenizer = tokenizer
        self.index: list[int] = []
        self.base_top: list[int] = []
        self.cand_top: list[int] = []
        self.kl: list[float] = []

    def update(self, base: Recorded, cand: Recorded) -> None:
        a, b = base.prediction, cand.prediction
        v = min(a.shape[-1], b.shape[-1])
        kl = kl_divergence(a[:, :v], b[:, :v], dtype=torch.float64)
        self.index += [int(i) for i in base.index]
        self.base_top += a.argmax(-1).tolist()
        self.cand_top += b.argmax(-1).tolist()
        self.kl += kl.tolist()

    def merge(self, other: OutputComparison) -> None:
        """Append the comparisons of the next shard of inputs (shards merged in input order)."""
        self.index += other.index
        self.base_top += other.base_top
        self.cand_top += other.cand_top
        self.kl += other.kl


def regression(
    base: ActivationSummary,
    cand: ActivationSummary,
    base_sites: Sequence[str],
    cand_sites: Sequence[str],
    outputs: OutputComparison,
    names: tuple[str, str],
) -> RegressionResult:
    """Build :class:`RegressionResult` from two summaries fed the same inputs and keys."""
    rows = [s for s in base_sites if s in base.pooled]
    cols = [s for s in cand_sites if s in cand.pooled]
    shared = (
        np.intersect1d(base.pooled[rows[0]].ids, cand.pooled[cols[0]].ids)
        if rows and cols
        else np.empty(0, dtype=np.int64)
    )

    def states(summary: ActivationSummary, site: str) -> np.ndarray:
        res = summary.pooled[site]
        return res.values()[np.isin(res.ids, shared)].astype(np.float64)

    grams_a = [centered_gram(states(base, s)) for s in rows]
    grams_b = [centered_gram(states(cand, s)) for s in cols]
    n = len(shared)
    cka = np.full((len(rows), len(cols)), np.nan)
    if n >= 4:
        self_a = [unbiased_hsic(k, k) for k in grams_a]
        self_b = [unbiased_hsic(k, k) for k in grams_b]
        for i, ka in enumerate(grams_a):
            for j, kb in enumerate(grams_b):
                cka[i, j] = cka_from_grams(ka, kb, self_a[i], self_b[j])
    pairs = []
    for i, a in enumerate(rows):
        j = round(i * (len(cols) - 1) / max(1, len(rows) - 1)) if cols else 0
        if cols:
            d = procrustes_distance(states(base, a), states(cand, cols[j])) if n >= 2 else float("nan")
            pairs.append((a, cols[j], d))

    base_top, cand_top = np.array(outputs.base_top), np.array(outputs.cand_top)
    agree = base_top == cand_top
    tok = outputs.tokenizer
    regressions: list[RegressionCase] = []
    improvements: list[RegressionCase] = []
    correct_a, correct_b = [], []
    for k, i in enumerate(outputs.index):
        sample = outputs.samples[i]
        ca, cb = is_correct(int(base_top[k]), sample.label, tok), is_correct(int(cand_top[k]), sample.label, tok)
        if ca is None or cb is None:
            continue
        correct_a.append(ca)
        correct_b.append(cb)
        if ca != cb:
            case = RegressionCase(
                i, sample.text, sample.label, _show(int(base_top[k]), tok), _show(int(cand_top[k]), tok)
            )
            (regressions if ca else improvements).append(case)
    return RegressionResult(
        baseline=names[0],
        candidate=names[1],
        rows=rows,
        cols=cols,
        cka=cka,
        procrustes=pairs,
        similarity_inputs=n,
        inputs=len(outputs.index),
        agreement=float(agree.mean()) if len(agree) else float("nan"),
        mean_kl=float(np.mean(outputs.kl)) if outputs.kl else float("nan"),
        labelled=len(correct_a),
        baseline_accuracy=float(np.mean(correct_a)) if correct_a else None,
        candidate_accuracy=float(np.mean(correct_b)) if correct_b else None,
        regressions=regressions,
        improvements=improvements,
        disagreements=[int(outputs.index[k]) for k in np.flatnonzero(~agree)],
    )


def _show(token: int, tokenizer: Any) -> str:
    if tokenizer is None:
        return str(token)
    return repr(str(tokenizer.decode([token])))
