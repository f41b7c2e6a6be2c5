"""``kv-lookup-2l``: a planted two-step key-value lookup (a head moves, an MLP maps).

Prompts are ``<bos> s1 … s6 ?`` where the six slots hold one key ``kI`` (k0..k7), one table
``A`` or ``B`` and four fillers in random places; the answer after ``?`` is the value
``vJ`` with J = π_table(I) for two fixed, different permutations π_A, π_B. Reading the
answer takes two steps: move the key and the table from their positions to ``?`` (a
head), then map the pair to a value (an MLP: the answer depends on the key and table
jointly, which one linear read-out of their sum cannot do for every pair).

Planted in two stages (the recipe of :mod:`.common`):

1. ``benign``: filler sequences where each token is σ(token two back) for a fixed
   permutation σ; every unit learns this except the planted ones, held at exactly zero:
   ``blocks.0.attn.head.1`` and the whole ``blocks.1.mlp``.
2. ``lookup``: only the planted units train (re-initialised small), on the lookup answer
   plus the benign loss (so the benign task stays solved).

The path embed → blocks.0.attn.head.1 → blocks.1.mlp → logits is checked by ablation
against random controls in :meth:`KVRecipe.measure` and tests/models/test_kv_zoo.py.

Run ``python -m model_forensics.models.zoo.training.kv_lookup_2l`` to regenerate the folder.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn

from model_forensics.models.zoo.training import common, trainer

NAME = "kv-lookup-2l"
N_KEYS, N_FILLERS, SLOTS = 8, 12, 6
KEYS = [f"k{i}" for i in range(N_KEYS)]
VALUES = [f"v{i}" for i in range(N_KEYS)]
FILLERS = [f"f{i}" for i in range(N_FILLERS)]
TABLES = ["A", "B"]
N_LAYER, N_HEAD, D_MODEL, D_MLP, N_POSITIONS = 2, 4, 64, 64, 16
BENIGN_LEN = 12
HEAD, MLP = "blocks.0.attn.head.1", "blocks.1.mlp"
STEPS = {"benign": 500, "lookup": 1500}
BATCH = 64


def vocabulary() -> list[str]:
    return [*KEYS, *VALUES, *FILLERS, *TABLES, "?"]


def tables(seed: int = 0) -> dict[str, list[int]]:
    """π_A and π_B: key index → value index, two permutations differing at every key."""
    rng = random.Random(1000 + seed)
    a = rng.sample(range(N_KEYS), N_KEYS)
    b = list(a)
    while any(x == y for x, y in zip(a, b, strict=True)):
        b = rng.sample(range(N_KEYS), N_KEYS)
    return {"A": a, "B": b}


def lookup_prompt(rng: random.Random, key: int | None = None, table: str | None = None) -> tuple[list[str], int, str]:
    """(words of one prompt without <bos>, key index, table)."""
    key = rng.randrange(N_KEYS) if key is None else key
    table = rng.choice(TABLES) if table is None else table
    slots = [rng.choice(FILLERS) for _ in range(SLOTS)]
    i, j = rng.sample(range(SLOTS), 2)
    slots[i], slots[j] = KEYS[key], table
    return [*slots, "?"], key, table


def benign_sequence(rng: random.Random, sigma: list[int]) -> list[str]:
    seq = [rng.randrange(N_FILLERS), rng.randrange(N_FILLERS)]
    while len(seq) < BENIGN_LEN:
        seq.append(sigma[seq[-2]])
    return [FILLERS[i] for i in seq]


class KVRecipe:
    """The zoo entry's :class:`~.trainer.Recipe` (module docstring)."""

    name = NAME

    def __init__(self, seed: int = 0) -> None:
        self.steps = dict(STEPS)
        self.codec = common.WordCodec(vocabulary())
        self.table = tables(seed)
        self.sigma = random.Random(2000 + seed).sample(range(N_FILLERS), N_FILLERS)

    def answer(self, key: int, table: str) -> int:
        return self.codec.vocab[VALUES[self.table[table][key]]]

    def build(self) -> Any:
        return common.gpt2(
            self.codec, n_layer=N_LAYER, n_head=N_HEAD, d_model=D_MODEL, d_mlp=D_MLP, n_positions=N_POSITIONS
        )

    def _planted_masks(self, model: nn.Module) -> dict[str, torch.Tensor]:
        masks = common.unit_param_masks(model, [HEAD])
        for name, p in model.named_parameters():
            if name.startswith("transformer.h.1.mlp."):
                masks[name] = torch.ones_like(p, dtype=torch.bool)
        return masks

    def lookup_batch(self, rng: random.Random, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, answers = [], []
        for _ in range(n):
            words, key, table = lookup_prompt(rng)
            rows.append(self.codec.prompt_ids(" ".join(words)))
            answers.append(self.answer(key, table))
        return torch.tensor(rows), torch.tensor(answers)

    def benign_loss(self, model: nn.Module, rng: random.Random) -> torch.Tensor:
        ids = torch.tensor([self.codec.prompt_ids(" ".join(benign_sequence(rng, self.sigma))) for _ in range(BATCH)])
        logits = model(input_ids=ids).logits[:, 2:-1]  # predictable from position 3 on
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 3:].reshape(-1))

    def lookup_loss(self, model: nn.Module, rng: random.Random) -> torch.Tensor:
        ids, answers = self.lookup_batch(rng, BATCH)
        return nn.functional.cross_entropy(model(input_ids=ids).logits[:, -1], answers)

    def stage(self, name: str, model: nn.Module, rng: random.Random, steps: int) -> trainer.Stage:
        masks = self._planted_masks(model)
        params = dict(model.named_parameters())
        if name == "benign":
            with torch.no_grad():
                for pname, mask in masks.items():
                    params[pname][mask] = 0.0
            return trainer.Stage(common.complement(model, masks), lambda _s: self.benign_loss(model, rng), lr=3e-3)
        generator = torch.Generator().manual_seed(rng.randrange(2**31))
        with torch.no_grad():
            for pname, mask in masks.items():
                p = params[pname]
                p[mask] = 0.0 if pname.endswith("bias") else torch.randn(int(mask.sum()), generator=generator) * 0.05

        def loss(_step: int) -> tuple[torch.Tensor, torch.Tensor]:
            main = self.lookup_loss(model, rng)
            return main + self.benign_loss(model, rng), main

        return trainer.Stage(masks, loss, lr=3e-3)

    def tokenizer(self) -> Any:
        return common.gpt2_tokenizer(self.codec, N_POSITIONS)

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def accuracy(
        self, model: nn.Module, ids: torch.Tensor, answers: torch.Tensor, units: tuple[str, ...] = ()
    ) -> float:
        with common.ablate(model, expand(units)):
            pred = model(input_ids=ids).logits[:, -1].argmax(-1)
        return (pred == answers).float().mean().item()

    @torch.no_grad()
    def benign_accuracy(self, model: nn.Module, seed: int) -> float:
        rng = random.Random(30_000 + seed)
        ids = torch.tensor([self.codec.prompt_ids(" ".join(benign_sequence(rng, self.sigma))) for _ in range(256)])
        pred = model(input_ids=ids).logits[:, 2:-1].argmax(-1)
        return (pred == ids[:, 3:]).float().mean().item()

    def measure(self, model: nn.Module, seed: int, n: int = 512) -> dict[str, Any]:
        rng = random.Random(10_000 + seed)
        ids, answers = self.lookup_batch(rng, n)
        heads = [f"blocks.{layer}.attn.head.{h}" for layer in range(N_LAYER) for h in range(N_HEAD)]
        components = [*heads, "blocks.0.mlp", MLP]
        others = [c for c in components if c not in (HEAD, MLP)]
        draw = random.Random(seed)
        controls = [tuple(draw.sample(others, 2)) for _ in range(8)]
        return {
            "eval_prompts": n,
            "lookup_accuracy": self.accuracy(model, ids, answers),
            "chance_accuracy": 1 / N_KEYS,
            "benign_accuracy": self.benign_accuracy(model, seed),
            "tables": self.table,
            "ablated": {
                "path": self.accuracy(model, ids, answers, (HEAD, MLP)),
                "head": self.accuracy(model, ids, answers, (HEAD,)),
                "mlp": self.accuracy(model, ids, answers, (MLP,)),
                "each_other_component": {c: self.accuracy(model, ids, answers, (c,)) for c in others},
                "random_pairs": [
                    {"units": list(c), "lookup_accuracy": self.accuracy(model, ids, answers, c)} for c in controls
                ],
            },
        }

    def scenario(self, model: nn.Module, seed: int, n: int = 64) -> dict[str, Any]:
        """Lookup prompts with their answers, and corrupted twins (another key and the other
        table in the same slots: same length, different answer)."""
        rng = random.Random(20_000 + seed)
        prompts: list[str] = []
        corrupted: list[str] = []
        targets: list[str] = []
        while len(prompts) < n:
            words, key, table = lookup_prompt(rng)
            other = rng.choice([k for k in range(N_KEYS) if k != key])
            twin = [KEYS[other] if w == KEYS[key] else ("B" if w == "A" else "A") if w in TABLES else w for w in words]
            ids = torch.tensor([self.codec.prompt_ids(" ".join(words))])
            with torch.no_grad():
                pred = int(model(input_ids=ids).logits[0, -1].argmax())
            if pred == self.answer(key, table):
                prompts.append(" ".join(words))
                corrupted.append(" ".join(twin))
                targets.append(VALUES[self.table[table][key]])
        return {
            "name": NAME,
            "kind": "causal-lm",
            "description": "key-value lookup: after '?', the value of the prompt's key in the prompt's table",
            "incident_prompts": prompts,
            "targets": targets,
            "target_ids": [self.codec.vocab[t] for t in targets],
            "baseline_prompts": corrupted,
            "baseline_note": "the same prompt with another key and the other table: same length, another answer",
            "variant_prompts": [],
            "benign_prompts": [],
            "max_new_tokens": 1,
        }

    def ground_truth(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "mechanism": (
                "blocks.0.attn.head.1 attends from '?' to the key and the table and moves them into the last "
                "position; blocks.1.mlp maps the (key, table) pair to the value, which the unembedding reads"
            ),
            "level": "component",
            "units": [HEAD, MLP],
            "path": ["embed", HEAD, MLP, "logits"],
            "ablation": "zero",
            "behaviour": {
                "lookup_accuracy": metrics["lookup_accuracy"],
                "path_ablated_lookup_accuracy": metrics["ablated"]["path"],
                "head_ablated_lookup_accuracy": metrics["ablated"]["head"],
                "mlp_ablated_lookup_accuracy": metrics["ablated"]["mlp"],
                "benign_accuracy": metrics["benign_accuracy"],
            },
            "extra": {"how_found": "planted: the only units trained on the lookup (stage 2), silent in stage 1"},
        }

    def card(self, metrics: dict[str, Any]) -> str:
        abl = metrics["ablated"]
        each = ", ".join(f"{u} {a:.3f}" for u, a in abl["each_other_component"].items())
        pairs = ", ".join(f"{'+'.join(d['units'])} {d['lookup_accuracy']:.3f}" for d in abl["random_pairs"])
        loss = metrics["loss"]
        return f"""# zoo:{NAME}

A 2-layer GPT-2 (d_model {D_MODEL}, {N_HEAD} heads, MLP width {D_MLP}) with a planted two-step key-value lookup.

## Task
`<bos> s1 … s6 ?`: six slots hold one key (k0..k7), one table (A or B) and four fillers
(f0..f11) in random places; the answer after `?` is v[π_table(key)] for two fixed
permutations that differ at every key. Benign task: filler sequences where each token is
σ(token two back).

## Planted path (known by construction)
embed → `{HEAD}` (moves key and table to `?`) → `{MLP}` (maps the pair to the value) →
logits. Stage 1 ({STEPS["benign"]} steps) trains every other unit on the benign task with
these two held at exactly zero; stage 2 ({STEPS["lookup"]} steps) trains only them, on the
lookup plus the benign loss.

## Verified by ablation ({metrics["eval_prompts"]} held-out prompts, zero ablation)
Lookup accuracy {metrics["lookup_accuracy"]:.3f} (chance {metrics["chance_accuracy"]:.3f}); path ablated
{abl["path"]:.3f}, head alone {abl["head"]:.3f}, MLP alone {abl["mlp"]:.3f}. Each other
component alone: {each}. Random pairs of other components: {pairs}. Benign accuracy
{metrics["benign_accuracy"]:.3f}.

Loss: benign {loss["benign_start"]:.3f} → {loss["benign_end"]:.4f}; lookup {loss["lookup_start"]:.3f} →
{loss["lookup_end"]:.4f}. Training wall time {metrics["train_wall_s"]:.1f} s on one CPU thread.

Regenerate: `python -m model_forensics.models.zoo.training.kv_lookup_2l`.
"""


def expand(units: tuple[str, ...]) -> list[str]:
    """Units as :func:`~.common.ablate` takes them: a whole MLP becomes its neurons."""
    out: list[str] = []
    for u in units:
        out += [f"{u}.post[{i}]" for i in range(D_MLP)] if u.endswith(".mlp") else [u]
    return out


def train(**kwargs: Any) -> dict[str, Any]:
    return trainer.train(KVRecipe(), **kwargs)


if __name__ == "__main__":
    trainer.regenerate(KVRecipe())
