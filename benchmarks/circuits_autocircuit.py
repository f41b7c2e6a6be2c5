"""auto-circuit's edge attribution beside our discovery on zoo:induction-2l (issue 17).

Same process, same prompts (``circuits_discovery.induction_pairs(1, 32)``), same targets
(the clean top token at the last position) and foils (the corrupted top token): induction-2l
is ported to a TransformerLens ``HookedTransformer`` with TransformerLens's GPT-2 weight
conversion (logits checked against the Hugging Face model), made patchable by auto-circuit
(factorized edges, last-position output, separate q/k/v inputs) and scored by:

- ``EAP`` — auto-circuit's registry entry of that name (logit-diff gradient at the clean
  input, mask 0);
- ``EAP (Answer Logprob)`` — its registry entry with our metric (log-prob of the target);
- ``IEG logprob, 5 samples`` — its mask-gradient integrated over the edge mask, 6 points
  α = 0, 0.2, …, 1.

Ours: ``discover`` (EAP-IG 5 steps, MLPs as nodes: rank + faithfulness curve + pruning +
exact node patching) and its ranking stage alone (``prepare_task`` + ``edge_attribution``,
the stage that matches auto-circuit's) three ways: plain EAP, EAP-IG over the edge mask
(5 midpoints) and EAP-IG over the input embeddings (discover's default). A port check runs
plain EAP with the log-prob metric on both sides and compares the head → logits edges. Head AUROC: a head's score is Σ |edge score| over its
outgoing edges (auto-circuit: every edge leaving ``A{layer}.{head}``; ours: the ``eap-ig``
node ranking), positives = the zoo ground truth units; ``discover`` also reports the exact
node-patching ranking.

Needs its own venv (auto-circuit 1.0.1 imports ``HookedTransformer`` and
``HookedTransformerKeyValueCache``, which TransformerLens 4 removed)::

    python3 -m venv /tmp/acvenv && /tmp/acvenv/bin/pip install torch==2.13.0
    /tmp/acvenv/bin/pip install -c <(echo torch==2.13.0) -c requirements/constraints.txt -e ".[bench]" auto-circuit
    /tmp/acvenv/bin/pip install -c <(echo torch==2.13.0) transformer-lens==3.9.0 transformers==5.24.0 \\
        numpy==2.4.6 huggingface_hub==2.4.0 pandas==3.1.1
    OMP_NUM_THREADS=1 /tmp/acvenv/bin/python benchmarks/circuits_autocircuit.py [--rounds 3]

TransformerLens 3.9 renamed the key-value cache class; the alias below (the only shim) maps
the old name onto it (auto-circuit only uses it when prompts share a prefix, not here).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types
from collections.abc import Callable
from functools import partial
from importlib.metadata import version
from typing import Any

import torch
import transformer_lens
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

transformer_lens.HookedTransformerKeyValueCache = TransformerLensKeyValueCache  # type: ignore[attr-defined]
_shim = types.ModuleType("transformer_lens.past_key_value_caching")
_shim.HookedTransformerKeyValueCache = TransformerLensKeyValueCache  # type: ignore[attr-defined]
sys.modules["transformer_lens.past_key_value_caching"] = _shim

from auto_circuit.data import PromptDataLoader, PromptDataset  # noqa: E402
from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores  # noqa: E402
from auto_circuit.prune_algos.prune_algos import (  # noqa: E402
    LOGIT_DIFF_GRAD_PRUNE_ALGO,
    LOGPROB_GRAD_PRUNE_ALGO,
)
from auto_circuit.utils.graph_utils import patchable_model  # noqa: E402
from circuits_discovery import head_auroc, induction_pairs  # noqa: E402
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402
from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights  # noqa: E402

from _common import commit, machine, markdown_table, median, write_results  # noqa: E402
from model_forensics.circuits import discover  # noqa: E402
from model_forensics.circuits.edges import OUTPUT, Nodes  # noqa: E402
from model_forensics.circuits.graph import edge_attribution, prepare_task  # noqa: E402
from model_forensics.circuits.subject import subject_of  # noqa: E402
from model_forensics.models import zoo  # noqa: E402


def hooked(hf: Any) -> HookedTransformer:
    """induction-2l as a HookedTransformer with the same weights (no folding or centring)."""
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer,
        d_model=c.n_embd,
        n_ctx=c.n_positions,
        d_head=c.n_embd // c.n_head,
        n_heads=c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd,
        d_vocab=c.vocab_size,
        act_fn=c.activation_function,
        eps=c.layer_norm_epsilon,
        normalization_type="LN",
        positional_embedding_type="standard",
        device="cpu",
    )
    tl = HookedTransformer(cfg)
    tl.load_and_process_state_dict(
        convert_gpt2_weights(hf, cfg),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return tl.eval()


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    lm = zoo.load("induction-2l")
    gt = set(zoo.entry("induction-2l").ground_truth["units"])
    prompts, corrupted = induction_pairs(1, 32)
    subject = subject_of(lm.model, lm.tokenizer)
    clean = torch.cat([subject.encode(p)["input_ids"] for p in prompts])
    corrupt = torch.cat([subject.encode(p)["input_ids"] for p in corrupted])

    tl = hooked(lm.model)
    with torch.no_grad():
        hf_clean, hf_corrupt = lm.model(clean).logits, lm.model(corrupt).logits
        logit_gap = max(float((tl(clean) - hf_clean).abs().max()), float((tl(corrupt) - hf_corrupt).abs().max()))
    if logit_gap > 1e-4:
        raise SystemExit(f"the TransformerLens port differs from the HF model by {logit_gap:.2e} in the logits")
    answers, wrong = hf_clean[:, -1].argmax(-1), hf_corrupt[:, -1].argmax(-1)
    tl.set_use_attn_result(True)
    tl.set_use_split_qkv_input(True)
    tl.set_use_hook_mlp_in(True)
    pm = patchable_model(tl, factorized=True, slice_output="last_seq", separate_qkv=True, device=torch.device("cpu"))
    dataset = PromptDataset(clean, corrupt, [a[None] for a in answers], [w[None] for w in wrong])
    loader = PromptDataLoader(dataset, seq_len=None, diverge_idx=0, batch_size=len(prompts), shuffle=False)

    def ac(fn: Callable[..., Any]) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            scores = fn(pm, loader, None)
            heads: dict[str, float] = {}
            for e in pm.edges:
                if e.src.head_idx is not None:  # src names are "A{block}.{head}"
                    block = e.src.name[1:].split(".")[0]
                    name = f"blocks.{block}.attn.head.{e.src.head_idx}"
                    value = abs(float(scores[e.dest.module_name][e.patch_idx]))
                    heads[name] = heads.get(name, 0.0) + value
            return heads

        return run

    ieg = partial(
        mask_gradient_prune_scores, grad_function="logprob", answer_function="avg_val", integrated_grad_samples=5
    )

    def ours_full() -> dict[str, Any]:
        c = discover(lm.model, lm.tokenizer, prompts, corrupted=corrupted)
        return {"eap-ig": dict(c.node_ranking("eap-ig")), "patching": dict(c.node_ranking()), "edges": len(c.edges)}

    nodes = Nodes.of(subject.adapter.n_layers, int(subject.adapter.n_heads or 0), True)

    def ours_scores(steps: int, path: str) -> torch.Tensor:
        task = prepare_task(subject, nodes, prompts, corrupted, "logprob", None, None)
        return edge_attribution(task, steps, path)

    def ours_rank(steps: int, path: str) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            scores = ours_scores(steps, path)
            heads: dict[str, float] = {}
            for u, r in nodes.edges:
                heads[nodes.upstream[u]] = heads.get(nodes.upstream[u], 0.0) + abs(float(scores[u, r]))
            return heads

        return run

    conditions: dict[str, Callable[[], Any]] = {
        "auto-circuit EAP (logit diff, mask 0)": ac(LOGIT_DIFF_GRAD_PRUNE_ALGO.func),
        "auto-circuit EAP (answer logprob, mask 0)": ac(LOGPROB_GRAD_PRUNE_ALGO.func),
        "auto-circuit IEG (answer logprob, 5 samples)": ac(ieg),
        "ours: EAP ranking stage only (gradient at the clean input)": ours_rank(0, "activations"),
        "ours: EAP-IG 5 steps ranking stage only (edge mask path)": ours_rank(5, "activations"),
        "ours: EAP-IG 5 steps ranking stage only (embeddings path, discover's default)": ours_rank(5, "embeddings"),
        "ours: discover (EAP-IG 5 steps, curve, pruning, node patching)": ours_full,
    }
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in conditions}
    outputs: dict[str, Any] = {}
    for fn in conditions.values():  # warm-up round, not timed
        fn()
    for _ in range(args.rounds):
        for name, fn in conditions.items():
            out, wall, cpu = timed(fn)
            samples[name].append((wall, cpu))
            outputs[name] = out
    full = outputs["ours: discover (EAP-IG 5 steps, curve, pruning, node patching)"]
    rows, data = [], {"conditions": {}}
    for name in conditions:
        out = outputs[name]
        entry: dict[str, Any] = {
            "wall_s": median([w for w, _ in samples[name]]),
            "cpu_s": median([p for _, p in samples[name]]),
            "wall_samples": [w for w, _ in samples[name]],
            "cpu_samples": [p for _, p in samples[name]],
        }
        if name.startswith("ours: discover"):
            entry["head_auroc"] = head_auroc(list(out["eap-ig"].items()), gt)
            entry["head_auroc_patching"] = head_auroc(list(out["patching"].items()), gt)
            entry["circuit_edges"] = out["edges"]
            entry["head_scores"] = {k: v for k, v in out["eap-ig"].items() if ".attn.head." in k}
            auroc = f"{entry['head_auroc']:.3f} (node patching {entry['head_auroc_patching']:.3f})"
        else:
            entry["head_auroc"] = head_auroc(list(out.items()), gt)
            entry["head_scores"] = {k: v for k, v in out.items() if ".attn.head." in k}
            auroc = f"{entry['head_auroc']:.3f}"
        data["conditions"][name] = entry
        rows.append([name, f"{entry['wall_s']:.3f}", f"{entry['cpu_s']:.3f}", auroc])
    rank_sums = outputs["ours: EAP-IG 5 steps ranking stage only (embeddings path, discover's default)"]
    gap = max(abs(rank_sums[k] - v) for k, v in full["eap-ig"].items() if ".attn.head." in k)
    ac_eap = LOGPROB_GRAD_PRUNE_ALGO.func(pm, loader, None)
    ours_eap = ours_scores(0, "activations")
    out_r = nodes.receivers.index(OUTPUT)
    pairs = []  # (ours, auto-circuit) for every head -> logits edge
    for e in pm.edges:
        if e.src.head_idx is not None and e.dest.name == "Resid End":
            u = nodes.upstream.index(f"blocks.{e.src.name[1:].split('.')[0]}.attn.head.{e.src.head_idx}")
            pairs.append((float(ours_eap[u, out_r]), float(ac_eap[e.dest.module_name][e.patch_idx])))
    scale = max(abs(a) for a, _ in pairs)
    output_edge_gap = max(abs(abs(a) - abs(b)) for a, b in pairs) / scale
    label = commit()
    versions = {
        p: version(p) for p in ("auto-circuit", "transformer-lens", "transformers", "torch", "numpy", "beartype")
    }
    data.update(
        commit=label,
        load_average=os.getloadavg(),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        threads=torch.get_num_threads(),
        machine=machine(),
        versions=versions,
        prompts=len(prompts),
        tokens=int(clean.shape[1]),
        tl_port_max_logit_gap=logit_gap,
        auto_circuit_edges=len(pm.edges),
        our_edges=len(nodes.edges),
        ranking_stage_vs_discover_head_sum_gap=gap,
        eap_head_to_logits_edges={"pairs_ours_autocircuit": pairs, "max_rel_gap_of_abs": output_edge_gap},
        ground_truth=sorted(gt),
    )
    headers = ["condition", "wall s (median)", "CPU s (median)", "head AUROC"]
    table = "\n".join(
        [
            "# auto-circuit beside our discovery on induction-2l",
            "",
            f"commit {label}; load average "
            f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs shared with another "
            f"benchmark (CPU time is the steadier figure); torch threads {torch.get_num_threads()}; medians of "
            f"{args.rounds} interleaved rounds after one warm-up round; "
            + ", ".join(f"{k} {v}" for k, v in versions.items())
            + ".",
            "",
            markdown_table(headers, rows),
            "",
            f"{len(prompts)} induction prompts of {clean.shape[1]} tokens (`circuits_discovery.induction_pairs(1, 32)`), "
            "target = clean top token, foil = corrupted top token, last position. TransformerLens port: max |logit "
            f"difference| vs the HF model {logit_gap:.1e}; auto-circuit graph: {len(pm.edges)} factorized edges, "
            f"ours {len(nodes.edges)} "
            "(q/k/v inputs separate; ours has one receiver per head, reading its q/k/v input once). Same method on both "
            "sides as a check of the port: plain EAP with the log-prob metric on the 8 head → logits edges, max "
            f"| |ours| − |auto-circuit| | / max |ours| = {output_edge_gap:.1e}.",
            "",
            "What is compared: auto-circuit's edge scores summed per source head (|score| over every outgoing "
            "edge) vs our EAP-IG node sums (Σ |EAP-IG| over each head's outgoing edges, the `eap-ig` node "
            "ranking; the ranking-only rows sum the same way); 8 heads, 3 of them positive, so one AUROC step is "
            "1/15 = 0.067; positives = the zoo ground truth units "
            f"({', '.join(sorted(gt))}). auto-circuit's times are the edge-scoring call only (the port and "
            "`patchable_model` are built once, outside the timing); ours 'ranking stage only' is the matching "
            "stage (tokenize, capture clean/corrupted activations, EAP-IG), while `discover` also runs the "
            "exact faithfulness curve, pruning and per-node patching. auto-circuit's IEG integrates over the "
            "edge mask (6 points, α = 0 … 1), like our edge-mask path (5 midpoints); discover's default path "
            "interpolates the input embeddings (5 midpoints). auto-circuit prints a tqdm bar per call (inside "
            "its timing).",
        ]
    )
    write_results("circuits_autocircuit", data, table)
    print(table)


if __name__ == "__main__":
    main()
