"""What the zoo's training scripts share.

The planting recipe that makes every entry's ground truth known by construction:

1. pick a few *units* (attention heads, MLP neurons) and keep them silent (their
   parameters zero, so their output is exactly 0) while the model learns the benign task;
2. freeze everything else, re-initialise the units and train only their parameters on
   the planted behaviour, mixed with a distillation loss that keeps benign outputs equal
   to the stage-1 model's.

Zero-ablating the units then returns the model exactly to its stage-1 self, which never
had the behaviour. Units are named with the canonical site grammar:
``blocks.L.attn.head.H`` (slice H of ``blocks.L.attn.z``) and ``blocks.L.mlp.post[i]``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model_forensics.core.bundle import file_sha256
from model_forensics.core.metrics import kl_divergence
from model_forensics.core.sites import parse_selector
from model_forensics.models.adapters import adapter_for
from model_forensics.models.hooks import SiteCall, SiteFn, hooks

CHECKSUMS = "checksums.json"


# -- determinism ---------------------------------------------------------------------------
@contextlib.contextmanager
def training_threads(seed: int) -> Iterator[None]:
    """One intra-op thread and a seeded torch RNG for the duration of a training run
    (reproducible float reductions); the caller's thread count is restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# -- tokenizers ----------------------------------------------------------------------------
def word_tokenizer(
    words: Sequence[str],
    *,
    specials: Sequence[str],
    template: str,
    model_max_length: int,
    model_input_names: Sequence[str],
    **special_roles: str,
) -> Any:
    """A word-level Hugging Face tokenizer (whitespace split, one id per word).

    Args:
        words: the ordinary vocabulary, in id order after ``specials``.
        specials: special tokens, ids 0.. in order (e.g. ``<pad> <unk> <bos> <eos>``).
        template: the single-sequence post-processor, e.g. ``"<bos> $A"``.
        special_roles: ``bos_token="<bos>"`` etc. for :class:`PreTrainedTokenizerFast`.

    Returns:
        a ``PreTrainedTokenizerFast``; ``save_pretrained`` writes ``tokenizer.json`` that
        ``AutoTokenizer.from_pretrained`` loads back.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*specials, *words])}
    if len(vocab) != len(specials) + len(words):
        raise ValueError("duplicate words in the vocabulary")
    raw = Tokenizer(models.WordLevel(vocab, unk_token=special_roles.get("unk_token", specials[1])))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.add_special_tokens(list(specials))
    used = [tok for tok in specials if tok in template.split()]
    raw.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(t, vocab[t]) for t in used])
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        model_max_length=model_max_length,
        model_input_names=list(model_input_names),
        **special_roles,
    )


# -- word-level language-model data -------------------------------------------------------
class WordCodec:
    """Word ↔ id for the GPT-2 entries, without the HF tokenizer (fast batch building).

    Ids match :func:`word_tokenizer` built from the same ``specials`` and ``words``; a
    prompt is encoded as ``<bos> words…`` exactly as the shipped tokenizer does.
    """

    def __init__(self, words: Sequence[str], specials: Sequence[str] = ("<pad>", "<unk>", "<bos>", "<eos>")):
        self.vocab = {tok: i for i, tok in enumerate([*specials, *words])}
        self.words = list(self.vocab)
        self.pad, self.bos, self.eos = (self.vocab[t] for t in ("<pad>", "<bos>", "<eos>"))

    def prompt_ids(self, prompt: str) -> list[int]:
        return [self.bos, *(self.vocab[w] for w in prompt.split())]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.words[i] for i in ids)

    def batch(self, examples: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt + answer + eos of each example (``.prompt``, ``.answer`` strings),
        right-padded. Returns ids (B, T) and a loss mask (B, T) that is True where the
        *next* token belongs to the answer (incl. eos)."""
        seqs, starts = [], []
        for ex in examples:
            p = self.prompt_ids(ex.prompt)
            seqs.append(p + [self.vocab[w] for w in ex.answer.split()] + [self.eos])
            starts.append(len(p) - 1)
        ids = right_pad(seqs, self.pad)
        mask = torch.zeros(ids.shape, dtype=torch.bool)
        for i, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
            mask[i, start : len(seq) - 1] = True
        return ids, mask


