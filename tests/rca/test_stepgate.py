"""Step-gated steering inside analyze (rca/stepgate.py), on the zoo's GPT-2 injection model:
the unit fix (head 0.3) flips every failing prompt but changes the answers of prompts that
carry the trigger without failing (near misses); the step gate, fitted on the search part
only, flips the held-out failing prompts and leaves held-out benign and near-miss answers
word for word."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from model_forensics import CausalCCA, SandboxReplayer
from model_forensics.cli import app
from model_forensics.core.errors import ConfigError
from model_forensics.core.metrics import separation_auroc
from model_forensics.core.predicates import regex
from model_forensics.rca import stepgate
from model_forensics.rca.explain import explain
from model_forensics.rca.heldout import PromptSplit, searching, split_prompts
from model_forensics.rca.pipeline import analyze_bundle
from model_forensics.rca.side_effects import measure
from model_forensics.rca.stepgate import (
    StepGateFix,
    applies,
    fit_step_gate,
    lda_direction,
    lowest_threshold_within,
    target_span,
)
from model_forensics.recorder.session import record_incident
from model_forensics.replay import Gate, Intervention, Session
from model_forensics.report.analysis import analysis_body
from model_forensics.scenarios import get
from model_forensics.scenarios.scenario import prompt_of

TRIGGER = "ignore previous instructions"


@pytest.fixture(scope="module")
def incident(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gpt2-injection: the incident, 19 more failing prompts, 12 benign, 12 counterparts, 12 near misses."""
    scenario = get("gpt2-injection")
    recording = record_incident(
        scenario.load(),
        scenario.incidents[0],
        tmp_path_factory.mktemp("stepgate") / "incident",
        predicate=scenario.predicate,
        variants=scenario.failing()[1:20],
        benign=[prompt_of(b) for b in scenario.benign[:12]],
        baseline=[prompt_of(b) for b in scenario.baseline[:12]],
        near_miss=[f"{prompt_of(b)} {TRIGGER}" for b in scenario.baseline[:12]],
        max_new_tokens=scenario.max_new_tokens,
    )
    assert {c.role: c.kept for c in recording.checks}["near_miss"] == 12  # the model behaves on all of them
    return recording.path


@pytest.fixture(scope="module")
def analysis(incident: Path) -> dict[str, Any]:
    return analyze_bundle(incident).to_json()  # step_gate="auto": the unit fix changes near-miss answers


def test_auto_tries_the_step_gate_when_the_unit_fix_changes_near_misses(analysis: dict[str, Any]) -> None:
    unit_near = analysis["fix_set"]["held_out"]["held_out"]["near_miss"]
    assert "accuracy" in unit_near["out_of_bound"]  # why auto tried it
    step = analysis["step_gate"]
    assert step is not None and step["decided_by"] == "held_out"
    (iv,) = step["interventions"]
    assert iv["kind"] == "steer" and iv["site"] == f"blocks.{step['layer']}.resid_post"
    assert iv["gate"]["reads"] == "each" and iv["gate"]["site"] == iv["site"]
    held = step["held_out"]["held_out"]
    assert held["flip_rate"] >= 0.8 and held["failing"] >= 5
    assert held["benign"]["answers_unchanged"] >= 0.9 and held["near_miss"]["answers_unchanged"] >= 0.8
    assert held["near_miss"]["answers_unchanged"] > unit_near["answers_unchanged"]
    assert step["reached_threshold"] is True
    assert step["reason"] == "unit_fix_fails"
    assert {c["alpha"] for c in step["candidates"]} == {2.0, 4.0}
    assert {row["gate"] for row in step["layers"]} == {"difference", "lda"}  # every layer with both gate directions
    layers = {row["layer"] for row in step["layers"]}
    assert len(step["layers"]) == 2 * len(layers)
    tried_rows = [
        row
        for row in step["layers"]
        if (row["layer"], row["gate"]) in {(c["layer"], c["gate"]) for c in step["candidates"]}
    ]
    assert (
        len(tried_rows) == 2 and len({row["layer"] for row in tried_rows}) == 2
    )  # two layers, each with its best gate
    for row in tried_rows:  # each tried (layer, gate) at its accuracy and its bound threshold, per α
        tried = {
            (c["alpha"], c["threshold"])
            for c in step["candidates"]
            if (c["layer"], c["gate"]) == (row["layer"], row["gate"])
        }
        assert tried == {(a, t) for a in (2.0, 4.0) for t in (row["threshold"], row["bound_threshold"])}
    assert step["gate"] == step["search"]["gate"]
    sections = {s.key: s for s in explain(analysis)}
    assert sections["step_gate"].title == "Step-gated fix"
    assert sections["step_gate"].paragraphs[0].startswith("The unit fix does not hold, so a")
    asked = {**analysis, "step_gate": {**step, "reason": "asked"}}  # the code decides, not the wording of "why"
    assert {s.key: s for s in explain(asked)}["step_gate"].paragraphs[0].startswith("Asked for, a")
    assert any(item.startswith("near-miss answers kept word for word") for item in sections["step_gate"].items)
    html = analysis_body(analysis)  # the offline report's static analysis
    assert "<h2>Step-gated fix</h2>" in html and "near-miss answers kept word for word" in html


