"""ONNX models through onnxruntime: recorded, replayed and intervened on like PyTorch ones.

Two zoo models are exported here with ``torch.onnx.export(dynamo=False)``: the transformer
``induction-2l`` (through a wrapper whose attributes are the model's own ``transformer`` and
``lm_head``, so the ONNX scopes are the PyTorch module paths) and the CNN
``cnn-digits-badnets``. Every check compares against the PyTorch model itself.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

pytest.importorskip("onnxruntime")

from model_forensics.cli import app
from model_forensics.core.bundle import Bundle
from model_forensics.core.errors import ForensicsError, ModelLoadError
from model_forensics.inspection import ModelInspector
from model_forensics.inspection.collect import Sample
from model_forensics.models import zoo
from model_forensics.models.adapters import adapter_for
from model_forensics.models.hooks import hooks
from model_forensics.models.onnx_model import (
    OnnxGradientError,
    OnnxRewriteError,
    load_onnx,
    scope_chain,
)
from model_forensics.recorder import RecorderHooks
from model_forensics.recorder.session import record_inputs, record_prompt
from model_forensics.replay import Intervention, SandboxReplayer

PROMPT = "x y z a x"
runner = CliRunner()


class LogitsOnly(nn.Module):
    """GPT-2 returning logits only; its attributes are the model's own modules."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.transformer = lm.transformer
        self.lm_head = lm.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
        return self.lm_head(hidden)


def _digits(n: int) -> torch.Tensor:
    from sklearn.datasets import load_digits

    images = load_digits().images[:n] / 16.0
    return torch.tensor(images, dtype=torch.float32).unsqueeze(1)  # (n, 1, 8, 8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx")
    cnn = zoo.load("cnn-digits-badnets").model
    lm = zoo.load("induction-2l")
    (root / "lm").mkdir()
    ids = lm.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    axes = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            cnn,
            (_digits(2),),
            str(root / "cnn.onnx"),
            dynamo=False,
            input_names=["pixel_values"],
            output_names=["logits"],
            dynamic_axes={"pixel_values": axes, "logits": axes},
        )
        seq = {0: "batch", 1: "seq"}
        torch.onnx.export(
            LogitsOnly(lm.model).eval(),
            (ids, torch.ones_like(ids)),
            str(root / "lm" / "model.onnx"),
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={"input_ids": seq, "attention_mask": seq, "logits": seq},
        )
    lm.tokenizer.save_pretrained(str(root / "lm"))
    return {"cnn": root / "cnn.onnx", "lm": root / "lm" / "model.onnx", "root": root}


@pytest.fixture(scope="module")
def bundles(exported: dict[str, Path]) -> dict[str, Path]:
    root = exported["root"]
    image = {"pixel_values": _digits(1)}
    full = RecorderHooks(sketch="full")
    return {
        "cnn_onnx": record_inputs(load_onnx(exported["cnn"]), image, root / "b_cnn_onnx", recorder=full),
        "cnn_torch": record_inputs(zoo.load("cnn-digits-badnets"), image, root / "b_cnn_torch", recorder=full),
        "lm_onnx": record_prompt(load_onnx(exported["lm"]), PROMPT, root / "b_lm_onnx", recorder=full),
        "lm_torch": record_prompt(
            zoo.load("induction-2l"),
            PROMPT,
            root / "b_lm_torch",
            recorder=RecorderHooks(sketch="full", granularity="neuron"),
        ),
    }


def onnx_site(lm: nn.Module, site: str) -> str | None:
    """The ONNX site (module path) holding a canonical GPT-2 site: an output-side site is its
    module's output; ``mlp.post`` (the input of ``mlp.c_proj``) is the output of ``mlp.act``."""
    point = adapter_for(lm).points[site]
    if site.endswith("mlp.post"):
        return point.module.removesuffix("c_proj") + "act"
    if point.io != "output" or point.span or point.heads or point.pattern or (point.index or 0) > 0:
        return None
    return point.module


def test_scope_names_are_module_paths() -> None:
    assert scope_chain("/transformer/h.0/mlp/c_fc/Gemm") == [
        "transformer",
        "transformer.h.0",
        "transformer.h.0.mlp",
        "transformer.h.0.mlp.c_fc",
    ]
    assert scope_chain("/features/features.0/Conv") == ["features", "features.0"]
    assert scope_chain("Constant_12") == []


