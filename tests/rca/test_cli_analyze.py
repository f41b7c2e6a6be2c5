"""`model-forensics analyze`: the fix-set table, --json, and one-line errors with exit codes
(0 ok, 1 nothing to fix, 2 bad input)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from unittest import mock

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from model_forensics import Bundle, Intervention, RecorderHooks, cli, token_is
from model_forensics.cli import app
from model_forensics.scenarios import get

WIDE = {"COLUMNS": "250"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    """bert-sentiment-bypass cut to 12 failing prompts: incident-0 and its clean baseline-0."""
    scenario = get("bert-sentiment-bypass")
    small = dataclasses.replace(
        scenario, variants=scenario.variants[:9], benign=scenario.benign[:8], baseline=scenario.baseline[:8]
    )
    return small.record(tmp_path_factory.mktemp("bert"), limit=1)


def _tiny_bundle(tiny, path: Path, predicate: bool = True) -> Path:
    loaded = tiny["gpt2"]
    with RecorderHooks().install_hooks(loaded.model) as rec, torch.no_grad():
        loaded.model(input_ids=torch.tensor([[1, 5, 9, 3]]))
        return rec.create_bundle(path, predicate=token_is(0) if predicate else None)


def _analyze(*args: str):
    # The CLI's consoles may have fixed their width when created (an earlier test's
    # environment); give the call wide consoles of its own.
    width = int(WIDE["COLUMNS"])
    with (
        mock.patch.object(cli, "console", Console(width=width)),
        mock.patch.object(cli, "err", Console(stderr=True, width=width)),
    ):
        return CliRunner().invoke(app, ["analyze", *args], env=WIDE)


def _one_clean_line(res) -> None:
    assert isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output


@pytest.fixture(scope="module")
def table(run, tmp_path_factory: pytest.TempPathFactory):
    """`analyze INCIDENT --out FILE --report HTML`: the CLI result and the analysis it wrote."""
    out = tmp_path_factory.mktemp("analysis") / "analysis.json"
    res = _analyze(str(run.incidents[0]), "--out", str(out), "--report", str(out.with_suffix(".html")))
    assert res.exit_code == 0, res.output
    return res, json.loads(out.read_text())


def test_report_is_self_contained_and_shows_the_fix_set(table, tmp_path_factory) -> None:
    _, analysis = table
    html = next(tmp_path_factory.getbasetemp().glob("analysis*/analysis.html")).read_text()
    fix = analysis["fix_set"]
    assert html.startswith("<!doctype html>") and html.rstrip().endswith("</html>")
    # The one-file dashboard report: the UI inlined, the analysis embedded as its data, opening on
    # the RCA view; nothing is fetched.
    assert html.count('<script type="module">') == 1 and "http://" not in html and "https://" not in html
    data = json.loads(re.search(r"window\.__MF_DATA__ = (.*?);</script>", html, flags=re.S).group(1))
    assert next(iter(data["analyses"].values()))["analysis"] == analysis
    assert data["start"].endswith("/rca")
    # For readers without JavaScript, the static analysis with its inline PNG figures (anomaly
    # scores, member necessity/sufficiency).
    html = html[html.index("<noscript>") : html.index("</noscript>")]
    assert html.count("src='data:image/png;base64,") == 2
    for member in fix["members"]:
        assert f"{member['intervention']['site']}:{member['intervention']['kind']}" in html
    assert f"{fix['total_flip_rate']:.0%}</span> of {len(fix['flips'])} failing variants" in html
    for anomaly in analysis["anomalies"]["anomalies"][:20]:
        assert anomaly["site"] in html


def test_report_to_a_missing_directory_is_bad_input(run, tmp_path) -> None:
    res = _analyze(str(run.incidents[0]), "--report", str(tmp_path / "missing" / "r.html"))
    assert res.exit_code == 2
    _one_clean_line(res)
    assert "--report" in res.output and "existing directory" in res.output


def test_analyze_shows_the_fix_set_table_after_the_conclusion(table) -> None:
    res, analysis = table
    fix = analysis["fix_set"]
    assert fix["members"]
    out = res.stdout
    n = len(fix["members"])
    title = f"Fix set: {n} intervention{'s' if n != 1 else ''}, flip rate {fix['total_flip_rate']:.0%}"
    assert out.index("Conclusion") < out.index(title)
    after = out[out.index(title) :]
    for member in fix["members"]:
        iv = member["intervention"]
        assert f"{iv['site']}:{iv['kind']}" in after
    assert f"on {len(fix['flips'])} failing variants" in " ".join(after.split())


def test_analyze_shows_why_cf_flagged_nothing(run, tmp_path: Path) -> None:
    res = _analyze(str(run.incidents[0]), "--anomalies", "--out", str(tmp_path / "a.json"))
    assert res.exit_code == 0, res.output
    notes = json.loads((tmp_path / "a.json").read_text())["anomalies"]["notes"]
    assert any("nothing can be flagged" in n for n in notes)  # 16 benign runs < 1/α − 1
    out = res.stdout.replace("\n", "")
    assert out.index("Conclusion") < out.index("CF anomalies")
    assert all(n.replace(" ", "") in out.replace(" ", "") for n in notes)


def test_analyze_json_parses(run) -> None:
    res = _analyze(str(run.incidents[0]), "--json")
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["bundle"] == str(run.incidents[0])
    assert result["anomalies"]["anomalies"] and result["ranking"]["units"]
    fix = result["fix_set"]
    assert [Intervention.from_json(iv).site for iv in fix["interventions"]] == [m["unit"] for m in fix["members"]]
    assert 0.0 <= fix["total_flip_rate"] <= 1.0 and len(fix["flips"]) > 0


def test_baseline_from_another_model_is_a_clear_error(run, tiny, tmp_path: Path) -> None:
    other = _tiny_bundle(tiny, tmp_path / "tiny-gpt2")
    res = _analyze(str(run.incidents[0]), "--baseline", str(other))
    assert res.exit_code == 2
    _one_clean_line(res)
    assert f"baseline bundle '{other}' was recorded with model" in res.output.replace("\n", "")
    assert "record the baseline with the incident's model" in res.output.replace("\n", "")


def test_incident_whose_predicate_does_not_hold_has_nothing_to_fix(run) -> None:
    res = _analyze(str(run.baselines[0]))
    assert res.exit_code == 1
    _one_clean_line(res)
    assert "nothing to fix" in res.output


def test_bundle_without_a_predicate_is_bad_input(tiny, tmp_path: Path) -> None:
    res = _analyze(str(_tiny_bundle(tiny, tmp_path / "no-predicate", predicate=False)))
    assert res.exit_code == 2
    _one_clean_line(res)
    assert "no failure predicate" in res.output


def test_missing_bundle_is_bad_input(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-bundle"
    res = _analyze(str(missing))
    assert res.exit_code == 2
    _one_clean_line(res)
    assert "error:" in res.output and "no-such-bundle" in res.output


def test_unknown_strategy_is_bad_input(run) -> None:
    res = _analyze(str(run.incidents[0]), "--strategy", "exhaustiv")
    assert res.exit_code == 2
    assert "greedy" in res.output and "exhaustive" in res.output


@pytest.mark.parametrize("option", ["--directions", "--gating"])
def test_unknown_directions_or_gating_mode_is_bad_input(run, option) -> None:
    res = _analyze(str(run.incidents[0]), option, "sometimes")
    assert res.exit_code == 2
    _one_clean_line(res)
    assert "'auto', 'always' or 'never'" in res.output


def test_baseline_bundles_feed_the_mean_ablation_values(run) -> None:
    from model_forensics.rca.runs import add_baseline_bundles
    from model_forensics.replay import SandboxReplayer

    session = SandboxReplayer().load_bundle(run.incidents[0])
    own = list(session.baselines)
    fix = [Intervention("blocks.1.attn.head.0", "mean")]
    before = session.run(fix).logits
    add_baseline_bundles(session, [run.baselines[0]])
    assert len(session.baselines) == len(own) + 1
    with_bundle = session.run(fix).logits
    session.set_baseline([*own, session.encode({"input_ids": Bundle.open(run.baselines[0]).inputs["input_ids"]})])
    assert torch.equal(with_bundle, session.run(fix).logits)  # the bundle's input joined the mean
    assert not torch.equal(before, with_bundle)
