"""`model-forensics report BUNDLE -o report.html`: one self-contained file whose embedded data is
what the server's data functions return, and `analyze --report` as the same report."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from model_forensics.cli import app
from model_forensics.core.bundle import Bundle
from model_forensics.core.errors import BundleError
from model_forensics.report.html import dequantized, report_data, write_report
from model_forensics.scenarios import get
from model_forensics.server import data


@pytest.fixture(scope="module")
def incident(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gpt2-injection's incident-0 (head granularity: attention patterns recorded)."""
    scenario = get("gpt2-injection")
    small = dataclasses.replace(
        scenario, variants=scenario.variants[:3], benign=scenario.benign[:3], baseline=scenario.baseline[:3]
    )
    return small.record(tmp_path_factory.mktemp("inj"), limit=1).incidents[0]


@pytest.fixture(scope="module")
def analysis(incident: Path) -> dict:
    """A small analysis JSON of the incident, in the shape `analyze --out` writes."""
    return {
        "bundle": str(incident),
        "forward_passes": 10,
        "seconds": 1.0,
        "anomalies": {
            "threshold": 3,
            "baseline_size": 3,
            "anomalies": [{"site": "blocks.1.attn", "score": 5.0, "flagged": True}],
        },
        "ranking": {"units": [{"unit": "blocks.1.attn.head.2", "level": "head", "score": 0.5}]},
        "fix_set": None,
    }


def embedded(html: str) -> dict:
    match = re.search(r"<script>window\.__MF_DATA__ = (.*?);</script>", html, flags=re.S)
    assert match, "no embedded data"
    return json.loads(match.group(1))


@pytest.fixture(scope="module")
def report(incident: Path, analysis: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("report") / "report.html"
    analysis_file = out.with_name("a.json")
    analysis_file.write_text(json.dumps(analysis))
    res = CliRunner().invoke(app, ["report", str(incident), "--analysis", str(analysis_file), "-o", str(out)])
    assert res.exit_code == 0, res.output
    return out, out.read_text()


def test_report_is_one_file_with_no_urls_and_the_ui_inlined(report) -> None:
    path, html = report
    assert html.startswith("<!doctype html>") and html.rstrip().endswith("</html>")
    assert "http://" not in html and "https://" not in html
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", html), "an external resource"
    assert "<base" not in html  # routes are #/… in the report
    assert html.count('<script type="module">') == 1 and "<style>" in html
    assert {p.name for p in path.parent.iterdir()} == {"report.html", "a.json"}


def test_embedded_data_equals_the_data_functions(report, incident: Path, analysis: dict) -> None:
    got = embedded(report[1])
    bundle = Bundle.open(incident)
    root = incident.parent
    bid = data.bundle_id_of(root, incident)
    assert got["start"] == f"/bundle/{bid}/rca"
    assert got["bundles"] == [json.loads(data.bundle_summary(root, incident, bundle=bundle).model_dump_json())]
    for metric in data.cube_metrics(bundle.cube()):
        want = data.cube_slice(bundle, metric, max_tokens=256).model_dump()
        assert got["cubes"][bid][metric] == want
    detail = got["details"][bid]
    assert detail["tokens"] == data.tokens_of(bundle) and detail["heads"] == 4
    assert got["analyses"][bid]["analysis"] == analysis
    layers = detail["attention_layers"]
    assert layers == data.bundle_detail(root, incident, bundle, []).attention_layers  # tiny: every layer fits
    for layer in layers:
        for head in range(detail["heads"]):
            entry = got["attention"][bid][f"{layer}:{head}"]
            want = data.attention(bundle, layer, head).matrix
            decoded = dequantized(entry)
            assert len(decoded) == len(want)
            assert (
                max(abs(a - b) for ra, rb in zip(decoded, want, strict=True) for a, b in zip(ra, rb, strict=True))
                <= 0.5 / 255 + 1e-9
            )
            assert entry["kv_group"] == data.attention(bundle, layer, head).kv_group


def test_influence_is_embedded_from_a_replay(report) -> None:
    got = embedded(report[1])
    (influence,) = next(iter(got["influence"].values())).values()
    assert influence["method"] == "grad_x_input"
    assert len(influence["scores"]) == len(influence["tokens"]) > 0
    assert any(s != 0 for s in influence["scores"])


def test_an_attention_budget_keeps_the_layers_the_analysis_names(incident: Path, analysis: dict, monkeypatch) -> None:
    from model_forensics.report import html

    monkeypatch.setattr(html, "ATTENTION_BUDGET_BYTES", 1)  # room for one layer only
    got = report_data(incident, analysis=analysis, influence=False)
    (detail,) = got["details"].values()
    assert detail["attention_layers"] == [1]  # the analysis's anomaly is at blocks.1
    assert any("Attention of 1 of 2 layers" in n for n in got["notes"])


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, incident: Path) -> None:
    res = CliRunner().invoke(app, ["report", str(tmp_path / "nope"), "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 2 and "does not exist" in res.output and "Traceback" not in res.output
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "an analysis"}')
    with pytest.raises(BundleError, match="is not an analysis"):
        write_report(incident, tmp_path / "r.html", analysis=bad, influence=False)
    res = CliRunner().invoke(app, ["report", str(incident), "--inspect", str(tmp_path), "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 2 and "holds no results.json" in res.output
    assert not (tmp_path / "r.html").exists()


def test_inspection_plots_are_embedded_as_data_urls(tmp_path: Path, incident: Path) -> None:
    import base64

    folder = tmp_path / "inspect-out"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"experiments": ["sparsity"], "model": "zoo:gpt2-injection"}))
    png = base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    )
    (folder / "sparsity.png").write_bytes(png)
    got = report_data(incident, inspect=folder, influence=False)
    assert [i["experiments"] for i in got["inspections"]] == [["sparsity"]]
    (plot,) = got["inspection"]["inspect-out"]["plots"]
    assert plot["name"] == "sparsity" and base64.b64decode(plot["url"].split(",", 1)[1]) == png


@pytest.mark.slow
def test_smollm2_report_at_128_tokens_is_under_3_mb(tmp_path: Path) -> None:
    from model_forensics.models.loading import load
    from model_forensics.recorder import RecorderHooks
    from model_forensics.recorder.session import record_prompt

    loaded = load("smollm2")
    prompt = " ".join(["The quick brown fox jumps over the lazy dog and then"] * 11)
    bundle = record_prompt(loaded, prompt, tmp_path / "smol", recorder=RecorderHooks(granularity="head"))
    out = write_report(bundle, tmp_path / "smol.html")
    got = embedded(out.read_text())
    (detail,) = got["details"].values()
    assert len(detail["tokens"]) >= 128 and detail["layers"] == 30
    assert out.stat().st_size < 3_000_000, out.stat().st_size
    assert got["notes"] and any("Attention of" in n for n in got["notes"])  # it says what it cut


def test_the_demo_writes_its_report_beside_the_bundle(incident: Path) -> None:
    from model_forensics.scenarios.demo import write_demo_report

    path = write_demo_report(incident)
    assert path == incident.with_name(incident.name + ".html")
    assert embedded(path.read_text())["bundles"][0]["id"] == incident.name