def test_cnn_activations_match_pytorch(bundles: dict[str, Path]) -> None:
    ours, theirs = Bundle.open(bundles["cnn_onnx"]), Bundle.open(bundles["cnn_torch"])
    shared = sorted(s for s in theirs.sites if s in ours.sites)
    assert shared == ["classifier", "features.0", "features.1", "features.2", "features.3", "features.4"]
    for site in shared:
        torch.testing.assert_close(ours.activation(site), theirs.activation(site), atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.outputs["logits"], theirs.outputs["logits"], atol=1e-4, rtol=0)
    assert ours.manifest["output"]["prediction"] == theirs.manifest["output"]["prediction"]


def test_transformer_activations_match_pytorch(bundles: dict[str, Path]) -> None:
    ours, theirs = Bundle.open(bundles["lm_onnx"]), Bundle.open(bundles["lm_torch"])
    lm = zoo.load("induction-2l").model
    pairs = {site: onnx_site(lm, site) for site in theirs.sites}
    matched = {site: other for site, other in pairs.items() if other in ours.sites}
    for layer in (0, 1):
        for kind in ("attn", "mlp", "mlp.post", "resid_post"):
            assert f"blocks.{layer}.{kind}" in matched
    assert "final" in matched
    for site, other in matched.items():
        torch.testing.assert_close(ours.activation(str(other)), theirs.activation(site), atol=1e-4, rtol=0)
    assert ours.manifest["output"]["text"] == theirs.manifest["output"]["text"]


def test_onnx_bundle_replays_bit_identical(bundles: dict[str, Path]) -> None:
    for name in ("cnn_onnx", "lm_onnx"):
        report = SandboxReplayer().load_bundle(bundles[name]).verify()
        assert report.bit_identical, report.summary()
        assert len(report.sites) == len(Bundle.open(bundles[name]).sites)


def test_bundle_verify_and_replay_cli(bundles: dict[str, Path]) -> None:
    verified = runner.invoke(app, ["bundle", "verify", str(bundles["cnn_onnx"])])
    assert verified.exit_code == 0, verified.output
    replayed = runner.invoke(app, ["replay", str(bundles["cnn_onnx"]), "-i", "features.2:zero", "--json"])
    assert replayed.exit_code == 0, replayed.output
    assert '"bit_identical": true' in replayed.output


def test_zeroing_channels_equals_pytorch(bundles: dict[str, Path]) -> None:
    zero = [Intervention(site="features.2", kind="zero", neurons=[1, 3, 5])]
    onnx_session = SandboxReplayer().load_bundle(bundles["cnn_onnx"])
    torch_session = SandboxReplayer().load_bundle(bundles["cnn_torch"])
    ours, theirs = onnx_session.run(zero), torch_session.run(zero)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-4, rtol=0)
    unchanged = onnx_session.run([])
    assert (ours.logits - unchanged.logits).abs().max() > 1e-2  # the intervention did change the run


def test_transformer_intervention_equals_pytorch(bundles: dict[str, Path]) -> None:
    onnx_session = SandboxReplayer().load_bundle(bundles["lm_onnx"])
    torch_session = SandboxReplayer().load_bundle(bundles["lm_torch"])
    for ours_iv, theirs_iv in (
        (Intervention.parse("transformer.h.1.attn:scale=0"), Intervention.parse("blocks.1.attn:scale=0")),
        (Intervention.parse("transformer.h.0.mlp:zero"), Intervention.parse("blocks.0.mlp:zero")),
    ):
        ours, theirs = onnx_session.run([ours_iv]), torch_session.run([theirs_iv])
        torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-4, rtol=0)
        assert ours.text == theirs.text


def test_inspector_runs_activation_experiments(exported: dict[str, Path]) -> None:
    images = _digits(60)
    samples = [Sample(tensor=images[i], group="early" if i < 20 else "late") for i in range(40)]
    reference = [Sample(tensor=images[i]) for i in range(40, 60)]
    wanted = ["sparsity", "stats", "shift", "drift"]
    onnx_model = load_onnx(exported["cnn"]).model
    ours = ModelInspector(onnx_model, batch_size=8).run(samples, reference=reference, experiments=wanted)
    theirs = ModelInspector(zoo.load("cnn-digits-badnets").model, batch_size=8).run(
        samples, reference=reference, experiments=wanted
    )
    assert ours.sparsity and ours.stats and ours.shift and ours.drift and not ours.skipped
    mine = {la.site: la for la in ours.stats.layers}
    for layer in theirs.stats.layers:  # the same sites give the same statistics
        assert abs(mine[layer.site].mean - layer.mean) < 1e-4
        assert abs(mine[layer.site].max_abs - layer.max_abs) < 1e-4