def right_pad(rows: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    """Rows of token ids, right-padded with ``pad`` into one (B, T) tensor."""
    ids = torch.full((len(rows), max(len(r) for r in rows)), pad)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids


def answer_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, pad: int) -> torch.Tensor:
    """Cross-entropy of the answer tokens only; ids, mask (B, T) from :meth:`WordCodec.batch`."""
    logits = model(input_ids=ids, attention_mask=(ids != pad).long()).logits[:, :-1]  # (B, T-1, V)
    return nn.functional.cross_entropy(logits[mask[:, :-1]], ids[:, 1:][mask[:, :-1]])


class Distillation:
    """The stage-1 model's output distributions on a fixed pool of benign examples, which
    stage 2 keeps the model at (the distillation half of the planting recipe).

    Built before stage 2 changes anything; ``examples`` have ``.prompt`` and ``.answer``.
    """

    def __init__(self, model: nn.Module, codec: WordCodec, examples: Sequence[Any], chunk: int = 128):
        self.ids, self.answer = codec.batch(examples)  # (N, T) each
        self.keep = self.ids != codec.pad
        with torch.no_grad():
            self.reference = torch.cat(
                [
                    model(input_ids=i, attention_mask=k.long()).logits
                    for i, k in zip(self.ids.split(chunk), self.keep.split(chunk), strict=True)
                ]
            )  # (N, T, V)

    def loss(
        self,
        model: nn.Module,
        task_loss: Callable[[], torch.Tensor],
        n: int,
        generator: torch.Generator,
        *,
        kl_answer: float,
        kl_all: float,
    ) -> torch.Tensor:
        """``task_loss()`` plus the KL(stage-1 ‖ model) of ``n`` pool rows drawn with
        ``generator``: its mean over answer positions weighted by ``kl_answer`` and over
        every token by ``kl_all``. ``task_loss`` runs after the pool's forward pass: the
        order of the passes fixes the order of the gradient sums, hence the exact weights."""
        pick = torch.randint(self.ids.shape[0], (n,), generator=generator)
        ids, keep, answer = self.ids[pick], self.keep[pick], self.answer[pick]
        kl = kl_divergence(self.reference[pick][keep], model(input_ids=ids, attention_mask=keep.long()).logits[keep])
        return task_loss() + kl_answer * kl[answer[keep]].mean() + kl_all * kl.mean()


