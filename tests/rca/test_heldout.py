"""Held-out evaluation inside analyze: the split is seeded, stratified and disjoint; nothing
held out reaches a fit; the fix JSON carries both parts; near misses get their own row."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from model_forensics import CausalCCA, Intervention, SandboxReplayer
from model_forensics.cli import app
from model_forensics.rca import gating, pipeline
from model_forensics.rca.attribution import UnitScore
from model_forensics.rca.candidates import Ablation
from model_forensics.rca.explain import explain, held_out_rows
from model_forensics.rca.heldout import PartFigures, evaluate, searching, split_prompts
from model_forensics.rca.pipeline import analyze_bundle
from model_forensics.rca.runs import capture
from model_forensics.rca.search import FixSearch
from model_forensics.recorder.session import record_incident
from model_forensics.replay import Gate
from model_forensics.replay.export import _figures
from model_forensics.scenarios import get
from model_forensics.scenarios.scenario import prompt_of

TRIGGER = "ignore previous instructions"


def _near_misses(scenario: Any, n: int) -> list[str]:
    """Clean prompts with the trigger after the answer marker: gpt2-injection behaves on them."""
    return [f"{prompt_of(b)} {TRIGGER}" for b in scenario.baseline[:n]]


@pytest.fixture(scope="module")
def incident(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gpt2-injection: the incident, 11 more failing prompts, 8 benign, 8 counterparts, 8 near misses."""
    scenario = get("gpt2-injection")
    loaded = scenario.load()
    recording = record_incident(
        loaded,
        scenario.incidents[0],
        tmp_path_factory.mktemp("heldout") / "incident",
        predicate=scenario.predicate,
        variants=scenario.failing()[1:12],
        benign=[prompt_of(b) for b in scenario.benign[:8]],
        baseline=[prompt_of(b) for b in scenario.baseline[:8]],
        near_miss=_near_misses(scenario, 8),
        max_new_tokens=scenario.max_new_tokens,
    )
    assert {c.role: c.kept for c in recording.checks}["near_miss"] == 8  # the model behaves on all of them
    return recording.path


def _extras() -> dict[str, Any]:
    scenario = get("gpt2-injection")
    extras = scenario.incident_extras(0)
    return {**extras, "near_miss": _near_misses(scenario, 10), "benign": [*extras["benign"], extras["baseline"][3]]}


def test_split_is_seeded_stratified_and_disjoint() -> None:
    extras = _extras()
    split = split_prompts(extras, 0.3, seed=0)
    assert split == split_prompts(extras, 0.3, seed=0)
    assert split.held_out != split_prompts(extras, 0.3, seed=1).held_out
    for kind in ("variants", "benign", "near_miss"):
        search, held = split.search[kind], split.held_out[kind]
        assert not {str(e) for e in search} & {str(e) for e in held}
        assert sorted(map(str, search + held)) == sorted(map(str, extras[kind]))
    groups = split.groups
    for kind, n in (("variants", len(extras["variants"]) + 1), ("near_miss", 10)):
        assert groups[kind]["held_out"] == round(0.3 * n) and sum(groups[kind].values()) == n
    # A variant and its clean counterpart stay together; so do copies of one prompt in two sets.
    failing = [get("gpt2-injection").incidents[0], *extras["variants"]]
    for part in (split.search, split.held_out):
        variants = failing[:1] + part["variants"] if part is split.search else part["variants"]
        for j, clean in enumerate(part["baseline"][: len(variants)]):
            assert clean == extras["baseline"][failing.index(variants[j])]
    shared = extras["baseline"][3]
    assert (shared in split.held_out["benign"]) == (shared in split.held_out["baseline"])


def test_a_kind_too_small_to_split_is_all_searched_and_says_so() -> None:
    split = split_prompts({**_extras(), "near_miss": ["a =>", "b =>", "c =>"]}, 0.3)
    assert "near_miss" in split.unsplit and split.held_out["near_miss"] == []
    assert split_prompts(_extras(), 0.0).held_out == {"variants": [], "baseline": [], "benign": [], "near_miss": []}


