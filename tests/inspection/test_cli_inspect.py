"""``model-forensics inspect``: files out, one-line errors with exit code 2."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from inspection_models import WORDS, sentences


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 with a word-level tokenizer, saved as a Hugging Face directory."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *sorted(set(WORDS))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            n_layer=2, n_embd=32, n_head=4, vocab_size=len(vocab), n_positions=64, bos_token_id=0, eos_token_id=0
        )
    )
    out = tmp_path_factory.mktemp("cli") / "tiny-words"
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


def _jsonl(path: Path, texts: list[str], **extra: object) -> Path:
    path.write_text("".join(json.dumps({"text": t, **extra}) + "\n" for t in texts))
    return path


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture()
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., Run]:
    """Run the real entry point (``main``: errors → one line + exit 2) in-process."""
    from model_forensics.cli import main

    def run(*args: str) -> Run:
        monkeypatch.setattr(sys, "argv", ["model-forensics", *args])
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = int(exc.code or 0)
        out = capsys.readouterr()
        return Run(code, out.out, out.err)

    return run


def test_inspect_writes_json_figures_and_a_summary(cli, model_dir, tmp_path):
    data = _jsonl(tmp_path / "prompts.jsonl", sentences(30, 1))
    ref = _jsonl(tmp_path / "ref.jsonl", sentences(30, 2))
    out = tmp_path / "results"
    run = cli(
        "inspect",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--reference",
        str(ref),
        "--experiments",
        "sparsity,stats,shift,robustness",
        "--out",
        str(out),
    )
    assert run.returncode == 0, run.stderr
    results = json.loads((out / "results.json").read_text())
    assert {"sparsity", "stats", "shift", "robustness"} <= set(results)
    assert (out / "shift.png").stat().st_size > 0 and (out / "summary.md").is_file()
    assert "Distribution shift" in run.stdout


def test_an_empty_data_file_is_one_line_and_exit_code_2(cli, model_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    run = cli("inspect", "--model", str(model_dir), "--data", str(empty))
    assert run.returncode == 2
    assert "has no records" in run.stderr and "Traceback" not in run.stderr


def test_unknown_experiment_is_exit_code_2(cli, model_dir, tmp_path):
    data = _jsonl(tmp_path / "p.jsonl", sentences(4, 1))
    run = cli("inspect", "--model", str(model_dir), "--data", str(data), "--experiments", "sparsity,nope")
    assert run.returncode == 2 and "unknown experiment" in run.stderr


def test_inspect_reads_the_inspection_section_of_config(cli, model_dir, tmp_path):
    data = _jsonl(tmp_path / "p.jsonl", sentences(40, 1))
    config = tmp_path / "cfg.yaml"
    config.write_text("inspection:\n  pruning:\n    min_heldout: 100\n")
    out = tmp_path / "results"
    args = ["inspect", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--batch-size", "4"]
    run = cli(*args, "--experiments", "sparsity,pruning", "--config", str(config))
    assert run.returncode == 0, run.stderr
    assert "needs ≥ 500 inputs" in json.loads((out / "results.json").read_text())["skipped"]["pruning"]
    config.write_text("inspection:\n  batchsize: 4\n")
    run = cli(*args, "--config", str(config))
    assert run.returncode == 2 and "unknown key 'inspection.batchsize'" in run.stderr
