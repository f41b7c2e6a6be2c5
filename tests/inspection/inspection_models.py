"""Synthetic models with known answers for the inspection tests.

* :class:`Branches` — independent linear branches, each reading its own slice of a float
  input; a shift injected into one slice shows up in that branch and nowhere else.
* :class:`CharTokenizer` — a character tokenizer (optionally case-folding) for tiny
  GPT-2 models driven by text.
"""

from __future__ import annotations

import torch
from torch import nn


class Branches(nn.Module):
    """x (B, n·d) → branch i = Linear(x[:, i·d:(i+1)·d]) → head over all branches (B, classes)."""

    def __init__(self, d: int = 8, n: int = 3, seed: int = 0, head_ignores: tuple[int, ...] = (), classes: int = 2):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.d, self.n = d, n
        self.branches = nn.ModuleList(nn.Linear(d, d) for _ in range(n))
        self.head = nn.Linear(n * d, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / d**0.5)
            for i in head_ignores:
                self.head.weight[:, i * d : (i + 1) * d] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hs = [b(x[:, i * self.d : (i + 1) * self.d]) for i, b in enumerate(self.branches)]
        return self.head(torch.cat(hs, -1))


def branch_data(
    n: int, seed: int, shift: dict[int, float] | None = None, d: int = 8, branches: int = 3
) -> torch.Tensor:
    """(n, branches·d) standard normal inputs; ``shift`` adds a constant to whole slices."""
    x = torch.randn((n, branches * d), generator=torch.Generator().manual_seed(seed))
    for i, delta in (shift or {}).items():
        x[:, i * d : (i + 1) * d] += delta
    return x


class CharTokenizer:
    """One id per character (1..vocab-1; 0 pads); ``fold_case`` lower-cases first."""

    def __init__(self, vocab: int = 50, fold_case: bool = False):
        self.vocab, self.fold_case = vocab, fold_case
        self.pad_token_id = 0

    def __len__(self) -> int:
        return self.vocab

    def __call__(self, text: str) -> dict[str, list[int]]:
        text = text.lower() if self.fold_case else text
        return {"input_ids": [1 + ord(c) % (self.vocab - 1) for c in text]}

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(96 + i % 27) for i in ids)


def tiny_gpt2(seed: int = 0, dormant: tuple[int, ...] = (), vocab: int = 50) -> nn.Module:
    """A 2-block GPT-2 (d=32, 128 MLP neurons); ``dormant`` neurons of block 0 get zero
    input weights and bias, so their activation gelu(0) is exactly 0 on every input."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=vocab, n_positions=64, bos_token_id=0, eos_token_id=0)
    ).eval()
    with torch.no_grad():
        fc = model.transformer.h[0].mlp.c_fc  # Conv1D: weight (d_model, d_mlp)
        for u in dormant:
            fc.weight[:, u] = 0.0
            fc.bias[u] = 0.0
    return model


WORDS = [
    "the",
    "big",
    "cat",
    "sat",
    "on",
    "a",
    "small",
    "mat",
    "and",
    "then",
    "ran",
    "home",
    "to",
    "start",
    "the",
    "new",
    "day",
    "with",
    "a",
    "quick",
    "look",
]


def sentences(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) for _ in range(n)]