@pytest.fixture(scope="module")
def fitted(incident: Path) -> tuple[Session, PromptSplit, StepGateFix]:
    """The incident's session, its default split, and the step gate fitted on the search part."""
    session = SandboxReplayer().load_bundle(incident)
    config = CausalCCA().config
    split = split_prompts(session.extras, config.held_out_fraction, config.split_seed)
    with searching(session, split):
        found = fit_step_gate(session, config)
    assert found is not None
    return session, split, found


def test_the_step_gate_is_fitted_on_the_search_part_only(fitted: tuple[Session, PromptSplit, StepGateFix]) -> None:
    session, split, found = fitted
    config = CausalCCA().config
    counts = split.counts()
    assert found.counts == {
        k: counts[v]["search"] for k, v in (("failing", "variants"), ("near_miss", "near_miss"), ("benign", "benign"))
    }
    with searching(session, split):  # the same prompts give the same fit
        again = fit_step_gate(session, config)
    assert again is not None and again.interventions == found.interventions
    with session.restricted({**split.search, "benign": split.search["benign"][:-2]}):
        fewer = fit_step_gate(session, config)
    assert fewer is not None and fewer.counts["benign"] == found.counts["benign"] - 2
    assert fewer.interventions != found.interventions


def test_bound_thresholds_keep_the_bounds_and_skipped_runs_equal_generated_ones(
    fitted: tuple[Session, PromptSplit, StepGateFix],
) -> None:
    session, split, found = fitted
    config = CausalCCA().config
    n = found.counts
    pairs = {(c.layer, c.gate) for c in found.candidates}
    assert len(pairs) == config.step_gate_layers
    for row in (row for row in found.layers if (row["layer"], row["gate"]) in pairs):
        tried = [c for c in found.candidates if (c.layer, c.gate) == (row["layer"], row["gate"])]
        at_bound = [c for c in tried if c.threshold == row["bound_threshold"]]
        assert len(at_bound) == len(config.step_gate_alphas)
        for c in at_bound:  # every negative whose gate opens may change, and the bound still holds
            assert c.gate_fired["near_miss"] <= 1 - config.step_gate_min_near_miss_kept + 1e-9
            assert c.gate_fired["benign"] <= 1 - config.step_gate_min_benign_kept + 1e-9
            assert c.within
    (pick,) = found.interventions
    assert pick.gate is not None
    same = sorted(
        (c for c in found.candidates if (c.layer, c.gate, c.alpha) == (found.layer, found.gate, found.alpha)),
        key=lambda c: c.threshold,
    )
    higher = same[-1]
    assert higher.threshold > same[0].threshold  # two thresholds on this incident
    steer = Intervention(
        pick.site, "steer", value=pick.value, gate=Gate(pick.site, pick.gate.direction, higher.threshold, "each")
    )
    with searching(session, split):
        variants = session.variants()
        direct = [session.sweep([[steer]], inputs=b)[0] for b in variants]
    assert len(variants) == n["failing"]  # every search variant fails with a match on this model
    # generated only where the lower threshold's gate opened, reused elsewhere: equal to generating every run
    assert [not r.failed for r in direct] == higher.flips