def test_gradients_are_refused_in_one_line(exported: dict[str, Path]) -> None:
    model = load_onnx(exported["cnn"]).model
    kept: dict[str, torch.Tensor] = {}

    def keep(tensor: torch.Tensor, call: object) -> torch.Tensor:
        kept["t"] = tensor
        return tensor

    with torch.enable_grad(), hooks(adapter_for(model), {"features.2": keep}):
        logits = model(_digits(1))
        with pytest.raises(OnnxGradientError, match="PyTorch models only"):
            torch.autograd.grad(logits.sum(), [kept["t"]])


def _random_graph(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Relu", ["x"], ["h"], name="/layer/Relu"),
        helper.make_node("RandomNormalLike", ["h"], ["noise"], name="/noise/RandomNormalLike"),
        helper.make_node("Add", ["h", "noise"], ["y"], name="/out/Add"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_graph_with_random_ops_cannot_be_rewritten(tmp_path: Path) -> None:
    _random_graph(tmp_path / "noisy.onnx")
    model = load_onnx(tmp_path / "noisy.onnx").model
    model(torch.ones(1, 4))  # running (and recording) it works

    def zero(tensor: torch.Tensor, call: object) -> torch.Tensor:
        return torch.zeros_like(tensor)

    with hooks(adapter_for(model), {"layer": zero}), pytest.raises(OnnxRewriteError) as caught:
        model(torch.ones(1, 4))
    assert "RandomNormalLike '/noise/RandomNormalLike'" in str(caught.value)


def test_bad_files_and_inputs_are_one_line_errors(exported: dict[str, Path], tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a protobuf \x00\xff" * 10)
    with pytest.raises(ModelLoadError, match="not a readable ONNX model"):
        load_onnx(corrupt)
    for model, expected in (
        (corrupt, "not a readable ONNX model"),
        (tmp_path / "missing.onnx", "does not exist"),
        (exported["cnn"], "is not a text model: its inputs are pixel_values (float32, [?, 1, 8, 8])"),
    ):
        result = runner.invoke(app, ["record", "-m", str(model), "-p", "hello", "-o", str(tmp_path / "b")])
        assert result.exit_code == 2, result.output
        assert expected in result.output and "Traceback" not in result.output
    with pytest.raises(ForensicsError, match="has no input 'input_ids'"):
        load_onnx(exported["cnn"]).model(input_ids=torch.ones(1, 3, dtype=torch.long))


def test_cli_records_an_onnx_image_model(exported: dict[str, Path], bundles: dict[str, Path], tmp_path: Path) -> None:
    np.save(tmp_path / "digit.npy", _digits(1)[0].numpy())  # (1, 8, 8), the image of bundles["cnn_torch"]
    out = tmp_path / "incident"
    args = ["record", "-m", str(exported["cnn"]), "--image", str(tmp_path / "digit.npy"), "--sketch", "full"]
    result = runner.invoke(app, [*args, "--predicate", "class_is:0", "-o", str(out)])
    assert result.exit_code == 0, result.output
    ours, theirs = Bundle.open(out), Bundle.open(bundles["cnn_torch"])
    assert ours.manifest["model"]["class"] == "OnnxModel"
    for site in ("features.0", "features.2", "classifier"):
        torch.testing.assert_close(ours.activation(site), theirs.activation(site), atol=1e-4, rtol=0)
    assert SandboxReplayer().load_bundle(out).verify().bit_identical
    prompt = runner.invoke(app, ["record", "-m", str(exported["cnn"]), "-p", "a digit", "-o", str(tmp_path / "b")])
    assert prompt.exit_code == 2 and "pass the image with --image FILE" in " ".join(prompt.output.split())
    text = runner.invoke(
        app, ["record", "-m", str(exported["lm"]), "--image", str(tmp_path / "digit.npy"), "-o", str(tmp_path / "c")]
    )
    assert text.exit_code == 2 and "takes no image: its inputs are input_ids (int64" in " ".join(text.output.split())


def test_cli_records_an_onnx_text_model(exported: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "incident"
    result = runner.invoke(app, ["record", "-m", str(exported["lm"]), "-p", PROMPT, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert Bundle.open(out).manifest["model"]["class"] == "OnnxModel"
