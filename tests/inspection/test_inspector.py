"""ModelInspector as a user calls it: one run, typed results, JSON, tables, figures, files."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from inspection_models import CharTokenizer, sentences, tiny_gpt2
from rich.console import Console

from model_forensics import ConfigError, ForensicsError, ModelInspector
from model_forensics.inspection import EXPERIMENTS, read_jsonl


@pytest.fixture(scope="module")
def full_run():
    torch.set_num_threads(1)
    model = tiny_gpt2(dormant=(7,))
    texts = sentences(48, 1)
    inputs = [
        {"text": t, "passed": i % 4 != 0, "group": f"week{i % 3}", "label": t.split()[0]} for i, t in enumerate(texts)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = ModelInspector(model, CharTokenizer()).run(
            inputs, reference=sentences(32, 2), compare_model=tiny_gpt2(seed=1)
        )
    return model, res


def test_the_issue_example_runs_selected_experiments_only():
    insp = ModelInspector(tiny_gpt2(), CharTokenizer())
    res = insp.run(sentences(20, 0), reference=sentences(20, 1), experiments=["sparsity", "drift", "robustness"])
    assert res.experiments == ["sparsity", "robustness"] and "drift" in res.skipped
    assert res.sparsity is not None and res.robustness is not None and res.stats is None
    Console(file=None, width=120, record=True).print(res.sparsity.table())
    json.dumps(res.to_json())


def test_every_experiment_runs_and_serialises(full_run):
    model, res = full_run
    assert set(res.results()) == set(EXPERIMENTS) and res.skipped == {}
    data = json.loads(json.dumps(res.to_json()))
    assert set(EXPERIMENTS) <= set(data) and data["inputs"] == 48
    assert "blocks.0.mlp.post[7]" in res.sparsity.dormant
    assert res.drift.steps == ["week0", "week1", "week2"] and res.drift.baseline == "reference"
    assert res.regression.cka.shape == (2, 2)
    assert model.training is False


def test_tables_figures_and_files(full_run, tmp_path):
    _, res = full_run
    console = Console(width=140, record=True)
    console.print(res.tables())
    text = console.export_text()
    assert "Sparsity" in text and "Robustness" in text and "Pruning" in text
    written = res.save(tmp_path, formats=("png", "svg"))
    names = {p.name for p in written}
    assert {"results.json", "summary.md", "sparsity.png", "drift.svg", "regression.png", "sensitivity.png"} <= names
    assert all(p.stat().st_size > 0 for p in written)
    assert "# Inspection of" in (tmp_path / "summary.md").read_text()


def test_every_heatmap_has_a_colour_bar_with_units(full_run):
    _, res = full_run
    for name in ("sparsity", "stats", "regression"):
        fig = getattr(res, name).figure()
        colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
        assert colorbars and colorbars[0].get_ylabel(), name


def test_unknown_experiments_and_empty_inputs_are_errors(tmp_path):
    insp = ModelInspector(tiny_gpt2(), CharTokenizer())
    with pytest.raises(ConfigError, match="unknown experiment.*'sparsty'"):
        insp.run(["a b"], experiments=["sparsty"])
    with pytest.raises(ForensicsError, match="no inputs"):
        insp.run([])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ForensicsError, match="has no records"):
        read_jsonl(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"label": 1}\n')
    with pytest.raises(ForensicsError, match="bad.jsonl:1 has no 'text'"):
        read_jsonl(bad)
