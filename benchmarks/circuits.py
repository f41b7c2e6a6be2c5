"""Circuits on SmolLM2, side by side in one process (issue 17).

1. Head-importance map: the drop in the clean top token's logit at the last position when
   each of SmolLM2-135M-Instruct's 270 attention heads (30 blocks × 9 query heads) is
   zeroed alone, computed
     ours      ``head_importance(model, …)``: one batched sweep (all 270 rows in one pass);
               ``head_importance(session)``: the same through ``session.sweep`` on a
               recorded bundle (batching + shared clean prefix + last-position logits)
     nnsight 0.8.1, one trace per head (``o_proj.input[..., head slice] = 0``) on the same
               model object (nnsight wraps it, it does not copy or convert weights)
     TransformerLens 4.3.0, one ``run_with_hooks`` per head (``hook_z[:, :, head] = 0``):
               its TransformerBridge wraps a deep copy of the model (it inserts wrapper
               modules into the HF module tree, so it may not share ours; the weights are
               the same values, not converted: no LayerNorm folding, compatibility mode off)
   every peer reading only the last position's logits. The serial peers run interleaved
   block by block (each peer runs its 9 heads of block l, then the next peer) and each
   peer's time is the sum of its turns; ours runs before, halfway through and after the
   peers, and the table gives the median. Identical results: max |Δ effect| against
   nnsight over all heads.
2. Integrated gradients: ``token_influence(method="integrated_gradients")`` against
   Captum's ``LayerIntegratedGradients`` on the embed layer, same target (log-probability
   of the clean top token), pad baseline, steps and batch, interleaved rounds (median),
   with the max |Δ score|.

All conditions: fp32, eager attention, ``torch.set_num_threads(--threads)``; wall time and
process CPU time; the 1-minute load average is recorded (the machine may be shared).

Run: .venv/bin/python benchmarks/circuits.py [--tokens 8] [--ig-rounds 3] [--layers 30]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import commit, machine, markdown_table, tl_zero_head, write_results
from model_forensics import RecorderHooks, SandboxReplayer, token_is
from model_forensics.circuits import head_importance, token_influence
from model_forensics.models import load

PROMPT = "The quarterly report is due on Friday, so please send your numbers to Dana by"
Layer = Callable[[int], list[float]]  # block l → the logits of the clean top token with each of its heads zeroed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8, help="prompt length cap (tokens)")
    parser.add_argument("--ig-rounds", type=int, default=3, help="interleaved rounds of the IG comparison")
    parser.add_argument("--ig-steps", type=int, default=16, help="integration steps (both IG implementations)")
    parser.add_argument(
        "--layers", type=int, default=0, help="measure only the first N blocks (0: all; for a smoke run)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every condition")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loaded = load("smollm2", progress=False)
    model, tok = loaded.model, loaded.tokenizer
    with torch.no_grad():  # load() maps the safetensors file; every condition reads ordinary memory
        for p in model.parameters():
            p.data = p.data.clone()
    ids = tok(PROMPT, return_tensors="pt")["input_ids"][:, : args.tokens]
    cfg = model.config
    n_layers = args.layers or cfg.num_hidden_layers
    n_heads, d_head = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    heads = [f"blocks.{layer}.attn.head.{h}" for layer in range(n_layers) for h in range(n_heads)]
    with torch.no_grad():
        clean = model(input_ids=ids).logits[0, -1]
    top = int(clean.argmax())
    print(f"SmolLM2-135M-Instruct, {ids.shape[1]} tokens, {len(heads)} heads, {torch.get_num_threads()} thread(s)")
    heads_part = _heads(loaded, ids, heads, n_layers, n_heads, d_head, top, float(clean[top]))
    ig_part = _ig(loaded, ids, top, args.ig_steps, args.ig_rounds)
    _write(heads_part, ig_part, int(ids.shape[1]), len(heads), args)


def _heads(
    loaded: Any, ids: torch.Tensor, heads: list[str], n_layers: int, n_heads: int, d_head: int, top: int, clean: float
) -> dict[str, Any]:
    model, tok = loaded.model, loaded.tokenizer
    rows: dict[str, dict[str, Any]] = {}
    effects: dict[str, np.ndarray] = {}
    loads: list[float] = [os.getloadavg()[0]]

    def nnsight_serial() -> Layer:
        from nnsight import NNsight

        wrapped = NNsight(model)

        def run(layer: int) -> list[float]:
            out = []
            for h in range(n_heads):
                with torch.no_grad(), wrapped.trace(input_ids=ids):
                    wrapped.model.layers[layer].self_attn.o_proj.input[:, :, h * d_head : (h + 1) * d_head] = 0
                    logit = wrapped.lm_head.output[0, -1, top].save()
                out.append(float(logit))
            return out

        return run

    def transformer_lens_serial() -> Layer:
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(
            str(model.config._name_or_path), hf_model=copy.deepcopy(model), tokenizer=tok
        )

        def run(layer: int) -> list[float]:
            out = []
            for h in range(n_heads):
                with torch.no_grad():
                    logits = bridge.run_with_hooks(
                        ids, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", tl_zero_head(h, d_head))]
                    )
                out.append(float(logits[0, -1, top]))
            return out

        return run

    peers: dict[str, Layer] = {}
    for name, setup in {"nnsight 0.8.1": nnsight_serial, "TransformerLens 4.3.0": transformer_lens_serial}.items():
        try:
            peers[name] = setup()
            rows[name] = {"kind": "serial", "seconds": 0.0, "cpu_seconds": 0.0, "forward_passes": len(heads)}
        except Exception as exc:  # a peer that does not load offline gets a row saying why
            rows[name] = {"kind": "serial", "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
            traceback.print_exc()

    with tempfile.TemporaryDirectory() as tmp:
        bundle = _record(loaded, tmp, ids, top)
        ours: dict[str, Callable[[], Any]] = {
            "ours: head_importance(model), one batch": lambda: head_importance(
                model, tok, ids, kind="zero", metric="logit", target=top, heads=heads, batch_size=len(heads) + 1
            ),
            "ours: head_importance(session), session.sweep": lambda: _on_session(bundle, loaded, heads, top),
        }
        for name in ours:
            rows[name] = {"kind": "batched", "times": [], "cpu_times": []}

        def measure_ours() -> None:
            for name, fn in ours.items():
                start, cpu = time.perf_counter(), time.process_time()
                result = fn()
                rows[name]["times"].append(time.perf_counter() - start)
                rows[name]["cpu_times"].append(time.process_time() - cpu)
                rows[name]["forward_passes"] = result.forward_passes
                effects[name] = np.array([result.effect(h) for h in heads])
                print(f"  {name}: {rows[name]['times'][-1]:.1f} s, {result.forward_passes} passes", flush=True)

        measure_ours()
        values: dict[str, list[float]] = {name: [] for name in peers}
        for layer in range(n_layers):
            for name, run in peers.items():
                start, cpu = time.perf_counter(), time.process_time()
                values[name] += run(layer)
                rows[name]["seconds"] += time.perf_counter() - start
                rows[name]["cpu_seconds"] += time.process_time() - cpu
            loads.append(os.getloadavg()[0])
            print(f"block {layer}: " + ", ".join(f"{n} {rows[n]['seconds']:.0f} s" for n in peers), flush=True)
            if layer == n_layers // 2:
                measure_ours()
        measure_ours()
    for name in peers:
        effects[name] = clean - np.array(values[name])
    for name in ours:
        rows[name]["seconds"] = statistics.median(rows[name]["times"])
        rows[name]["cpu_seconds"] = statistics.median(rows[name]["cpu_times"])
    reference = "nnsight 0.8.1" if "nnsight 0.8.1" in peers else next(iter(ours))
    for name, row in rows.items():
        if name in effects:
            row["max_abs_diff_vs_" + reference] = float(np.abs(effects[name] - effects[reference]).max())
    ranking = np.argsort(-effects[next(iter(ours))])[:3]
    return {
        "rows": rows,
        "reference": reference,
        "loadavg_1min": loads,
        "top_heads": [heads[i] for i in ranking],
        "target_token": tok.convert_ids_to_tokens([top])[0],
    }


def _on_session(bundle: Path, loaded: Any, heads: list[str], top: int) -> Any:
    """head_importance through a freshly opened session (so the time includes its clean prefix)."""
    with SandboxReplayer().load_bundle(bundle, model=loaded) as session:
        return head_importance(session, kind="zero", metric="logit", target=top, heads=heads)


def _record(loaded: Any, tmp: str, ids: torch.Tensor, top: int) -> Path:
    """The prompt recorded as an incident whose predicate is 'the next token is the top one'."""
    recorder = RecorderHooks(granularity="layer", sketch="fp16")
    with recorder.install_hooks(loaded.model, loaded.tokenizer), torch.no_grad():
        loaded.model(input_ids=ids)
        return recorder.create_bundle(Path(tmp) / "incident", predicate=token_is(top))


def _ig(loaded: Any, ids: torch.Tensor, top: int, steps: int, rounds: int) -> dict[str, Any]:
    from captum.attr import LayerIntegratedGradients

    model, tok = loaded.model, loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def f(input_ids: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(model(input_ids=input_ids).logits[:, -1].float(), -1)[:, top]

    lig = LayerIntegratedGradients(f, model.model.embed_tokens)
    scores: dict[str, np.ndarray] = {}

    def captum() -> None:
        attr = lig.attribute(ids, baselines=torch.full_like(ids, pad), n_steps=steps, internal_batch_size=steps)
        scores["Captum 0.9.0 LayerIntegratedGradients"] = attr.sum(-1)[0].detach().double().numpy()

    def ours() -> None:
        inf = token_influence(model, tok, ids, target=top, baseline="pad", n_steps=steps, batch_size=steps)
        scores["ours: token_influence (integrated_gradients)"] = inf.scores

    conditions = {"ours: token_influence (integrated_gradients)": ours, "Captum 0.9.0 LayerIntegratedGradients": captum}
    rows: dict[str, dict[str, Any]] = {name: {"times": [], "cpu_times": []} for name in conditions}
    loads = []
    for fn in conditions.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in conditions.items():
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            rows[name]["times"].append(time.perf_counter() - start)
            rows[name]["cpu_times"].append(time.process_time() - cpu)
        loads.append(os.getloadavg()[0])
    for row in rows.values():
        row["seconds"], row["cpu_seconds"] = statistics.median(row["times"]), statistics.median(row["cpu_times"])
    diff = float(np.abs(scores[next(iter(conditions))] - scores["Captum 0.9.0 LayerIntegratedGradients"]).max())
    print("IG: " + ", ".join(f"{n} {r['seconds']:.2f} s" for n, r in rows.items()) + f", max |Δ| {diff:.2g}")
    return {"rows": rows, "max_abs_diff": diff, "steps": steps, "rounds": rounds, "loadavg_1min": loads}


def _write(heads: dict[str, Any], ig: dict[str, Any], n_tokens: int, n_heads: int, args: argparse.Namespace) -> None:
    rows, reference = heads["rows"], heads["reference"]
    serial = [r for r in rows.values() if r["kind"] == "serial" and "error" not in r]
    fastest = min((r["seconds"] for r in serial), default=float("nan"))
    fastest_cpu = min((r["cpu_seconds"] for r in serial), default=float("nan"))
    table = []
    for name, row in rows.items():
        if "error" in row:
            table.append([name, "not run", "–", "–", "–", "–", f"could not run offline: {row['error']}"])
            continue
        row["speedup_vs_fastest_serial"] = fastest / row["seconds"]
        row["cpu_speedup_vs_fastest_serial"] = fastest_cpu / row["cpu_seconds"]
        if row["kind"] == "batched":
            note = f"{row['forward_passes']} passes; median of 3 runs ({', '.join(f'{t:.1f}' for t in row['times'])} s)"
        else:
            note = f"{row['forward_passes']} passes, 1 run (interleaved block by block)"
        table.append(
            [
                name,
                f"{row['seconds']:.1f}",
                f"{fastest / row['seconds']:.2f}×",
                f"{row['cpu_seconds']:.1f}",
                f"{fastest_cpu / row['cpu_seconds']:.2f}×",
                f"{row['max_abs_diff_vs_' + reference]:.2g}",
                note,
            ]
        )
    head_table = markdown_table(
        [
            "head importance (270 heads)",
            "wall (s)",
            "speed-up vs fastest serial peer (wall)",
            "CPU (s)",
            "speed-up (CPU)",
            f"max |Δ effect| vs {reference}",
            "notes",
        ],
        table,
    )
    ig_rows = [
        [name, f"{r['seconds']:.2f}", f"{r['cpu_seconds']:.2f}", ", ".join(f"{t:.2f}" for t in r["times"])]
        for name, r in ig["rows"].items()
    ]
    ig_table = markdown_table(["integrated gradients", "wall (s, median)", "CPU (s, median)", "rounds (s)"], ig_rows)
    info = machine()
    commit_label = commit()
    context = (
        f"Commit {commit_label}. SmolLM2-135M-Instruct (fp32, eager "
        f"attention), a {n_tokens}-token prompt, {n_heads} heads zeroed one at a time, effect = drop in the logit "
        f"of the clean top token {heads['target_token']!r} at the last position (top heads: "
        f"{', '.join(heads['top_heads'])}). CPU, {info['threads']} torch thread(s) for every condition, torch "
        f"{info['torch']}. The serial peers ran once each (interleaved block by block, {n_heads} passes each; one "
        "round to keep the run near 10 minutes); ours three times (before, halfway, after). 1-min load average "
        f"{min(heads['loadavg_1min']):.1f}–{max(heads['loadavg_1min']):.1f} on {os.cpu_count()} CPUs: the machine "
        "was shared with other jobs, so wall times are inflated alike; CPU time is less sensitive to them. "
        f"TransformerLens wraps a deep copy of the model (same weight values, not converted)."
    )
    ig_context = (
        f"Integrated gradients on the same prompt: {ig['steps']} Gauss–Legendre steps in one batch, pad "
        f"baseline, log-probability of the top token, {ig['rounds']} interleaved rounds after a warm-up (median); "
        f"max |Δ score| ours vs Captum {ig['max_abs_diff']:.2g}; load average "
        f"{min(ig['loadavg_1min']):.1f}–{max(ig['loadavg_1min']):.1f}."
    )
    text = f"# Circuits on SmolLM2 (benchmarks/circuits.py)\n\n{context}\n\n{head_table}\n\n{ig_context}\n\n{ig_table}"
    print()
    print(text)
    write_results(
        "circuits",
        {"commit": commit_label, "machine": info, "args": vars(args), "heads": heads, "ig": ig},
        text,
    )


if __name__ == "__main__":
    main()
