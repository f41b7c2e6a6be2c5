"""`fix export`: a fix as edited weights (where it folds exactly) or as a torch-only hook
module, each equal to the hooked replay."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model_forensics import SandboxReplayer
from model_forensics.core.errors import ForensicsError
from model_forensics.models import zoo
from model_forensics.models.hooks import logits_of
from model_forensics.replay import Gate, Intervention
from model_forensics.replay import standalone_fix as standalone
from model_forensics.replay.export import export_fix

pytestmark = pytest.mark.skipif("gpt2-injection" not in zoo.names(), reason="zoo weights not shipped")


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory):
    from model_forensics.scenarios import get

    bundle = get("gpt2-injection").record(tmp_path_factory.mktemp("inj"), limit=1).incidents[0]
    return SandboxReplayer().load_bundle(bundle)


def _fresh(session):
    return SandboxReplayer().load_bundle(session.bundle.path).model


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return logits_of(model(**batch.expand(1))).double()


def _hooked(session, fix, batch) -> torch.Tensor:
    return session.forced(batch, [session.prepare(fix, batch)]).double()


def _import(path: Path):
    spec = importlib.util.spec_from_file_location(f"apply_fix_{abs(hash(path))}", path / "apply_fix.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_a_mean_ablated_head_and_a_zeroed_neuron_fold_into_weights(session, tmp_path: Path) -> None:
    fix = [Intervention("blocks.0.attn.head.3", kind="mean"), Intervention("blocks.1.mlp.post[5]", kind="zero")]
    result = export_fix(session, fix, tmp_path / "out")
    assert result.folded and result.max_abs_diff_weights is not None
    assert result.changed_tensors == [
        "transformer.h.0.attn.c_proj.bias",
        "transformer.h.0.attn.c_proj.weight",
        "transformer.h.1.mlp.c_proj.weight",
    ]
    delta = load_file(tmp_path / "out" / "weights_delta.safetensors")
    model = _fresh(session)
    missing = model.load_state_dict(delta, strict=False)
    assert not missing.unexpected_keys
    d = model.config.n_embd // model.config.n_head
    assert torch.all(model.transformer.h[0].attn.c_proj.weight[3 * d : 4 * d] == 0)
    assert torch.all(model.transformer.h[1].mlp.c_proj.weight[5] == 0)
    # the edited model, unhooked, equals the hooked replay on prompts the export did not check
    for batch in [session.inputs, *session.variants()[:3], *session.benign()[-3:]]:
        hooked = _hooked(session, fix, batch)
        assert (_logits(model, batch) - hooked).abs().max() < 1e-5
        assert (_logits(session.model, batch) - hooked).abs().max() > 1e-3  # the fix changes something
    # and it generates what the fixed replay generates: the injection no longer succeeds
    fixed = session.run(fix)
    ids = session.inputs.expand(1)
    out = model.generate(**ids, **session.generation)
    text = session.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert fixed.flipped and text == fixed.text
    report = json.loads((tmp_path / "out" / "export.json").read_text())
    assert report["folded"] and report["check"]["max_abs_diff_weights"] < 1e-5
    card = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    assert "blocks.0.attn.head.3" in card and "folded into the weights" in card


def test_the_full_model_loads_with_from_pretrained(session, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    fix = [Intervention("blocks.0.attn.head.3", kind="scale", value=0.25)]
    export_fix(session, fix, tmp_path / "out", full_model=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model").eval()
    batch = session.variants()[0]
    assert (_logits(model, batch) - _hooked(session, fix, batch)).abs().max() < 1e-5


def test_a_gated_directional_fix_becomes_a_hook_module(session, tmp_path: Path) -> None:
    torch.manual_seed(0)
    d = session.model.config.n_embd
    direction = tuple(torch.randn(d).tolist())
    # a gate that opens on some prompts and not on others: threshold at the median score
    scores = []
    for batch in session.variants()[:6]:
        with torch.no_grad():
            h = session.model(**batch.expand(1), output_hidden_states=True).hidden_states[1][0]
        u = torch.tensor(direction, dtype=torch.float64)
        scores.append(float((h.double() @ (u / u.norm()))[-1]))
    gate = Gate("blocks.0.resid_post", direction, sorted(scores)[3] - 1e-6, "last")
    fix = [
        Intervention("blocks.1.attn.head.2", kind="mean", gate=gate),
        Intervention("blocks.1.resid_post", kind="scale", value=0.5, direction=direction, positions=(-1,)),
    ]
    result = export_fix(session, fix, tmp_path / "out")
    assert not result.folded and not (tmp_path / "out" / "weights_delta.safetensors").exists()
    reasons = [f.reason for f in result.folds]
    assert "gated" in reasons[0] and reasons[1] is not None
    apply_fix = _import(tmp_path / "out")
    model = _fresh(session)
    opened = []
    for batch in session.variants()[:6]:
        with apply_fix.apply_fix(model) as handle:
            got = _logits(model, batch)
            opened.append(handle.gates[0][0])
        assert (got - _hooked(session, fix, batch)).abs().max() < 1e-5
        # generation: positions and the gate decision span the steps, as in replay
        with apply_fix.apply_fix(model):
            ids = batch.expand(1)
            out = model.generate(**ids, **session.generation)
        text = session.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        assert text == session.run(fix, inputs=batch).text
    assert any(opened) and not all(opened)
    # removing the hooks gives the unchanged model back
    assert torch.equal(_logits(model, session.inputs), _logits(session.model, session.inputs))


def test_a_mean_on_a_layer_without_bias_does_not_fold(tiny, tiny_dirs, argmax_incidents, tmp_path: Path) -> None:
    root = argmax_incidents(tiny["llama"], tmp_path / "inc", n_benign=3, n=1)
    s = SandboxReplayer().load_bundle(root / "incident-0", model=str(tiny_dirs["llama"]))
    s.set_baseline(s.extras["benign"])
    fix = [Intervention("blocks.1.attn.head.1", kind="mean"), Intervention("blocks.0.mlp.post[3]", kind="zero")]
    result = export_fix(s, fix, tmp_path / "out")
    assert not result.folded
    assert "no bias" in (result.folds[0].reason or "") and result.folds[1].folds
    assert result.max_abs_diff_hooks < 1e-5


def test_refusals(session, tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(ForensicsError, match="not an empty directory"):
        export_fix(session, [Intervention("blocks.0.attn.head.3", kind="zero")], tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    with pytest.raises(ForensicsError, match="cannot be exported"):
        export_fix(session, [Intervention("blocks.0.attn.head.3", kind="noise", value=1.0)], tmp_path / "n")
    assert not (tmp_path / "n").exists()


def test_the_cli_exports_an_analysis(session, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from model_forensics.cli import app

    analysis = tmp_path / "analysis.json"
    fix = {"interventions": [Intervention("blocks.0.attn.head.3", kind="mean").to_json()], "total_flip_rate": 0.98}
    analysis.write_text(json.dumps({"bundle": str(session.bundle.path), "fix_set": fix}))
    runner = CliRunner()
    ok = runner.invoke(app, ["fix", "export", str(analysis), "--out", str(tmp_path / "out")])
    assert ok.exit_code == 0, ok.output
    assert "folded into the weights" in ok.output and (tmp_path / "out" / "weights_delta.safetensors").is_file()
    assert "98%" in (tmp_path / "out" / "MODEL_CARD.md").read_text()
    bad = runner.invoke(app, ["fix", "export", str(analysis), "--out", str(tmp_path / "out")])
    assert bad.exit_code == 2 and "Traceback" not in bad.output and "empty directory" in bad.output


def test_the_hook_module_needs_only_torch() -> None:
    tree = ast.parse(Path(standalone.__file__).read_text())
    roots = {
        (n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, ast.Import | ast.ImportFrom)
        for a in (n.names if isinstance(n, ast.Import) else [n])
    }
    assert roots <= {"__future__", "json", "math", "collections", "pathlib", "typing", "torch"}
