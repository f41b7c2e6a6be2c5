"""Patterns recomputed from q and k (for SDPA models) equal eager attention's weights."""

from pathlib import Path

import pytest
import torch

from model_forensics import RecorderHooks
from model_forensics.models.loading import load

IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 8, 4]])


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_recomputed_pattern_equals_eager(tiny_dirs: dict[str, Path], family: str) -> None:
    eager = load(str(tiny_dirs[family]), attn_implementation="eager").model
    sdpa = load(str(tiny_dirs[family]), attn_implementation="sdpa").model
    with RecorderHooks(granularity="head").install_hooks(eager) as a, torch.no_grad():
        eager(input_ids=IDS)
    with RecorderHooks(granularity="head").install_hooks(sdpa) as b, torch.no_grad():
        sdpa(input_ids=IDS)
    for layer in range(2):
        site = f"blocks.{layer}.attn.pattern"
        assert site in b._recomputed
        torch.testing.assert_close(b.recorded()[site], a.recorded()[site], atol=1e-5, rtol=0)


def test_recomputed_pattern_during_cached_generation(tiny_dirs: dict[str, Path]) -> None:
    eager = load(str(tiny_dirs["llama"]), attn_implementation="eager").model
    sdpa = load(str(tiny_dirs["llama"]), attn_implementation="sdpa").model
    got = []
    for model in (eager, sdpa):
        rec = RecorderHooks(granularity="head").install_hooks(model)
        rec.generate({"input_ids": IDS}, max_new_tokens=4, do_sample=False)
        got.append(rec.recorded()["blocks.1.attn.pattern"])
        rec.remove_hooks()
    torch.testing.assert_close(got[1], got[0], atol=1e-5, rtol=0)


def test_smollm2_recomputed_pattern_equals_eager(smollm2) -> None:
    from transformers import AutoModelForCausalLM

    path = smollm2.ref.reference
    assert path == "smollm2"
    cached = Path(smollm2.model.config._name_or_path)
    sdpa = AutoModelForCausalLM.from_pretrained(cached, attn_implementation="sdpa").eval()
    ids = smollm2.tokenizer("The quick brown fox jumps over the lazy dog", return_tensors="pt")["input_ids"]
    sites = ["blocks.0.attn.pattern", "blocks.29.attn.pattern"]
    with RecorderHooks(granularity="layer", sites=sites).install_hooks(smollm2.model) as a, torch.no_grad():
        smollm2.model(input_ids=ids)
    with RecorderHooks(granularity="layer", sites=sites).install_hooks(sdpa) as b, torch.no_grad():
        sdpa(input_ids=ids)
    for site in sites:
        assert a.recorded()[site].shape == (1, 9, ids.shape[1], ids.shape[1])
        torch.testing.assert_close(b.recorded()[site], a.recorded()[site], atol=1e-5, rtol=0)
