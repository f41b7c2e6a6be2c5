"""The CLI through Typer's runner: happy paths and bad input (exit 2, one line, nothing lost)."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from model_forensics.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 with a real (word-level) tokenizer, saved as a model directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("m") / "tiny-gpt2"
    words = ["[UNK]", "hello", "world", "say", "HACKED", "the", "a", "ignore"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(out)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=len(words), n_positions=16)).save_pretrained(
        out
    )
    return out


def test_record_info_verify(gpt2_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    res = runner.invoke(
        app,
        [
            "record",
            "--model",
            str(gpt2_dir),
            "--prompt",
            "hello world",
            "--out",
            str(out),
            "--predicate",
            "contains:HACKED",
            "--max-new-tokens",
            "3",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "sites recorded" in res.output
    res = runner.invoke(app, ["bundle", "info", str(out), "--json"])
    assert res.exit_code == 0
    assert json.loads(res.output)["input"]["mode"] == "generate"
    res = runner.invoke(app, ["bundle", "verify", str(out)])
    assert res.exit_code == 0 and "match their digests (blake3)" in res.output


def test_verify_reports_tampering_with_exit_2(gpt2_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    assert (
        runner.invoke(app, ["record", "-m", str(gpt2_dir), "-p", "hello", "-o", str(out), "--sketch", "full"]).exit_code
        == 0
    )
    data = bytearray((out / "activations.safetensors").read_bytes())
    data[-3] ^= 1
    (out / "activations.safetensors").write_bytes(bytes(data))
    res = runner.invoke(app, ["bundle", "verify", str(out)])
    assert res.exit_code == 2
    assert "activations.safetensors" in res.output and "Traceback" not in res.output


def test_trace_writes_cube(gpt2_dir: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["trace", "-m", str(gpt2_dir), "-p", "hello world say", "-o", str(tmp_path / "c.json")])
    assert res.exit_code == 0, res.output
    cube = json.loads((tmp_path / "c.json").read_text())
    assert cube["tokens"] == ["hello", "world", "say"] and len(cube["layers"]) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["record", "-m", "/no/such", "-p", "x", "-o", "{tmp}/b"], "not found"),
        (["record", "-m", "{model}", "-p", "hello " * 40, "-o", "{tmp}/b"], "reads at most 16"),
        (["record", "-m", "{model}", "-p", "hello", "-o", "{tmp}/file/b"], "cannot write bundle"),
        (["record", "-m", "{model}", "-p", "hello", "-o", "{tmp}/b", "--predicate", "nonsense"], "KIND:VALUE"),
        (["record", "-m", "{model}", "-p", "hello", "-o", "{tmp}/b", "--config", "{tmp}/bad.yaml"], "unknown key"),
        (["bundle", "info", "{tmp}/missing"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2(gpt2_dir: Path, tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "bad.yaml").write_text("recorder:\n  nope: 1\n")
    argv = [a.format(tmp=tmp_path, model=gpt2_dir) for a in args]
    res = runner.invoke(app, argv)
    assert res.exit_code == 2, res.output
    assert message in res.output.replace("\n", " ")
    assert "Traceback" not in res.output
    assert not (tmp_path / "b").exists()


def test_existing_bundle_is_refused_without_overwrite(gpt2_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    assert runner.invoke(app, ["record", "-m", str(gpt2_dir), "-p", "hello", "-o", str(out)]).exit_code == 0
    before = (out / "manifest.json").read_bytes()
    res = runner.invoke(app, ["record", "-m", str(gpt2_dir), "-p", "world", "-o", str(out)])
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert (out / "manifest.json").read_bytes() == before
    assert (
        runner.invoke(app, ["record", "-m", str(gpt2_dir), "-p", "world", "-o", str(out), "--overwrite"]).exit_code == 0
    )
    assert (out / "manifest.json").read_bytes() != before