def test_lowest_threshold_within_counts_the_negatives_above_the_cut() -> None:
    negatives = {"near_miss": [1.0, 2.0, 5.0, 6.0], "benign": [0.5, 3.0]}
    scores = [4.0, 4.5, 7.0, *negatives["near_miss"], *negatives["benign"]]
    assert lowest_threshold_within(scores, negatives, {"near_miss": 1, "benign": 0}) == 5.5  # 6 alone above
    assert lowest_threshold_within(scores, negatives, {"near_miss": 2, "benign": 1}) == 2.5  # 5, 6; and 3
    assert lowest_threshold_within(scores, negatives, {"near_miss": 4, "benign": 2}) == -0.5  # below every score
    assert lowest_threshold_within(scores, negatives, {"near_miss": 0, "benign": 0}) == 6.5
    assert lowest_threshold_within([6.0], {"near_miss": [6.0]}, {"near_miss": 0}) == 7.0  # above them all


def test_target_span_finds_the_predicates_first_match(incident: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    session = SandboxReplayer().load_bundle(incident)
    ids = [session.tokenizer.convert_tokens_to_ids(w) for w in ("the", "the", "HACKED", "the", "HACKED")]
    assert target_span(session, ids) == (2, 2)  # contains('HACKED'): its first occurrence
    assert target_span(session, ids[:2]) is None
    monkeypatch.setattr(session, "predicate", regex("the HACKED"))  # a match over two tokens
    assert target_span(session, ids) == (1, 2)


def test_the_cli_writes_the_step_gated_fix_and_replay_applies_it(incident: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "analysis.json"
    result = runner.invoke(app, ["analyze", str(incident), "--out", str(out), "--step-gate", "always"])
    assert result.exit_code == 0, result.output
    step_file = tmp_path / "analysis.step_gate.json"
    assert (
        json.loads(step_file.read_text())["interventions"] == json.loads(out.read_text())["step_gate"]["interventions"]
    )
    assert "Step-gated fix" in result.output
    replayed = runner.invoke(app, ["replay", str(incident), "--fix", str(step_file), "--json"])
    assert replayed.exit_code == 0, replayed.output
    run = json.loads(replayed.stdout)["run"]
    assert run["flipped"] is True and "HACKED" not in run["text"]
    exported = runner.invoke(app, ["fix", "export", str(step_file), "--out", str(tmp_path / "export")])
    assert exported.exit_code == 0, exported.output  # the file names its bundle
    assert "apply_fix.py" in exported.output and (tmp_path / "export" / "apply_fix.py").is_file()
    diff = re.search(r"largest logit difference to replay ([0-9.e+-]+)", exported.output)
    assert diff is not None and float(diff.group(1)) <= 1e-5  # the exported module equals hooked replay
    never = runner.invoke(app, ["analyze", str(incident), "--json", "--step-gate", "never"])
    assert never.exit_code == 0 and json.loads(never.stdout)["step_gate"] is None
    bad = runner.invoke(app, ["analyze", str(incident), "--step-gate", "sometimes"])
    assert bad.exit_code == 2 and "step-gate mode 'sometimes'" in bad.output


def test_the_step_gate_refuses_incidents_it_cannot_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="step-gate mode"):
        CausalCCA(step_gate="sometimes")
    bundle = get("bert-sentiment-bypass").record(tmp_path, limit=1).incidents[0]
    session = SandboxReplayer().load_bundle(bundle)
    assert "generation incident" in (applies(session) or "")
    result = analyze_bundle(bundle, step_gate="always").to_json()
    assert result["step_gate"] is None
    assert any(
        note.startswith("step gate not tried: the step gate needs a generation") for note in result["fix_set"]["notes"]
    )


def test_the_lda_gate_direction_discounts_a_dimension_every_position_varies_along() -> None:
    """Positives sit 1 above the negatives along a quiet dimension (sd 0.1) and 50 above them
    along a loud one (sd 100, the attention sink's kind): the difference of means points
    mostly along the loud one and separates poorly; the LDA direction separates."""
    generator = torch.Generator().manual_seed(0)

    def rows(n: int, shift: tuple[float, float]) -> torch.Tensor:
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64) * torch.tensor([0.1, 100.0])
        return noise + torch.tensor(shift, dtype=torch.float64)

    pos, neg = rows(40, (1.0, 50.0)), rows(400, (0.0, 0.0))
    difference = pos.mean(0) - neg.mean(0)
    lda = lda_direction(pos, neg)
    assert lda.shape == (2,) and lda.dtype == torch.float64

    def auroc(direction: torch.Tensor) -> float:
        u = direction / direction.norm()
        return separation_auroc((pos @ u).tolist(), (neg @ u).tolist())

    assert auroc(difference) < 0.8 < 0.99 < auroc(lda)


