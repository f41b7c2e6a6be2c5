"""``induction-2l``: a 2-layer attention-only transformer that learns induction heads.

Training data are random token sequences repeated once: ``<bos> A B C … A B C … x y``
(L distinct tokens, L drawn from 5..14, then the same L, then random filler up to a fixed
length). The repeat is predictable only by induction: find the previous occurrence of the
current token and copy the token after it. Because L varies, no fixed positional offset
solves it; it takes a previous-token head in layer 0 and an induction head in layer 1
(Olsson et al. 2022).

The model is a ``GPT2LMHeadModel`` (loadable by Hugging Face as-is) whose MLPs are
switched off: MLP width 4, ``c_fc`` / ``c_proj`` weights and biases fixed at zero during
training, so every MLP adds exactly 0 (GELU(0) = 0) and the network is attention-only.

The ground truth is identified after training: heads are scored on held-out repeated
sequences (previous-token score = mean attention from position i to i-1; induction score
= mean attention from a second-copy token to the token after its previous occurrence;
duplicate-token score = mean attention to the previous occurrence itself), heads above a
threshold become the ground truth, and ablations confirm it. Within the CPU budget the LM
loss alone settles on fixed-offset heads, so an auxiliary attention loss seeds one
previous-token head and one induction head during the first half of training (see
:func:`train_model`).

Run ``python -m model_forensics.models.zoo.training.induction_2l`` to regenerate the
shipped folder.
"""

from __future__ import annotations

import functools
import random
from typing import Any

import torch

from model_forensics.models.zoo.training import common, trainer

NAME = "induction-2l"

N_TOKENS = 48  # ordinary tokens t0..t47
L_MIN, L_MAX = 5, 14  # length of the repeated segment in training
EVAL_L = 10  # segment length of the evaluation sequences
N_LAYER, N_HEAD, D_MODEL, D_MLP, N_POSITIONS = 2, 4, 64, 4, 32
STEPS = 1500
BATCH = 32
SCORE_THRESHOLD = 0.3  # a head with a score above this is a previous-token / induction head
SEED_HEADS = ("blocks.0.attn.head.1", "blocks.1.attn.head.2")
SEED_FRACTION = 0.5


def vocabulary() -> list[str]:
    return [f"t{i}" for i in range(N_TOKENS)]


def sequence(rng: random.Random, length: int | None = None) -> list[str]:
    """``length`` distinct random tokens (default: drawn from L_MIN..L_MAX), the same
    again, then random filler up to 2·L_MAX tokens (without <bos>)."""
    length = rng.randint(L_MIN, L_MAX) if length is None else length
    segment = rng.sample(vocabulary(), length)
    filler = [rng.choice(vocabulary()) for _ in range(2 * (L_MAX - length))]
    return segment + segment + filler


def batch(
    codec: common.WordCodec, rng: random.Random, n: int, length: int | None = None
) -> tuple[torch.Tensor, list[int]]:
    """(n, 1 + 2·L_MAX) token ids, each row ``<bos> S S filler``, and each row's |S|."""
    rows, lengths = [], []
    for _ in range(n):
        seq = sequence(rng, length)
        lengths.append(next(k for k in range(1, L_MAX + 1) if seq[k] == seq[0]))
        rows.append(codec.prompt_ids(" ".join(seq)))
    return torch.tensor(rows), lengths


