"""Tiny random language models with a word tokenizer, and a recorder for their incidents.

Prompts are 16 words long: long enough that every matrix product in a forward pass takes
the same CPU kernel alone and in a batch, so sweeps can be checked for bit-identity.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["<unk>", "<eos>"] + [f"w{i}" for i in range(46)] + ["HACKED", "ok"]
PROMPT = " ".join(f"w{i}" for i in range(3, 19))  # 16 tokens
BASELINES = [" ".join(f"w{i}" for i in range(20, 36)), " ".join(f"w{i}" for i in range(30, 46))]


def save_tokenizer(out: Path) -> None:
    """A whitespace word-level tokenizer over WORDS (id 1 = <eos>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    fast.save_pretrained(out)


SPECIAL = {"eos_token_id": 1, "bos_token_id": 0, "pad_token_id": 1}


def tiny_llama(layers: int = 2):
    """A random llama (GQA: 4 query heads, 2 key/value heads) over WORDS."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(WORDS),
        max_position_embeddings=64,
        **SPECIAL,
    )
    return LlamaForCausalLM(config)


def tiny_gpt2(layers: int = 2):
    """A random GPT-2 over WORDS."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(n_layer=layers, n_embd=32, n_head=4, vocab_size=len(WORDS), n_positions=64, **SPECIAL)
    )


def make_models(root: Path) -> dict[str, Path]:
    """Save tiny random llama (GQA), gpt2 and bert-classifier models with the word tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    models = {
        "llama": tiny_llama(),
        "gpt2": tiny_gpt2(),
        "bert": BertForSequenceClassification(
            BertConfig(
                num_hidden_layers=2,
                hidden_size=32,
                intermediate_size=64,
                num_attention_heads=4,
                vocab_size=len(WORDS),
                num_labels=2,
                pad_token_id=1,
            )
        ),
    }
    out = {}
    for name, model in models.items():
        path = root / name
        model.eval().save_pretrained(path)
        save_tokenizer(path)
        out[name] = path
    return out


def record(loaded, out: Path, *, max_new_tokens: int = 0, granularity: str = "all", extras=None, prompt: str = PROMPT):
    """Record PROMPT into a bundle whose predicate holds on the recorded output."""
    from model_forensics.core.predicates import class_is, contains, token_is
    from model_forensics.recorder import RecorderHooks
    from model_forensics.recorder.session import encode_prompt, record_prompt

    with torch.no_grad():
        batch = encode_prompt(loaded, prompt)
        if max_new_tokens:
            ids = loaded.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=1)
            predicate = contains(loaded.tokenizer.decode(ids[0, batch["input_ids"].shape[1] :][:2]))
        else:
            logits = loaded.model(**batch).logits
            if logits.dim() == 3:
                predicate = token_is(int(logits[0, -1].argmax()))
            else:
                predicate = class_is(int(logits[0].argmax()))
    recorder = RecorderHooks(granularity=granularity, sketch="full")
    # One thread: tiny models run ~8x faster on a busy CI machine; the bundle records it and
    # every replay of it uses it too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return record_prompt(
            loaded, prompt, out, recorder=recorder, max_new_tokens=max_new_tokens, predicate=predicate, extras=extras
        )
    finally:
        torch.set_num_threads(threads)


def observe(session, site: str, interventions) -> torch.Tensor:
    """Row 0 of an input-side site (attn.z, mlp.post, resid_pre) as its module received it,
    i.e. after the interventions: (T, ...) per-token layout of the site."""
    from model_forensics.models.adapters import read

    point = session.adapter.points[site]
    seen = []
    handle = session.adapter.modules[point.module].register_forward_hook(
        lambda m, args, out: seen.append(read(point, args)[0].clone())
    )
    try:
        session.run(interventions)
    finally:
        handle.remove()
    return seen[-1]  # earlier calls may be baseline passes
