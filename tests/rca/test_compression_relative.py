"""Relative compression: bits a benign codebook misses rank the zoo's planted units, and
its flags on benign incidents stay near the nominal rate."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from sklearn.metrics import roc_auc_score

from model_forensics import CompressionForensics, SandboxReplayer
from model_forensics.core.errors import ConfigError
from model_forensics.models import zoo
from model_forensics.rca.candidates import cf_score, forward_order
from model_forensics.rca.codebook import Codebook, Moments
from model_forensics.rca.compression import AUTO_RANKER, AnomalyReport
from model_forensics.rca.runs import baseline_inputs


@pytest.fixture(scope="module")
def injection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if "gpt2-injection" not in zoo.names():
        pytest.skip("the zoo's trained weights are not shipped in this checkout")
    from model_forensics.scenarios import get

    return get("gpt2-injection").record(tmp_path_factory.mktemp("injection"), limit=1).incidents[0]


def test_planted_units_rank_above_the_other_heads_and_neurons(injection: Path) -> None:
    session = SandboxReplayer().load_bundle(injection)
    truth = set(session.extras["ground_truth"]["units"])
    # the incident is not among the benign runs the codebooks are fitted on
    incident = session.inputs["input_ids"]
    assert not any(torch.equal(incident, b["input_ids"]) for b in baseline_inputs(session))
    report = CompressionForensics(ranker="relative").analyze(session)
    assert report.ranker == "relative"
    units = [u.unit for u in forward_order(session) if u.level in ("head", "neuron")]
    scores = [cf_score(report, u) for u in units]
    # measured 1.000 (benchmarks/results/rca_eval.md); 0.9 leaves margin
    assert roc_auc_score([u in truth for u in units], scores) >= 0.9
    assert {a.site for a in report.flagged} & truth


@pytest.fixture(scope="module")
def benign_reports(tiny, prompts, record_incident, tmp_path_factory: pytest.TempPathFactory) -> list[AnomalyReport]:
    """The relative ranker on 4 random prompts recorded as incidents (exchangeable with the
    48 benign runs, so every flag is a false positive)."""
    root = tmp_path_factory.mktemp("relative-benign")
    reference = prompts(48, seed=21)
    return [
        CompressionForensics(ranker="relative").analyze(
            SandboxReplayer().load_bundle(record_incident(tiny["gpt2"], ids, root / f"incident-{i}", reference))
        )
        for i, ids in enumerate(prompts(4, seed=22))
    ]


def test_benign_incidents_are_flagged_near_the_nominal_rate(benign_reports: list[AnomalyReport]) -> None:
    report = benign_reports[0]
    assert report.baseline_size == 24  # the half the codebooks never saw
    assert report.false_positive_rate is not None and report.false_positive_rate <= 2 * report.nominal_rate_max
    flags = [a.flagged for r in benign_reports for a in r]
    # embed, attn, mlp, resid_post, 4 heads and 128 neurons per block of the tiny GPT-2
    assert len(flags) == len(benign_reports) * (1 + 2 * (3 + 4 + 128))
    alpha = report.nominal_rate_max
    assert sum(flags) / len(flags) <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / len(flags))
    for a in report:
        p = a.features["conformal"]["p_value"]
        assert a.flagged == (a.score > report.threshold and p <= alpha)


def test_codebook_reconstructs_benign_tokens_better_than_outliers() -> None:
    g = torch.Generator().manual_seed(3)
    basis = torch.randn(2, 16, generator=g)
    benign = torch.randn(1, 200, 2, generator=g) @ basis + 0.01 * torch.randn(1, 200, 16, generator=g)
    book = Codebook.fit(Moments.of(benign), variance=0.9)
    inside = torch.randn(1, 5, 2, generator=g) @ basis
    outside = inside + torch.randn(1, 5, 16, generator=g)
    assert book.bits(outside).sum(-1).min() > book.bits(inside).sum(-1).max()


def test_auto_resolves_to_the_measured_winner_and_bad_rankers_are_refused() -> None:
    assert CompressionForensics(ranker="auto").ranker == AUTO_RANKER == "relative"
    assert CompressionForensics().ranker == "features"  # the seed's CF stays the default
    with pytest.raises(ConfigError):
        CompressionForensics(ranker="entropy")