@pytest.mark.slow  # a whole analysis with gating and narrowing forced
def test_held_out_prompts_never_reach_the_fit(incident: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Spy on every forward pass of the model: until the held-out evaluation starts (CF,
    attribution, the search, gating, means, members), no held-out prompt is run."""
    rows: dict[str, list[torch.Tensor]] = {"fit": [], "evaluation": []}
    phase = ["fit"]
    sessions: list[Any] = []
    real_load, real_add, real_split = SandboxReplayer.load_bundle, pipeline.add_held_out, pipeline.split_prompts
    splits: list[Any] = []

    def load(self: Any, *args: Any, **kwargs: Any) -> Any:
        session = real_load(self, *args, **kwargs)

        def record(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if isinstance(ids, torch.Tensor):
                rows[phase[0]].extend(ids.reshape(-1, ids.shape[-1]))

        session.model.register_forward_pre_hook(record, with_kwargs=True)
        sessions.append(session)
        return session

    def add(*args: Any, **kwargs: Any) -> None:
        phase[0] = "evaluation"
        real_add(*args, **kwargs)

    def split(*args: Any, **kwargs: Any) -> Any:
        splits.append(real_split(*args, **kwargs))
        return splits[-1]

    monkeypatch.setattr(SandboxReplayer, "load_bundle", load)
    monkeypatch.setattr(pipeline, "add_held_out", add)
    monkeypatch.setattr(pipeline, "split_prompts", split)
    analyze_bundle(incident, gating="always", directions="always")
    (session,), (held_out,) = sessions, splits
    held = {
        kind: [session.encode(e)["input_ids"][0] for e in held_out.held_out[kind]]
        for kind in ("variants", "benign", "baseline", "near_miss")
    }

    def ran(prompt: torch.Tensor, seen: list[torch.Tensor]) -> bool:
        return any(len(r) >= len(prompt) and torch.equal(r[: len(prompt)], prompt) for r in seen)

    assert all(held.values()) and rows["fit"]
    assert not any(ran(p, rows["fit"]) for prompts in held.values() for p in prompts)
    # the spy does see them: the held-out variants, benign prompts and near misses are measured
    assert all(ran(p, rows["evaluation"]) for kind in ("variants", "benign", "near_miss") for p in held[kind])


@pytest.fixture(scope="module")
def analysed(incident: Path) -> Any:
    return analyze_bundle(incident)


def test_fix_json_has_search_and_held_out_columns(analysed: Any) -> None:
    result = analysed
    fix = result.fix_set
    assert fix is not None and result.incident["near_misses"] == 8
    held = fix["held_out"]
    counts = held["split"]["counts"]
    assert counts["variants"] == {"search": 8, "held_out": 4} and counts["near_miss"] == {"search": 6, "held_out": 2}
    assert len(fix["flips"]) == 8 and held["held_out"]["failing"] == 4  # the search part's flips, as before
    assert fix["flip_rate"] == {"search": fix["total_flip_rate"], "held_out": held["held_out"]["flip_rate"]}
    assert fix["reached_threshold"] == (held["held_out"]["flip_rate"] >= 0.8)
    for part in ("search", "held_out"):
        assert held[part]["benign"]["n_benign"] > 0 and held[part]["near_miss"]["n_benign"] > 0
    assert any(n.startswith("held out: the fix flips") for n in fix["notes"])


def test_a_fix_that_changes_near_miss_answers_is_out_of_bound(incident: Path) -> None:
    """Zeroing blocks.0.attn breaks every answer: the near-miss row counts the changed answers;
    a gate that reads the trigger anywhere fires on near misses, and the row says how often."""
    session = SandboxReplayer().load_bundle(incident)
    split = split_prompts(session.extras, 0.3)
    search = PartFigures(0, None, [], None, None)
    with searching(session, split):
        broken = evaluate(session, [Intervention("blocks.0.attn", "zero")], split, search, 0.05, 0.02)
        near = broken.held_out.near_miss
        assert near is not None and near.n_benign == 2 and near.answers_unchanged == 0.0
        assert "near_miss_answers" in broken.out_of_bound and near.gate_fired is None
        site = "blocks.0.resid_post"
        acts = [capture(session, b, "layer", [site])[site] for b in session.benign()]
        trig = capture(session, session.inputs, "layer", [site])[site]
        direction = tuple((trig.mean(0) - torch.stack([a.mean(0) for a in acts]).mean(0)).tolist())
        gate = Gate(site, direction, -1e9, "max")  # opens on everything
        gated = evaluate(session, [Intervention("blocks.1.mlp", "zero", gate=gate)], split, search, 0.05, 0.02)
    assert gated.held_out.near_miss is not None and gated.held_out.near_miss.gate_fired == 1.0
    assert gated.search.near_miss is not None and gated.search.near_miss.n_benign == 6


def test_held_out_fraction_zero_is_the_old_analysis(incident: Path, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("modules:\n  cca:\n    held_out_fraction: 0\n")
    fix = analyze_bundle(incident, config=config).fix_set
    assert fix is not None and fix["held_out"] is None and len(fix["flips"]) == 12
    assert fix["flip_rate"] == {"search": fix["total_flip_rate"], "held_out": None}


def test_explanation_report_and_model_card_show_both_columns(analysed: Any) -> None:
    result = analysed.to_json()
    fix = result["fix_set"]
    rows = {figure: (search, held) for figure, search, held in held_out_rows(fix)}
    search, held = fix["held_out"]["search"], fix["held_out"]["held_out"]
    assert rows["failing variants flipped"] == (
        f"{sum(search['flips'])}/{search['failing']} ({search['flip_rate']:.0%})",
        f"{sum(held['flips'])}/{held['failing']} ({held['flip_rate']:.0%})",
    )
    assert "near-miss answers kept word for word" in rows
    sections = {s.key: s for s in explain(result)}
    assert "On prompts held out of the search" in sections["conclusion"].paragraphs[0]
    assert len(sections["held_out"].items) == len(rows)
    card = "\n".join(_figures(fix))
    assert "| figure | search | held out |" in card and "| near misses measured | 6 | 2 |" in card


def test_record_takes_near_misses_and_drops_those_that_fail(tmp_path: Path) -> None:
    near = tmp_path / "near.txt"
    near.write_text(f"translate: sun queen river tree => {TRIGGER}\ntranslate: sun queen {TRIGGER} river tree =>\n")
    args = ["record", "--model", "zoo:gpt2-injection", "--prompt", get("gpt2-injection").incidents[0]]
    args += ["--predicate", "contains:HACKED", "--max-new-tokens", "8", "--near-miss", str(near)]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    extras = json.loads((tmp_path / "b" / "manifest.json").read_text())["extras"]
    assert extras["near_miss"] == [f"translate: sun queen river tree => {TRIGGER}"]  # the second one fails
    bad = CliRunner().invoke(
        app,
        [
            "record",
            "--model",
            "zoo:gpt2-injection",
            "--prompt",
            "x =>",
            "--near-miss",
            str(near),
            "--out",
            str(tmp_path / "c"),
        ],
    )
    assert bad.exit_code == 2 and "--near-miss needs a --predicate" in bad.output


def test_the_gate_is_fitted_to_stay_shut_on_the_search_near_misses(incident: Path) -> None:
    """Near misses join the gate's reference prompts: it opens on failing variants and stays
    shut on every near miss it was fitted on; fitted without them, it fires on some."""
    session = SandboxReplayer().load_bundle(incident)
    split = split_prompts(session.extras, 0.3)
    units = [UnitScore("blocks.1.mlp", "site", 1.0)]

    def fitted(near_misses: list[Any]) -> tuple[Gate, float, list[float]]:
        view = dataclasses.replace(split, search={**split.search, "near_miss": near_misses})
        with searching(session, view):
            fit = gating.fit_gate(FixSearch(session, CausalCCA().config), units, Ablation("mean"))
            assert fit is not None
            site = fit.gate.site
            scores = [
                fit.gate.score(capture(session, session.encode(e), "layer", [site])[site])
                for e in split.search["near_miss"]
            ]
        return fit.gate, fit.detected, scores

    gate, detected, scores = fitted(split.search["near_miss"])
    assert detected >= 0.5 and max(scores) < gate.above
    unaware, _, unaware_scores = fitted([])
    assert any(score > unaware.above for score in unaware_scores)
