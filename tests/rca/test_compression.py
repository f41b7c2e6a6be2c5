"""CompressionForensics: calibrated flagging on benign inputs, and a perturbed site stands out.

The incidents are random prompts on the tiny GPT-2: exchangeable with the benign reference
set, so every flag on them is a false positive. A perturbed incident is the same model with
a forward hook that turns one hidden unit of one site into a massive activation for the incident's input only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from model_forensics import CompressionForensics, SandboxReplayer
from model_forensics.rca.compression import AnomalyReport

PERTURBED = "blocks.1.mlp"
# Sites whose activations do not depend on blocks.1.mlp (they run before it).
UPSTREAM = ("embed", "blocks.0.", "blocks.1.attn")


@contextmanager
def _outlier_on_incident(session, site: str, strength: float = 20.0) -> Iterator[None]:
    """Make one hidden unit of ``site``'s output a massive activation (``strength`` × the
    output's std at every position) whenever the model runs on the incident's input_ids;
    other inputs run unchanged."""
    incident = session.inputs["input_ids"]
    module = session.adapter.modules[session.adapter.point(site).module]
    state = {"on": False}

    def watch(model, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        state["on"] = ids is not None and ids.shape == incident.shape and bool(torch.equal(ids, incident))

    def perturb(module, args, out):  # out: (B, T, d)
        if not state["on"]:
            return None
        out = out.clone()
        out[..., 0] = strength * out.std()
        return out

    handles = [
        session.model.register_forward_pre_hook(watch, with_kwargs=True),
        module.register_forward_hook(perturb),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@pytest.fixture(scope="module")
def reference(prompts) -> list[torch.Tensor]:
    """30 benign prompts: enough runs for a conformal p-value below α = 4.55 % (≥ 21)."""
    return prompts(30, seed=11)


@pytest.fixture(scope="module")
def held_out_reports(
    tiny, reference, prompts, record_incident, tmp_path_factory: pytest.TempPathFactory
) -> list[AnomalyReport]:
    """CF on 12 fresh random prompts recorded as incidents, each against the same reference."""
    root = tmp_path_factory.mktemp("cf-held-out")
    reports = []
    for i, ids in enumerate(prompts(12, seed=12)):
        path = record_incident(tiny["gpt2"], ids, root / f"incident-{i}", reference)
        reports.append(CompressionForensics().analyze(SandboxReplayer().load_bundle(path)))
    return reports


@pytest.fixture(scope="module")
def incident(tiny, reference, prompts, record_incident, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return record_incident(tiny["gpt2"], prompts(1, seed=13)[0], tmp_path_factory.mktemp("cf") / "incident", reference)


def test_benign_held_out_units_are_flagged_at_most_at_the_nominal_rate(held_out_reports) -> None:
    report = held_out_reports[0]
    alpha = report.nominal_rate_max
    assert alpha == pytest.approx(math.erfc(report.threshold / math.sqrt(2)))
    # 30 runs: enough to flag (p ≥ 1/31 < α), too few to measure the rate on halves of 15
    assert report.baseline_size == 30 and report.false_positive_rate is None
    assert not any("nothing can be flagged" in n for n in report.notes)
    flags = [a.flagged for r in held_out_reports for a in r]
    n = len(flags)
    assert n == len(held_out_reports) * 15  # embed, 3 sites and 4 heads per block, per incident
    # Units of one prompt are correlated, so allow three binomial standard errors over α.
    bound = alpha + 3 * math.sqrt(alpha * (1 - alpha) / n)
    assert sum(flags) / n <= bound, f"{sum(flags)} of {n} benign units flagged; nominal α = {alpha:.3f}"


def test_flags_obey_the_conformal_rule(held_out_reports) -> None:
    for report in held_out_reports:
        for a in report:
            conformal = a.features["conformal"]
            assert conformal["alpha"] == report.nominal_rate_max
            # p = (1 + #null ≥ score) / (n + 1): never below 1 / (n + 1)
            assert conformal["p_value"] >= 1 / (report.baseline_size + 1)
            assert a.flagged == (a.score > report.threshold and conformal["p_value"] <= conformal["alpha"])
            assert a.score == pytest.approx(max(abs(a.features[f]["z"]) for f in a.features if f != "conformal"))


def test_site_with_an_outlier_unit_is_flagged_and_outscores_untouched_sites(incident: Path) -> None:
    session = SandboxReplayer().load_bundle(incident)
    clean = CompressionForensics().analyze(session)
    with _outlier_on_incident(session, PERTURBED):
        report = CompressionForensics().analyze(session)

    upstream = [a for a in report if a.site.startswith(UPSTREAM)]
    assert upstream and all(a.site != PERTURBED for a in upstream)
    assert report.score(PERTURBED) > clean.score(PERTURBED)
    assert PERTURBED in [a.site for a in report.flagged]
    assert report.score(PERTURBED) > max(a.score for a in upstream)
    # untouched sites computed exactly what they computed without the noise
    for a in upstream:
        assert a.score == pytest.approx(clean.score(a.site))


def test_too_few_baseline_runs_flag_nothing_and_say_so(tiny, prompts, record_incident, tmp_path: Path) -> None:
    path = record_incident(tiny["gpt2"], prompts(1, seed=13)[0], tmp_path / "incident", prompts(6, seed=11))
    session = SandboxReplayer().load_bundle(path)
    with _outlier_on_incident(session, PERTURBED):
        report = CompressionForensics().analyze(session)
    assert report.baseline_size == 6
    assert report.score(PERTURBED) > report.threshold  # anomalous, but 6 runs cannot show it at α
    assert report.flagged == []
    assert report.false_positive_rate is None
    assert any("nothing can be flagged" in n for n in report.notes)
    assert any("false-positive rate not measured" in n for n in report.notes)


def test_report_measures_its_false_positive_rate_on_held_out_benign_runs(
    tiny, prompts, record_incident, tmp_path: Path
) -> None:
    # 48 runs: each half (24) is large enough to flag at α, so the measurement can see false positives.
    path = record_incident(tiny["gpt2"], prompts(1, seed=13)[0], tmp_path / "incident", prompts(48, seed=14))
    report = CompressionForensics().analyze(SandboxReplayer().load_bundle(path))
    assert report.baseline_size == 48
    assert report.false_positive_rate is not None
    alpha, n = report.nominal_rate_max, 24 * len(report)  # 24 held-out runs × units
    assert report.false_positive_rate <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / n)


def test_false_positive_rate_is_not_reported_when_the_measurement_cannot_flag(
    tiny, prompts, record_incident, tmp_path: Path
) -> None:
    # 30 runs: the incident can be flagged (31 ≥ 1/α) but the held-out halves (15) cannot.
    path = record_incident(tiny["gpt2"], prompts(1, seed=13)[0], tmp_path / "incident", prompts(30, seed=11))
    report = CompressionForensics().analyze(SandboxReplayer().load_bundle(path))
    half = report.baseline_size // 2
    assert (half + 1) * report.nominal_rate_max < 1  # no held-out p-value can reach α
    assert report.false_positive_rate is None or any("false-positive" in n for n in report.notes)


def test_false_positive_rate_is_measured_on_random_halves(tiny, prompts, record_incident, tmp_path: Path) -> None:
    # Benign runs that alternate two kinds (4-token and 16-token prompts): a fixed interleaved
    # split would hold one kind out against the other and flag most units; random halves
    # keep the runs exchangeable, so the measured rate stays near the nominal rate.
    g = torch.Generator().manual_seed(21)
    runs = [torch.randint(0, 50, (1, 4 if i % 2 == 0 else 16), generator=g) for i in range(48)]
    path = record_incident(tiny["gpt2"], prompts(1, seed=13)[0], tmp_path / "incident", runs)
    report = CompressionForensics().analyze(SandboxReplayer().load_bundle(path))
    alpha, n = report.nominal_rate_max, 5 * 24 * len(report)  # 5 random halvings × 24 held-out runs × units
    assert report.false_positive_rate is not None
    assert report.false_positive_rate <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / n)
