"""Dependency graphs: EAP edge scores, exact path patching checked against a hand-built
patch through the hooks API, serialisation, and bad input."""

from __future__ import annotations

import random
from typing import Any

import networkx as nx
import pytest
import torch

from model_forensics.circuits import DependencyGraph, dependency_graph
from model_forensics.circuits.edges import EdgeRunner, Nodes
from model_forensics.circuits.subject import subject_of
from model_forensics.core.errors import ForensicsError
from model_forensics.models import zoo
from model_forensics.models.adapters import adapter_for
from model_forensics.models.hooks import hooks
from model_forensics.models.zoo.training import induction_2l


@pytest.fixture(scope="module")
def induction() -> Any:
    torch.set_num_threads(1)
    return zoo.load("induction-2l")


def pairs(seed: int, n: int) -> tuple[list[str], list[str]]:
    rng, words = random.Random(seed), induction_2l.vocabulary()
    prompts, corrupted = [], []
    for _ in range(n):
        seq = rng.sample(words, 10)
        prompts.append(" ".join(seq + seq[:5]))
        corrupted.append(" ".join(rng.sample(seq, 10) + seq[:5]))
    return prompts, corrupted


def ids_of(tok: Any, texts: list[str]) -> torch.Tensor:
    return torch.tensor([tok(t)["input_ids"] for t in texts])


def test_all_edges_kept_is_the_clean_run_and_all_cut_the_corrupted_run(induction: Any) -> None:
    prompts, corrupted = pairs(0, 4)
    clean_ids, bad_ids = ids_of(induction.tokenizer, prompts), ids_of(induction.tokenizer, corrupted)
    nodes = Nodes.of(2, 4, mlps=True)
    runner = EdgeRunner(subject_of(induction.model, induction.tokenizer), nodes)
    corrupt = runner.run(bad_ids, keep=True).activations
    with torch.no_grad():
        clean_ref = induction.model(input_ids=clean_ids).logits[:, -1]
        bad_ref = induction.model(input_ids=bad_ids).logits[:, -1]
    kept = runner.run(clean_ids, corrupt=corrupt, mask=nodes.mask(4)).logits
    cut = runner.run(clean_ids, corrupt=corrupt, mask=nodes.mask(4, value=0.0)).logits
    assert len(nodes.edges) == 54
    assert torch.equal(kept, clean_ref)
    assert (cut - bad_ref).abs().max() < 1e-4