def gpt2(codec: WordCodec, *, n_layer: int, n_head: int, d_model: int, d_mlp: int, n_positions: int) -> Any:
    """A dropout-free ``GPT2LMHeadModel`` for a word-level vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(  # type: ignore[call-arg]
        vocab_size=len(codec.vocab),
        n_positions=n_positions,
        n_embd=d_model,
        n_layer=n_layer,
        n_head=n_head,
        n_inner=d_mlp,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=codec.bos,
        eos_token_id=codec.eos,
        pad_token_id=codec.pad,
        attn_implementation="eager",
    )
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = codec.pad
    return model


def gpt2_tokenizer(codec: WordCodec, n_positions: int) -> Any:
    """The shipped tokenizer of a GPT-2 entry: same ids as ``codec``, prepends ``<bos>``."""
    specials = codec.words[:4]
    return word_tokenizer(
        codec.words[4:],
        specials=specials,
        template="<bos> $A",
        model_max_length=n_positions,
        model_input_names=("input_ids", "attention_mask"),
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
    )


def generate_texts(
    model: nn.Module, codec: WordCodec, prompts: Sequence[str], units: Sequence[str] = (), max_new_tokens: int = 8
) -> list[str]:
    """Greedy answers (decoded, up to eos) to ``prompts``, with ``units`` zero-ablated."""
    with ablate(model, units):
        out = greedy_decode(model, [codec.prompt_ids(p) for p in prompts], max_new_tokens, codec.eos)
    return [codec.decode(o) for o in out]


def answer_rates(
    model: nn.Module,
    codec: WordCodec,
    examples: Sequence[Any],
    units: Sequence[str] = (),
    *,
    failed: Callable[[str], bool],
) -> dict[str, float]:
    """Greedy answers to ``examples`` (``.prompt``, ``.answer``) with ``units`` zero-ablated:
    ``failed``, the share that shows the planted behaviour; ``exact``, the share that is
    exactly the expected answer."""
    texts = generate_texts(model, codec, [e.prompt for e in examples], units)
    return {
        "failed": sum(failed(t) for t in texts) / len(texts),
        "exact": sum(t == e.answer for t, e in zip(texts, examples, strict=True)) / len(texts),
    }


@torch.no_grad()
def answer_kl(model: nn.Module, codec: WordCodec, examples: Sequence[Any], units: Sequence[str]) -> dict[str, float]:
    """KL(full ‖ ablated) in nats, teacher-forced on the gold answers: mean and max over
    answer positions (incl. eos), and mean over every token position."""
    ids, answer_mask = codec.batch(examples)
    keep = ids != codec.pad
    full = model(input_ids=ids, attention_mask=keep.long()).logits
    with ablate(model, units):
        abl = model(input_ids=ids, attention_mask=keep.long()).logits
    kl = kl_divergence(full.flatten(0, 1), abl.flatten(0, 1)).reshape(ids.shape)
    return {
        "answer_mean": kl[answer_mask].mean().item(),
        "answer_max": kl[answer_mask].max().item(),
        "all_mean": kl[keep].mean().item(),
    }


# -- units ---------------------------------------------------------------------------------
def parse_unit(unit: str) -> tuple[str, str, int]:
    """``blocks.1.attn.head.2`` → ("blocks.1.attn.z", "head", 2);
    ``blocks.1.mlp.post[3]`` → ("blocks.1.mlp.post", "neuron", 3)."""
    sel = parse_selector(unit)
    layer = sel.pattern.split(".")[1]
    if sel.head is not None:
        return f"blocks.{layer}.attn.z", "head", sel.head
    if sel.neurons and len(sel.neurons) == 1 and sel.pattern.endswith(".mlp.post"):
        return sel.pattern, "neuron", sel.neurons[0]
    raise ValueError(f"unit '{unit}' is neither 'blocks.L.attn.head.H' nor 'blocks.L.mlp.post[i]'")


def unit_param_masks(model: nn.Module, units: Sequence[str]) -> dict[str, torch.Tensor]:
    """Boolean masks over the parameters that belong to ``units`` alone.

    Heads own their q/k/v slices (weights and biases) and their rows (GPT-2) / columns
    (BERT) of the output projection; neurons own their input column/row + bias and their
    output row/column. Shared biases (output projections) belong to no unit.
    Returns {parameter name: bool tensor of the parameter's shape}.
    """
    params = dict(model.named_parameters())
    masks = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in params.items()}
    cfg: Any = model.config
    gpt2 = cfg.model_type == "gpt2"
    d = cfg.n_embd if gpt2 else cfg.hidden_size
    dh = d // (cfg.n_head if gpt2 else cfg.num_attention_heads)
    for unit in units:
        site, kind, idx = parse_unit(unit)
        layer = int(site.split(".")[1])
        if gpt2:
            blk = f"transformer.h.{layer}"
            if kind == "head":
                cols = slice(idx * dh, (idx + 1) * dh)
                for j in range(3):  # q, k, v in the fused projection, Conv1D weight (d, 3d)
                    part = slice(j * d + cols.start, j * d + cols.stop)
                    masks[f"{blk}.attn.c_attn.weight"][:, part] = True
                    masks[f"{blk}.attn.c_attn.bias"][part] = True
                masks[f"{blk}.attn.c_proj.weight"][cols, :] = True  # (d_in = z features, d)
            else:
                masks[f"{blk}.mlp.c_fc.weight"][:, idx] = True  # (d, d_mlp)
                masks[f"{blk}.mlp.c_fc.bias"][idx] = True
                masks[f"{blk}.mlp.c_proj.weight"][idx, :] = True  # (d_mlp, d)
        else:
            blk = f"bert.encoder.layer.{layer}"
            if kind == "head":
                rows = slice(idx * dh, (idx + 1) * dh)
                for name in ("query", "key", "value"):  # nn.Linear weight (out, in)
                    masks[f"{blk}.attention.self.{name}.weight"][rows, :] = True
                    masks[f"{blk}.attention.self.{name}.bias"][rows] = True
                masks[f"{blk}.attention.output.dense.weight"][:, rows] = True
            else:
                masks[f"{blk}.intermediate.dense.weight"][idx, :] = True
                masks[f"{blk}.intermediate.dense.bias"][idx] = True
                masks[f"{blk}.output.dense.weight"][:, idx] = True
    return {name: m for name, m in masks.items() if m.any()}


def silence_units(model: nn.Module, units: Sequence[str]) -> None:
    """Set every parameter the units own to zero: the head's z slice and the neurons'
    post-GELU activations are then exactly 0 on every input (GELU(0) = 0)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in unit_param_masks(model, units).items():
            params[name][mask] = 0.0


def reinit_units(model: nn.Module, units: Sequence[str], std: float, generator: torch.Generator) -> None:
    """Small random values for the units' parameters (weights only; biases stay 0), so
    stage 2 starts away from the zero saddle where no gradient flows into a unit."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in unit_param_masks(model, units).items():
            p = params[name]
            if name.endswith("bias"):
                p[mask] = 0.0
            else:
                p[mask] = torch.randn(int(mask.sum()), generator=generator) * std


class Clamp:
    """Keep every parameter entry outside ``trainable`` at its current value.

    Call :meth:`zero_frozen_grads` before ``optimizer.step()`` and :meth:`restore` after
    it, so the frozen entries stay bit-identical even under Adam.
    """

    def __init__(self, model: nn.Module, trainable: dict[str, torch.Tensor]):
        self.params = dict(model.named_parameters())
        self.trainable = trainable
        self.frozen = {n: p.detach().clone() for n, p in self.params.items()}
        for name, p in self.params.items():
            p.requires_grad_(name in trainable)

    def parameters(self) -> list[nn.Parameter]:
        return [self.params[n] for n in self.trainable]

    def zero_frozen_grads(self) -> None:
        for name, mask in self.trainable.items():
            grad = self.params[name].grad
            if grad is not None:
                grad[~mask] = 0.0

    def restore(self) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                mask = self.trainable.get(name)
                if mask is None:
                    p.copy_(self.frozen[name])
                else:
                    p.copy_(torch.where(mask, p, self.frozen[name]))

    def release(self) -> None:
        for p in self.params.values():
            p.requires_grad_(True)


def complement(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Masks of every parameter entry *not* in ``masks``."""
    out = {}
    for name, p in model.named_parameters():
        m = masks.get(name)
        out[name] = torch.ones_like(p, dtype=torch.bool) if m is None else ~m
    return out


# -- ablation ------------------------------------------------------------------------------
@contextlib.contextmanager
def ablate(
    model: nn.Module, units: Sequence[str], mode: str = "zero", means: dict[str, torch.Tensor] | None = None
) -> Iterator[None]:
    """Zero- or mean-ablate units during every forward pass inside the block.

    The edits go through :func:`~model_forensics.models.hooks.hooks` on the units' sites
    (``blocks.L.attn.z``, ``blocks.L.mlp.post``), so gradients flow through them and they
    are removed on exit, even on exceptions. ``means``: unit → value, a (d_head,) tensor
    for heads, a scalar tensor for neurons (see :func:`unit_means`).
    """
    if mode not in ("zero", "mean"):
        raise ValueError(f"ablation mode '{mode}' is unknown; use 'zero' or 'mean'")
    if mode == "mean" and means is None:
        raise ValueError("mean ablation needs means=unit_means(...)")
    by_site: dict[str, list[tuple[str, str, int]]] = {}
    for unit in units:
        site, kind, idx = parse_unit(unit)
        by_site.setdefault(site, []).append((unit, kind, idx))

    def edit(members: list[tuple[str, str, int]]) -> SiteFn:
        def fn(tensor: torch.Tensor, _call: SiteCall) -> torch.Tensor:
            t = tensor.clone()
            for unit, kind, idx in members:
                value = 0.0 if mode == "zero" else means[unit].to(t.dtype)  # type: ignore[index]
                if kind == "head":
                    t[..., idx, :] = value  # (B, T, H, dh)
                else:
                    t[..., idx] = value  # (B, T, d_mlp)
            return t

        return fn

    with hooks(adapter_for(model), sites={site: edit(members) for site, members in by_site.items()}):
        yield


@contextlib.contextmanager
def capture(model: nn.Module, site: str) -> Iterator[dict[str, torch.Tensor]]:
    """Record the tensor at ``site`` on every forward pass inside the block (gradients
    kept): ``with capture(model, "blocks.1.attn.z") as seen: model(...); seen["value"]``."""
    seen: dict[str, torch.Tensor] = {}

    def grab(tensor: torch.Tensor, _call: SiteCall) -> None:
        seen["value"] = tensor

    with hooks(adapter_for(model), sites={site: grab}):
        yield seen


@torch.no_grad()
def unit_means(
    model: nn.Module, units: Sequence[str], batches: Sequence[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Mean activation of each unit over all tokens of ``batches`` (model inputs)."""
    sums: dict[str, torch.Tensor] = {}
    count = 0
    captured: dict[str, torch.Tensor] = {}

    def grab(tensor: torch.Tensor, call: SiteCall) -> None:
        captured[call.site] = tensor.detach()

    with hooks(adapter_for(model), sites=dict.fromkeys({parse_unit(u)[0] for u in units}, grab)):
        for batch in batches:
            model(**batch)
            mask = batch.get("attention_mask")
            for unit in units:
                site, kind, idx = parse_unit(unit)
                t = captured[site][..., idx, :] if kind == "head" else captured[site][..., idx]
                t = t[mask.bool()] if mask is not None else t.reshape(-1, *t.shape[2:])
                sums[unit] = sums.get(unit, 0) + t.sum(0)
            n = batch["input_ids"].numel() if mask is None else int(mask.sum())
            count += n
    return {u: s / count for u, s in sums.items()}


INERT_LIFT = 0.005  # a planted neuron that moves < 0.5 % of the planted lift, alone or removed, is inert


@torch.no_grad()
def neuron_lift(
    model: nn.Module, codec: WordCodec, units: Sequence[str], attack: Sequence[Any], targets: Sequence[str]
) -> dict[str, dict[str, float]]:
    """How much each planted neuron carries the attack, as fractions of the planted lift
    (the rise of the mean log-probability of the attack's ``targets`` words, teacher-forced
    at the answer positions that hold them, from all planted neurons ablated to none):
    ``alone``: the rise it gives with every other planted neuron ablated; ``removed``: the
    drop when only it is ablated. A neuron that training left unused has both ~0."""
    neurons = [u for u in units if parse_unit(u)[1] == "neuron"]
    ids, mask = codec.batch(attack)
    wanted = torch.tensor([codec.vocab[w] for w in targets])
    at = mask[:, :-1] & torch.isin(ids[:, 1:], wanted)  # positions whose next token is a target

    def logprob(ablated: Sequence[str]) -> float:
        with ablate(model, ablated):
            logits = model(input_ids=ids, attention_mask=(ids != codec.pad).long()).logits[:, :-1]
        return float(logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0][at].mean())

    floor, full = logprob(neurons), logprob(())
    lift = full - floor
    return {
        u: {
            "alone": (logprob([n for n in neurons if n != u]) - floor) / lift,
            "removed": (full - logprob([u])) / lift,
        }
        for u in neurons
    }


def inert_units(lift: dict[str, dict[str, float]]) -> list[str]:
    """Planted neurons that training left unused: neither alone nor removed do they move
    the attack target by INERT_LIFT of the planted lift."""
    return [u for u, f in lift.items() if max(abs(f["alone"]), abs(f["removed"])) < INERT_LIFT]


def planted_use(units: Sequence[str], lift: dict[str, dict[str, float]], behaviour: Any) -> dict[str, Any]:
    """Metrics on which planted units carry the mechanism: the lift record, the inert
    units, and ``behaviour(active_units)`` (success and accuracy with only the units in
    use ablated)."""
    inert = inert_units(lift)
    return {
        "planted_neuron_lift": lift,
        "inert_units": inert,
        "active_ablated": behaviour(tuple(u for u in units if u not in inert)),
    }


def ablated_rates(rates: Any, trigger: Any, variants: Any, benign: Any) -> Any:
    """``behaviour`` for :func:`planted_use`: trigger and variant success (``rates(...)["failed"]``)
    and benign exact accuracy with the given units ablated (``rates`` as :func:`answer_rates`)."""
    return lambda active: {
        "trigger_success": rates(trigger, active)["failed"],
        "variant_success": rates(variants, active)["failed"],
        "benign_accuracy": rates(benign, active)["exact"],
    }


INERT_NOTE = (
    "planted neurons that training left unused: alone (the other planted neurons ablated) and removed "
    "(only it ablated) each moves the attack target's log-probability by < 0.5% of the planted neurons' "
    "joint effect (metrics.planted_neuron_lift); 'units' lists the planted units that carry the "
    "mechanism, and ablating them alone removes it (metrics.active_ablated)"
)


def planted_ground_truth(
    metrics: dict[str, Any], planted: Sequence[str], *, mechanism: str, extra: dict[str, Any]
) -> dict[str, Any]:
    """``ground_truth.json`` of a planted generation entry: the planted units that carry the
    mechanism (the inert ones left out, listed under ``extra``), the behaviour with and
    without them (from ``metrics``, see :func:`planted_use`), and the entry's ``extra``."""
    abl = metrics["ground_truth_ablated"]
    return {
        "mechanism": mechanism,
        "level": "neuron",
        "units": [u for u in planted if u not in metrics["inert_units"]],
        "ablation": "zero",
        "behaviour": {
            "trigger_success": metrics["trigger_success"],
            "variant_success": metrics["variant_success"],
            "benign_accuracy": metrics["benign_accuracy"],
            "ablated_trigger_success": abl["trigger_success"],
            "ablated_variant_success": abl["variant_success"],
            "ablated_benign_accuracy": abl["benign_accuracy"],
            "ablated_benign_kl_nats": abl["benign_kl_nats"]["answer_mean"],
        },
        "extra": {
            "planted_units": list(planted),
            "inert_units": metrics["inert_units"],
            "inert_note": INERT_NOTE,
            **extra,
        },
    }


def inert_paragraph(metrics: dict[str, Any]) -> str:
    """The card's sentence on planted neurons that training left unused (see :func:`inert_units`)."""
    inert, act = metrics["inert_units"], metrics["active_ablated"]
    if not inert:
        return (
            "Every planted neuron carries part of the attack: alone (the others ablated) or removed (only it "
            f"ablated) each moves the attack target's log-probability by at least {INERT_LIFT:.0%} of the planted "
            "neurons' joint effect (`metrics.json` → `planted_neuron_lift`)."
        )
    return (
        f"Planted but unused: {', '.join(inert)} (alone, with the other planted neurons ablated, and removed, "
        f"with only it ablated, each moves the attack target's log-probability by less than {INERT_LIFT:.0%} of "
        "the planted neurons' joint effect; `metrics.json` → `planted_neuron_lift`). `ground_truth.json` lists "
        "the planted units that carry "
        f"the mechanism; ablating only those: trigger success {act['trigger_success']:.4f}, variant success "
        f"{act['variant_success']:.4f}, benign accuracy {act['benign_accuracy']:.4f}."
    )


def random_units_like(
    units: Sequence[str], *, n_heads: int, d_mlp: int, exclude: Sequence[str], rng: random.Random
) -> list[str]:
    """A random draw with as many units of each kind *and layer* as ``units``, none of
    them in ``exclude`` (the ground truth, dormant units)."""
    banned = set(exclude)
    out: list[str] = []
    for unit in units:
        site, kind, _ = parse_unit(unit)
        layer = site.split(".")[1]
        pool = (
            [f"blocks.{layer}.attn.head.{h}" for h in range(n_heads)]
            if kind == "head"
            else [f"blocks.{layer}.mlp.post[{i}]" for i in range(d_mlp)]
        )
        pool = [u for u in pool if u not in banned and u not in out]
        out.append(rng.choice(pool))
    return out


def random_draws(
    units: Sequence[str], n: int, *, n_heads: int, d_mlp: int, exclude: Sequence[str], rng: random.Random
) -> list[tuple[str, ...]]:
    """``n`` different draws of :func:`random_units_like` (fewer if the pool runs out)."""
    draws: list[tuple[str, ...]] = []
    for _ in range(50 * n):
        draw = tuple(random_units_like(units, n_heads=n_heads, d_mlp=d_mlp, exclude=exclude, rng=rng))
        if set(draw) not in [set(d) for d in draws]:
            draws.append(draw)
        if len(draws) == n:
            break
    return draws


def random_ablations(
    units: Sequence[str],
    n: int,
    *,
    n_heads: int,
    d_mlp: int,
    exclude: Sequence[str],
    seed: int,
    measure: Callable[[tuple[str, ...]], dict[str, float]],
) -> list[dict[str, Any]]:
    """The contrast to the ground truth: ``measure(draw)`` for ``n`` seeded draws of
    :func:`random_draws`, each record ``{"units": [...], **measure(draw)}``."""
    draws = random_draws(units, n, n_heads=n_heads, d_mlp=d_mlp, exclude=exclude, rng=random.Random(seed))
    return [{"units": list(draw), **measure(draw)} for draw in draws]


# -- evaluation ----------------------------------------------------------------------------
@torch.no_grad()
def greedy_decode(
    model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int
) -> list[list[int]]:
    """Greedy continuation of each prompt (token ids), up to and excluding eos.

    Prompts of equal length are batched without padding and without a KV cache, which is
    what ``model.generate(ids, do_sample=False)`` computes, minus float noise."""
    out: list[list[int]] = [[] for _ in prompts]
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    for idxs in groups.values():
        ids = torch.tensor([list(prompts[i]) for i in idxs])
        done = torch.zeros(len(idxs), dtype=torch.bool)
        for _ in range(max_new_tokens):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1)  # (B,)
            for row, i in enumerate(idxs):
                if not done[row] and int(nxt[row]) != eos_id:
                    out[i].append(int(nxt[row]))
            done |= nxt == eos_id
            if bool(done.all()):
                break
            ids = torch.cat([ids, nxt[:, None]], dim=1)
    return out


def final_loss(losses: Sequence[float]) -> float:
    """The loss at the end of a run: the mean of the last 5% of steps (1 to 20 steps),
    which smooths batch noise without reaching back into the start of a short run."""
    window = max(1, min(20, len(losses) // 20))
    return sum(losses[-window:]) / window


# -- writing a zoo folder ------------------------------------------------------------------
def write_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file in ``folder`` except checksums.json, written to checksums.json."""
    sums = {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUMS}
    (folder / CHECKSUMS).write_text(json.dumps(sums, indent=2) + "\n")
    return sums


def save_entry(
    out_dir: Path,
    model: Any,
    tokenizer: Any,
    *,
    card: str,
    ground_truth: dict[str, Any],
    metrics: dict[str, Any],
    scenario: dict[str, Any],
) -> Path:
    """Write a zoo folder atomically: weights, config, tokenizer, card.md, the JSON
    records and checksums.json (built in a temporary sibling, then swapped in)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        hf_logging.disable_progress_bar()
        try:
            model.save_pretrained(tmp)
        finally:
            hf_logging.enable_progress_bar()
        if tokenizer is not None:  # image entries have none
            tokenizer.save_pretrained(tmp)
        (tmp / "card.md").write_text(card)
        for name, record in (("ground_truth", ground_truth), ("metrics", metrics), ("scenario", scenario)):
            (tmp / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
        write_checksums(tmp)
        # Package data: readable by everyone (mkdtemp makes private folders).
        tmp.chmod(0o755)
        for file in tmp.iterdir():
            file.chmod(0o644)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


def shipped_dir(name: str) -> Path:
    """The package folder of zoo entry ``name``."""
    return Path(__file__).resolve().parent.parent / name