def seed_targets(lengths: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the seeded heads should attend. Returns (row, query, key) index tensors of
    the induction targets: second-copy position 1+L+j → 2+j (the token after the first
    occurrence of S[j])."""
    rows, queries, keys = [], [], []
    for r, length in enumerate(lengths):
        for j in range(length):
            if 1 + length + j < width:
                rows.append(r)
                queries.append(1 + length + j)
                keys.append(2 + j)
    return torch.tensor(rows), torch.tensor(queries), torch.tensor(keys)


def _mlp_masks(model: Any) -> dict[str, torch.Tensor]:
    return {name: torch.ones_like(p, dtype=torch.bool) for name, p in model.named_parameters() if ".mlp." in name}


def build(codec: common.WordCodec) -> Any:
    """The untrained attention-only GPT-2: its MLP parameters are zero."""
    model = common.gpt2(codec, n_layer=N_LAYER, n_head=N_HEAD, d_model=D_MODEL, d_mlp=D_MLP, n_positions=N_POSITIONS)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp." in name:
                p.zero_()
    return model


# -- scores, ablations and the shipped folder ----------------------------------------------
@torch.no_grad()
def head_scores(model: Any, ids: torch.Tensor) -> dict[str, dict[str, float]]:
    """Previous-token and induction score of every head on ``<bos> S S filler`` rows
    with segment length ``EVAL_L``.

    prev_token: mean attention from position i (2 ≤ i ≤ 2·EVAL_L) to i-1.
    induction: mean attention from second-copy position 1+EVAL_L+j to 2+j, the token
    after the previous occurrence of the current token S[j].
    duplicate_token: mean attention from second-copy position 1+EVAL_L+j to 1+j, the
    previous occurrence of the current token itself.
    """
    out = model(input_ids=ids, output_attentions=True)
    scores: dict[str, dict[str, float]] = {}
    rows = torch.arange(2, 2 * EVAL_L + 1)
    queries = torch.arange(EVAL_L) + 1 + EVAL_L
    for layer, att in enumerate(out.attentions):  # (B, H, T, T)
        for head in range(att.shape[1]):
            a = att[:, head]
            scores[f"blocks.{layer}.attn.head.{head}"] = {
                "prev_token": a[:, rows, rows - 1].mean().item(),
                "induction": a[:, queries, queries - EVAL_L + 1].mean().item(),
                "duplicate_token": a[:, queries, queries - EVAL_L].mean().item(),
            }
    return scores


@torch.no_grad()
def second_half_accuracy(
    model: Any, ids: torch.Tensor, units: tuple[str, ...] = (), mode: str = "zero", means: Any = None
) -> float:
    """Top-1 accuracy on the predictable positions: second-copy tokens S[1..EVAL_L-1]
    (ids positions 2+EVAL_L .. 2·EVAL_L), each predicted from the position before it."""
    with common.ablate(model, units, mode, means):
        logits = model(input_ids=ids).logits  # (B, T, V)
    pred = logits[:, 1 + EVAL_L : 2 * EVAL_L].argmax(-1)
    return (pred == ids[:, 2 + EVAL_L : 2 * EVAL_L + 1]).float().mean().item()


@torch.no_grad()
def first_half_accuracy(model: Any, ids: torch.Tensor) -> float:
    """Accuracy on first-copy tokens S[1..EVAL_L-1] (unpredictable: chance is about
    1/(N_TOKENS-1))."""
    pred = model(input_ids=ids).logits[:, 1:EVAL_L].argmax(-1)
    return (pred == ids[:, 2 : EVAL_L + 1]).float().mean().item()


class InductionRecipe:
    """The zoo entry's :class:`~.trainer.Recipe`: one stage, ``lm``, of next-token loss on
    every position with the MLP parameters held at exactly zero. For the first
    ``SEED_FRACTION`` of the steps an auxiliary loss also pulls the attention of
    ``SEED_HEADS`` (one head per layer) towards the previous token (layer 0) and the
    induction target (layer 1): without it the LM loss alone settles on fixed-offset heads
    within this step budget. Afterwards only the LM loss trains; the loss curve records the
    LM loss alone. The ground truth is found after training (:meth:`measure`)."""

    name = NAME

    def __init__(self) -> None:
        self.steps = {"lm": STEPS}
        self.lr = 3e-3
        self.codec = common.WordCodec(vocabulary())

    def build(self) -> Any:
        return build(self.codec)

    def stage(self, name: str, model: Any, rng: random.Random, steps: int) -> trainer.Stage:
        (l0, h0), (l1, h1) = ((int(u.split(".")[1]), common.parse_unit(u)[2]) for u in SEED_HEADS)

        def lm(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            ids, lengths = batch(self.codec, rng, BATCH)
            seeding = step < SEED_FRACTION * steps
            out = model(input_ids=ids, labels=ids, output_attentions=seeding)
            loss = out.loss
            if seeding:
                width = ids.shape[1]
                pos = torch.arange(1, width)
                prev = out.attentions[l0][:, h0, pos, pos - 1]  # (B, T-1)
                rows, queries, keys = seed_targets(lengths, width)
                ind = out.attentions[l1][rows, h1, queries, keys]
                loss = loss - prev.clamp_min(1e-6).log().mean() - ind.clamp_min(1e-6).log().mean()
            return loss, out.loss

        return trainer.Stage(common.complement(model, _mlp_masks(model)), lm, lr=self.lr)

    def tokenizer(self) -> Any:
        return common.gpt2_tokenizer(self.codec, N_POSITIONS)

    def measure(self, model: Any, seed: int, n: int = 256, n_draws: int = 5) -> dict[str, Any]:
        """Head scores, the ground truth they select, and zero / mean ablations confirming it."""
        rng = random.Random(10_000 + seed)
        ids, _ = batch(self.codec, rng, n, EVAL_L)
        scores = head_scores(model, ids)
        prev_heads = [u for u, s in scores.items() if u.startswith("blocks.0.") and s["prev_token"] > SCORE_THRESHOLD]
        dup_heads = [
            u
            for u, s in scores.items()
            if u.startswith("blocks.0.") and u not in prev_heads and s["duplicate_token"] > SCORE_THRESHOLD
        ]
        ind_heads = [u for u, s in scores.items() if u.startswith("blocks.1.") and s["induction"] > SCORE_THRESHOLD]
        gt = tuple(prev_heads + dup_heads + ind_heads)
        others = [u for u in scores if u not in gt]
        means = common.unit_means(model, list(scores), [{"input_ids": ids}])
        result: dict[str, Any] = {
            "eval_sequences": n,
            "second_half_accuracy": second_half_accuracy(model, ids),
            "first_half_accuracy": first_half_accuracy(model, ids),
            "chance_accuracy": 1 / (N_TOKENS - 1),
            "head_scores": scores,
            "previous_token_heads": prev_heads,
            "duplicate_token_heads": dup_heads,
            "induction_heads": ind_heads,
        }
        for mode in ("zero", "mean"):
            m = means if mode == "mean" else None
            result[f"{mode}_ablation"] = {
                "ground_truth": second_half_accuracy(model, ids, gt, mode, m),
                "induction_heads": second_half_accuracy(model, ids, tuple(ind_heads), mode, m),
                "previous_token_heads": second_half_accuracy(model, ids, tuple(prev_heads), mode, m),
                "duplicate_token_heads": second_half_accuracy(model, ids, tuple(dup_heads), mode, m)
                if dup_heads
                else None,
                "all_other_heads": second_half_accuracy(model, ids, tuple(others), mode, m) if others else None,
                "each_head": {u: second_half_accuracy(model, ids, (u,), mode, m) for u in scores},
            }
        draws: list[dict[str, Any]] = []
        draw_rng = random.Random(seed)
        k = min(len(gt), len(others))
        seen: list[set[str]] = []
        for _ in range(50 * n_draws):  # different draws, fewer if the pool runs out
            units = tuple(draw_rng.sample(others, k))
            if len(draws) == n_draws or set(units) in seen:
                continue
            seen.append(set(units))
            draws.append(
                {"units": list(units), "second_half_accuracy": second_half_accuracy(model, ids, units, "zero")}
            )
        result["random_ablated"] = draws
        return result

    def scenario(self, model: Any, seed: int, n: int = 24) -> dict[str, Any]:
        """Induction prompts (a repeated sequence cut inside its second half) with the token
        induction predicts, and baselines whose first half is a different sequence."""
        rng, codec = random.Random(20_000 + seed), self.codec
        incidents: list[str] = []
        baselines: list[str] = []
        targets: list[str] = []
        while len(incidents) < n:
            seq = sequence(rng, EVAL_L)
            cut = rng.randint(EVAL_L + 2, 2 * EVAL_L - 1)  # prompt = seq[:cut], target = seq[cut]
            other = rng.sample([t for t in vocabulary() if t not in seq[:EVAL_L]], EVAL_L)
            prompt, baseline = seq[:cut], other + seq[EVAL_L:cut]
            pred = model(input_ids=torch.tensor([codec.prompt_ids(" ".join(prompt))])).logits[0, -1].argmax().item()
            if codec.words[pred] == seq[cut]:
                incidents.append(" ".join(prompt))
                baselines.append(" ".join(baseline))
                targets.append(seq[cut])
        benign = [" ".join(rng.sample(vocabulary(), EVAL_L)) for _ in range(n)]
        return {
            "name": NAME,
            "kind": "causal-lm",
            "description": "induction: after A B … A, predict B (repeated random tokens)",
            "incident_prompts": incidents,
            "targets": targets,
            "target_ids": [codec.vocab[t] for t in targets],
            "predicates": [{"kind": "token_is", "args": {"token": codec.vocab[t]}} for t in targets],
            "predicate": {"kind": "token_is", "args": {"token": codec.vocab[targets[0]]}},
            "predicate_note": "the target differs per prompt: use predicates[i] for incident_prompts[i]",
            "baseline_prompts": baselines,
            "baseline_note": "same second-half prefix, first half replaced by unrelated tokens: nothing to copy",
            "variant_prompts": [],
            "benign_prompts": benign,
            "benign_note": "random non-repeating sequences (no induction possible)",
            "max_new_tokens": 1,
        }

    def ground_truth(self, metrics: dict[str, Any]) -> dict[str, Any]:
        zero = metrics["zero_ablation"]
        scores = metrics["head_scores"]
        units = [*metrics["previous_token_heads"], *metrics["duplicate_token_heads"], *metrics["induction_heads"]]
        return {
            "mechanism": (
                "a previous-token head in layer 0 writes each token's predecessor into its position (and a duplicate-token "
                "head marks repeated tokens); the induction head in layer 1 attends from the current token to the token "
                "after its previous occurrence and copies it"
            ),
            "level": "head",
            "units": units,
            "ablation": "zero",
            "behaviour": {
                "second_half_accuracy": metrics["second_half_accuracy"],
                "first_half_accuracy": metrics["first_half_accuracy"],
                "ablated_second_half_accuracy": zero["ground_truth"],
                "induction_heads_ablated_second_half_accuracy": zero["induction_heads"],
                "previous_token_heads_ablated_second_half_accuracy": zero["previous_token_heads"],
                "duplicate_token_heads_ablated_second_half_accuracy": zero["duplicate_token_heads"],
            },
            "extra": {
                "previous_token_heads": {u: scores[u]["prev_token"] for u in metrics["previous_token_heads"]},
                "duplicate_token_heads": {u: scores[u]["duplicate_token"] for u in metrics["duplicate_token_heads"]},
                "induction_heads": {u: scores[u]["induction"] for u in metrics["induction_heads"]},
                "all_head_scores": scores,
                "score_threshold": SCORE_THRESHOLD,
                "scores": "prev_token = mean attention i→i-1; induction = mean attention from a second-copy token to "
                "the token after its previous occurrence; duplicate_token = mean attention from a second-copy token to "
                "its previous occurrence",
                "how_found": "identified after training by their attention scores (threshold above) and confirmed by "
                "ablation; the previous-token and induction heads were seeded by an auxiliary attention loss on "
                f"{', '.join(SEED_HEADS)} during the first {SEED_FRACTION:.0%} of training (see card.md), the "
                "duplicate-token head emerged on its own",
                "mlp": "attention-only: MLP width 4 with weights and biases fixed at zero",
            },
        }

    def card(self, metrics: dict[str, Any]) -> str:
        zero, mean = metrics["zero_ablation"], metrics["mean_ablation"]
        rows = "\n".join(
            f"| {u} | {s['prev_token']:.4f} | {s['duplicate_token']:.4f} | {s['induction']:.4f} | "
            f"{zero['each_head'][u]:.4f} | {mean['each_head'][u]:.4f} |"
            for u, s in metrics["head_scores"].items()
        )
        draws = "; ".join(
            f"{', '.join(d['units'])}: {d['second_half_accuracy']:.4f}" for d in metrics["random_ablated"]
        )

        def fmt(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.4f}"

        return f"""# zoo:{NAME}

A 2-layer attention-only transformer trained on repeated random sequences, with a known induction circuit.

## Architecture
`GPT2LMHeadModel`: {N_LAYER} layers, d_model {D_MODEL}, {N_HEAD} heads (d_head {D_MODEL // N_HEAD}), {N_POSITIONS} positions,
tied embeddings. The MLPs are switched off: width {D_MLP} with `c_fc` / `c_proj` weights and biases fixed at exactly
zero throughout training, so each MLP adds 0 and the model is attention-only while staying a stock HF GPT-2.
Vocabulary: `<pad> <unk> <bos> <eos>` and t0..t{N_TOKENS - 1} (`tokenizer.json`; the tokenizer prepends `<bos>`).

## Data and training
`<bos>` + L distinct random tokens (L from {L_MIN} to {L_MAX}) + the same L again + random filler up to
{2 * L_MAX} tokens; next-token loss on every position ({metrics["steps"]} steps, batch {BATCH}). Varying L rules out
a single positional offset. Within this CPU budget the LM loss alone did not form induction heads (it settled on
fixed-offset heads in layer 0), so for the first {SEED_FRACTION:.0%} of the steps an auxiliary loss pulls the
attention of {SEED_HEADS[0]} towards the previous token and of {SEED_HEADS[1]} towards the induction target;
the rest of training is the LM loss alone. Evaluation uses L = {EVAL_L}.

## Ground truth (found by attention scores, confirmed by ablation)
Scores on {metrics["eval_sequences"]} held-out sequences; a head is ground truth when its score exceeds
{SCORE_THRESHOLD}: previous-token heads (layer 0) {", ".join(metrics["previous_token_heads"]) or "none"};
duplicate-token heads (layer 0) {", ".join(metrics["duplicate_token_heads"]) or "none"};
induction heads (layer 1) {", ".join(metrics["induction_heads"]) or "none"}.

| head | prev-token | duplicate-token | induction | 2nd-copy acc., zero-ablated | mean-ablated |
|---|---|---|---|---|---|
{rows}

Second-copy accuracy: full model {metrics["second_half_accuracy"]:.4f} (first copy {metrics["first_half_accuracy"]:.4f},
chance {metrics["chance_accuracy"]:.4f}). Zero-ablated: ground truth {zero["ground_truth"]:.4f}, induction heads
{zero["induction_heads"]:.4f}, previous-token heads {zero["previous_token_heads"]:.4f}, duplicate-token heads
{fmt(zero["duplicate_token_heads"])}, all other heads together {fmt(zero["all_other_heads"])}. Mean-ablated: ground
truth {mean["ground_truth"]:.4f}, induction heads {mean["induction_heads"]:.4f}, all other heads together
{fmt(mean["all_other_heads"])}.
Random non-ground-truth heads (as many as the ground truth, or all others if fewer), zero-ablated: {draws}.

Loss {metrics["loss"]["start"]:.3f} → {metrics["loss"]["end"]:.4f} (first copies and filler are unpredictable, so
the floor is well above 0). Training wall time {metrics["train_wall_s"]:.1f} s on one CPU thread (shared machine;
total CPU time {metrics["total_cpu_s"]:.1f} s including evaluation).

Regenerate: `python -m model_forensics.models.zoo.training.induction_2l`.
"""


# The module's entry point: train(steps=None, seed=0, out_dir=None, *, evaluate=True) -> metrics.
train = functools.partial(trainer.train, InductionRecipe())

if __name__ == "__main__":
    trainer.regenerate(InductionRecipe())