def test_path_patching_equals_a_hand_built_edge_patch(induction: Any) -> None:
    # Edge blocks.1.attn.head.2 -> logits: the final norm reads the clean residual with only
    # that head's write swapped for its corrupted one. Built here from the hooks API alone.
    prompts, corrupted = pairs(1, 6)
    tok, model = induction.tokenizer, induction.model
    adapter = adapter_for(model)
    w_o = model.transformer.h[1].attn.c_proj.weight.view(4, 16, 64)  # (H, dh, d)

    def head_write(ids: torch.Tensor) -> torch.Tensor:
        seen: dict[str, torch.Tensor] = {}
        with torch.no_grad(), hooks(adapter, {"blocks.1.attn.z": lambda t, c: seen.setdefault("z", t)}):
            model(input_ids=ids)
        return seen["z"][:, :, 2] @ w_o[2]  # (N, T, d)

    clean_ids, bad_ids = ids_of(tok, prompts), ids_of(tok, corrupted)
    delta = head_write(clean_ids) - head_write(bad_ids)

    def swap(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return (args[0] - delta, *args[1:]), kwargs

    with torch.no_grad():
        clean = model(input_ids=clean_ids).logits[:, -1]
        with hooks(adapter, before={"transformer.ln_f": swap}):
            patched = model(input_ids=clean_ids).logits[:, -1]
    targets = clean.argmax(-1)

    def logprob(x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(x, -1)[torch.arange(len(targets)), targets]

    expected = float((logprob(patched) - logprob(clean)).mean())
    graph = dependency_graph(model, tok, prompts, corrupted=corrupted, confirm=54)
    edge = next(e for e in graph.edges if (e.source, e.target) == ("blocks.1.attn.head.2", "logits"))
    assert edge.patched is not None and abs(edge.patched - expected) < 1e-4, (edge, expected)
    assert expected < -1.0  # the induction head's write matters


def test_graph_serialises_and_draws(induction: Any, tmp_path: Any) -> None:
    prompts, corrupted = pairs(2, 8)
    graph = dependency_graph(induction.model, induction.tokenizer, prompts, corrupted=corrupted, confirm=5)
    assert len(graph.edges) == 54 and sum(e.patched is not None for e in graph.edges) == 5
    assert abs(graph.edges[0].score) >= abs(graph.edges[-1].score)
    back = DependencyGraph.from_json(graph.to_json())
    assert back.to_json() == graph.to_json()
    read = nx.read_graphml(graph.write_graphml(tmp_path / "g.graphml"))
    assert read.number_of_edges() == 54 and "blocks.1.attn.head.2" in read.nodes
    graph.figure().savefig(tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 1000


def test_bad_lengths_are_one_clear_error(induction: Any) -> None:
    prompts, corrupted = pairs(3, 2)
    tok, model = induction.tokenizer, induction.model
    with pytest.raises(ForensicsError, match="must tokenize to its prompt's length"):
        dependency_graph(model, tok, prompts, corrupted=[corrupted[0], "t1 t2"])
    with pytest.raises(ForensicsError, match="mean ablation needs prompts of one length"):
        dependency_graph(model, tok, [prompts[0], "t1 t2 t3"])
    with pytest.raises(ForensicsError, match="1 corrupted prompts for 2 prompts"):
        dependency_graph(model, tok, prompts, corrupted=corrupted[:1])
    with pytest.raises(ForensicsError, match="metric 'kl' is unknown"):
        dependency_graph(model, tok, prompts, corrupted=corrupted, metric="kl")


def test_cli_graph_writes_json_graphml_and_rejects_misaligned_prompts(tmp_path: Any) -> None:
    import json

    from typer.testing import CliRunner

    from model_forensics.cli import app

    prompts, corrupted = pairs(4, 6)
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    (tmp_path / "c.txt").write_text("\n".join(corrupted) + "\n")
    (tmp_path / "short.txt").write_text("\n".join(["t1 t2", *corrupted[1:]]) + "\n")
    runner = CliRunner()
    base = ["circuits", "graph", "--model", "zoo:induction-2l", "--prompts", str(tmp_path / "p.txt")]
    ok = runner.invoke(app, [*base, "--corrupted", str(tmp_path / "c.txt"), "--out", str(tmp_path / "out")])
    assert ok.exit_code == 0, ok.output
    data = json.loads((tmp_path / "out" / "graph.json").read_text())
    assert len(data["edges"]) == 54 and (tmp_path / "out" / "graph.graphml").is_file()
    bad = runner.invoke(app, [*base, "--corrupted", str(tmp_path / "short.txt")])
    assert bad.exit_code == 2, bad.output
    assert "corrupted prompt 0 is 3 tokens but its prompt is 16" in bad.output
    assert "Traceback" not in bad.output


@pytest.mark.slow
def test_patched_runs_are_exact_on_a_grouped_query_llama() -> None:
    # SmolLM2: 9 query heads over 3 key/value heads; all edges kept is the clean run and all
    # cut the corrupted run, as on GPT-2.
    from model_forensics.models.loading import load

    sm = load("smollm2")
    tok = sm.tokenizer
    clean_ids = torch.tensor([tok("The capital of France is Paris. The capital of France is")["input_ids"]])
    bad_ids = torch.tensor([tok("The capital of Spain is Madrid. The capital of Spain is")["input_ids"]])
    assert clean_ids.shape == bad_ids.shape
    a = sm.model.config
    nodes = Nodes.of(a.num_hidden_layers, a.num_attention_heads, mlps=True)
    runner = EdgeRunner(subject_of(sm.model, tok), nodes)
    corrupt = runner.run(bad_ids, keep=True).activations
    with torch.no_grad():
        clean_ref = sm.model(input_ids=clean_ids).logits[:, -1]
        bad_ref = sm.model(input_ids=bad_ids).logits[:, -1]
    kept = runner.run(clean_ids, corrupt=corrupt, mask=nodes.mask(1)).logits
    cut = runner.run(clean_ids, corrupt=corrupt, mask=nodes.mask(1, value=0.0)).logits
    assert (kept - clean_ref).abs().max() < 1e-4
    assert (cut - bad_ref).abs().max() < 1e-3