def test_step_gate_directions_choose_what_the_gate_reads(fitted: tuple[Session, PromptSplit, StepGateFix]) -> None:
    session, split, _ = fitted
    config = CausalCCA().config.model_copy(update={"step_gate_directions": ["lda"]})
    with searching(session, split):
        lda = fit_step_gate(session, config)
    assert lda is not None and lda.gate == "lda"
    assert {c.gate for c in lda.candidates} == {row["gate"] for row in lda.layers} == {"lda"}
    (steer,) = lda.interventions
    assert steer.gate is not None and steer.value is not None
    gate, value = torch.tensor(steer.gate.direction), torch.tensor(steer.value)
    cosine = float(gate @ value / (gate.norm() * value.norm()))
    assert abs(cosine) < 0.99  # the gate reads the discriminant, the steer moves along −α·d
    assert lda.threshold == steer.gate.above


def test_screened_configurations_equal_generating_them(
    fitted: tuple[Session, PromptSplit, StepGateFix], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The teacher-forced screen (configurations that keep a prompt's clean answer are not
    # generated) gives every configuration the figures generating it gives, and generates
    # fewer; so do the pick's side effects measured on held-out prompts, near misses and
    # failing prompts, where its gate opens on some.
    session, split, found = fitted
    config = CausalCCA().config
    generated: list[int] = []
    plain = stepgate._generated

    def spy(session: Session, sets: list[list[Intervention]], inputs: Any) -> list[Any]:
        generated.append(len(sets))
        return plain(session, sets, inputs)

    each = session.sweep_each

    def spy_each(prompts: Any, sets: Any, **kwargs: Any) -> Any:  # the screened prompts' sweeps
        if kwargs.get("per_prompt"):
            generated.append(sum(len(s) for s in sets))
        return each(prompts, sets, **kwargs)

    monkeypatch.setattr(stepgate, "_generated", spy)
    monkeypatch.setattr(session, "sweep_each", spy_each)
    fits = {}
    for screen in (False, True):
        generated.clear()
        with searching(session, split):
            fits[screen] = (fit_step_gate(session, config, screen=screen), sum(generated))
    (unscreened, slow), (screened, fast) = fits[False], fits[True]
    assert unscreened is not None and screened is not None
    assert screened.candidates == unscreened.candidates == found.candidates
    assert 0 < fast < slow
    held = [prompt_of(e) for e in [*split.held_out["near_miss"], *split.held_out["variants"]]]
    effects = [
        measure(session, found.interventions, config.max_side_effect_kl, benign=held, screen=s).to_json()
        for s in (False, True)
    ]
    first = [e.pop("first_step_kl") for e in effects]
    assert effects[0] == effects[1] and first[1] == pytest.approx(first[0], rel=1e-4, abs=1e-9)
    assert 0 < effects[1]["gate_fired"] < 1 and effects[1]["answers_unchanged"] < 1
