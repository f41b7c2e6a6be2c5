"""All-heads ablation sweep on SmolLM2, side by side in one process.

Zero every attention head of SmolLM2-135M-Instruct (30 blocks × 9 query heads = 270 runs)
on one prompt and read the next-token logits, five ways:
  plain torch hooks, one run at a time (a forward pre-hook on o_proj zeroes the head's slice;
    ``logits_to_keep=1``, the last position only, as the predicate reads)
  nnsight 0.8.1, one trace per run          (o_proj.input[..., head slice] = 0)
  TransformerLens 4.3.0 TransformerBridge, one run_with_hooks per run (hook_z[:, :, head] = 0)
  session.sweep without prefix sharing (batching alone)
  session.sweep (batching + shared clean prefix + last-position logits)

The machine may be shared, so the serial peers are interleaved block by block (each peer
runs its 9 ablations of block l, then the next peer), and each peer's time is the sum of
its turns; ``session.sweep`` runs three times (before, halfway through and after the
serial peers, each on a freshly loaded session, so each time includes capturing the clean
prefix) and the table gives the median. The table gives wall time, the speed-up against
the fastest serial peer, and the max |Δ| of the 270 × vocab logits against plain hooks
(and whether they are bit-identical). A peer that cannot be installed or loaded offline
gets a row saying why.

Run: .venv/bin/python benchmarks/sweep.py [--tokens 64]
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from _common import commit, machine, markdown_table, tl_zero_head, write_results
from model_forensics import Intervention, SandboxReplayer, token_is
from model_forensics.models import load
from model_forensics.recorder import RecorderHooks
from model_forensics.recorder.session import encode_prompt

PROMPT = (
    "You are a helpful assistant. Summarise this email for the user: 'Hi team, the quarterly report "
    "is due on Friday; please send your numbers to Dana by Thursday noon.'"
)
Layer = Callable[[int], torch.Tensor]  # block l → logits (n_heads, vocab) of its ablations


def work_model(cfg: Any, tokens: int) -> dict[str, float]:
    """Matmul work (GMAC, multiply-adds) of the 270-head ablation, per way of computing it.

    Per token and block: q/k/v/o projections d·(2d + 2·d_kv), MLP 3·d·d_mlp, and eager
    attention's scores and weighted sum 2·T·d (all T keys, masked); unembedding d·V per
    position read. For a head in block L an EXACT method must recompute: block L's MLP at all
    T positions plus the head's share of o_proj (its q/k/v and pattern are clean), blocks
    L+1…n−2 whole at all positions, block n−1's k/v at all positions (its keys see every
    changed position) and the rest of it at the last position only, and the unembedding at
    the last position; a head in block n−1 needs its o_proj share, the MLP and the
    unembedding at the last position only. Everything else equals the clean run, computed
    once. Elementwise ops (norms, rotary, SiLU, softmax) are left out: they are not matmuls.
    """
    d, heads, n = cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers
    d_kv = d // heads * cfg.num_key_value_heads
    d_mlp, vocab, t = cfg.intermediate_size, cfg.vocab_size, tokens
    block = d * (2 * d + 2 * d_kv) + 3 * d * d_mlp + 2 * t * d  # per token
    head_share, mlp, unembed = d // heads * d, 3 * d * d_mlp, d * vocab
    clean = n * t * block + unembed  # one run with logits at the last position
    last_block_at_last = 2 * d * d + 2 * t * d + mlp

    def exact(layer: int) -> int:
        if layer == n - 1:
            return head_share + mlp + unembed
        return t * (head_share + mlp) + (n - 2 - layer) * t * block + t * 2 * d * d_kv + last_block_at_last + unembed

    runs = [layer for layer in range(n) for _ in range(heads)]
    g = 1e-9
    return {
        "serial_fair": g * len(runs) * clean,
        "batching_only": g * len(runs) * (clean + (t - 1) * unembed),  # full logits at every position
        # session.sweep: blocks ≥ L at all positions per row, unembedding at the last position on
        # ≥ 64 rows per batch, plus the clean capture (full logits) and its one-row check
        "session_sweep": g * (sum((n - layer) * t * block + unembed for layer in runs) + 2 * clean + t * unembed),
        # one row per batch: its last-position scores are still computed on 64 (padded) rows
        "no_batching": g * (sum((n - layer) * t * block + 64 * unembed for layer in runs) + 2 * clean + t * unembed),
        "exact_minimum": g * (sum(exact(layer) for layer in runs) + clean),
    }


def gemm_peak(rows: int = 4096, repeats: int = 5) -> float:
    """GFLOP/s of one large fp32 linear (rows × d 576 → 1536), the CPU's matmul ceiling here."""
    x, w = torch.randn(rows, 576), torch.randn(1536, 576)
    torch.nn.functional.linear(x, w)
    times = []
    for _ in range(repeats):
        cpu = time.process_time()
        torch.nn.functional.linear(x, w)
        times.append(time.process_time() - cpu)
    return 2 * rows * 576 * 1536 / statistics.median(times) / 1e9


def _same_weights_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree (peers may edit it) whose weights ARE the original tensors."""
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64, help="prompt length cap (chat template included)")
    parser.add_argument(
        "--peers", default="plain,nnsight,tl", help="serial peers to run (comma list of plain, nnsight, tl)"
    )
    parser.add_argument("--report-from", type=Path, help="rebuild the table from saved measurements")
    args = parser.parse_args()
    if args.report_from is not None:
        _report(torch.load(args.report_from, weights_only=False))
        return
    torch.manual_seed(0)
    loaded = load("smollm2", progress=False)
    model, tok = loaded.model, loaded.tokenizer
    # load() maps the cached safetensors file; copy the weights into ordinary memory so every
    # condition reads weights from the same kind of memory (the peers share these very tensors).
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    cfg = model.config
    n_layers, n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
    d_head = cfg.hidden_size // n_heads
    batch = encode_prompt(loaded, PROMPT)
    batch = {k: v[:, : args.tokens] for k, v in batch.items()}
    n_tokens = int(batch["input_ids"].shape[1])
    runs = n_layers * n_heads
    print(f"SmolLM2-135M-Instruct, {n_tokens} prompt tokens, {runs} head ablations, {torch.get_num_threads()} threads")

    # -- serial peers: each returns a function running the ablations of one block ----------
    def plain_hooks() -> Layer:
        def run(layer: int) -> torch.Tensor:
            out = []
            for h in range(n_heads):

                def zero(module: torch.nn.Module, inputs: tuple[Any, ...], h: int = h) -> tuple[Any, ...]:
                    x = inputs[0].clone()
                    x[..., h * d_head : (h + 1) * d_head] = 0
                    return (x,)

                handle = model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(zero)
                try:
                    with torch.no_grad():
                        # its best ordinary usage: logits at the one position the predicate reads
                        out.append(model(**batch, logits_to_keep=1).logits[0, -1].clone())
                finally:
                    handle.remove()
            return torch.stack(out)

        return run

    def nnsight_serial() -> Layer:
        from nnsight.modeling.transformers import TransformersModel

        wrapped = TransformersModel(_same_weights_copy(model), tokenizer=tok)

        def run(layer: int) -> torch.Tensor:
            out = []
            for h in range(n_heads):
                with torch.no_grad(), wrapped.trace(batch["input_ids"]):
                    wrapped.model.layers[layer].self_attn.o_proj.input[:, :, h * d_head : (h + 1) * d_head] = 0
                    logits = wrapped.lm_head.output[0, -1].save()
                out.append(logits.detach().clone())
            return torch.stack(out)

        return run

    def transformer_lens_serial() -> Layer:
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(
            str(cfg._name_or_path), hf_model=_same_weights_copy(model), tokenizer=tok
        )

        def run(layer: int) -> torch.Tensor:
            out = []
            for h in range(n_heads):
                with torch.no_grad():
                    logits = bridge.run_with_hooks(
                        batch["input_ids"], fwd_hooks=[(f"blocks.{layer}.attn.hook_z", tl_zero_head(h, d_head))]
                    )
                out.append(logits[0, -1].detach().clone())
            return torch.stack(out)

        return run

    serial: dict[str, Callable[[], Layer]] = {
        "plain torch hooks": plain_hooks,
        "nnsight 0.8.1": nnsight_serial,
        "TransformerLens 4.3.0 (TransformerBridge)": transformer_lens_serial,
    }
    chosen = {
        "plain": "plain torch hooks",
        "nnsight": "nnsight 0.8.1",
        "tl": "TransformerLens 4.3.0 (TransformerBridge)",
    }
    serial = {chosen[k]: serial[chosen[k]] for k in args.peers.split(",")}
    if "plain torch hooks" not in serial:
        parser.error("--peers must include plain (the reference for the logits comparison)")
    peak_before = gemm_peak()
    rows: dict[str, dict[str, Any]] = {}
    peers: dict[str, Layer] = {}
    for name, setup in serial.items():
        try:
            peers[name] = setup()
            rows[name] = {"kind": "serial", "seconds": 0.0, "cpu_seconds": 0.0, "forward_passes": runs}
        except Exception as exc:  # a peer that does not install or load offline gets a row saying why
            rows[name] = {"kind": "serial", "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
            traceback.print_exc()

    # -- session.sweep ---------------------------------------------------------------------
    with tempfile.TemporaryDirectory() as tmp:
        with torch.no_grad():
            predicted = int(model(**batch).logits[0, -1].argmax())
        bundle = _record(loaded, tmp, batch, predicted)
        sets = [
            [Intervention(f"blocks.{layer}.attn.head.{h}", "zero")] for layer in range(n_layers) for h in range(n_heads)
        ]
        # name → (share_prefix, max_batch_size override): separates batching from prefix sharing
        sweeps: dict[str, tuple[bool, int | None]] = {
            "session.sweep, batching only (share_prefix=False)": (False, None),
            "session.sweep, no batching (max_batch_size=1; prefix sharing + last position)": (True, 1),
            "session.sweep": (True, None),
        }
        for name in sweeps:
            rows[name] = {"kind": "batched", "times": [], "cpu_times": []}
        logits: dict[str, torch.Tensor] = {}

        def sweep(name: str) -> None:
            share, batch_size = sweeps[name]
            options = {} if batch_size is None else {"max_batch_size": batch_size}
            session = SandboxReplayer(**options).load_bundle(bundle, model=loaded)
            load_before = os.getloadavg()[0]
            start, cpu = time.perf_counter(), time.process_time()
            rows_before = session.counter.rows
            result = session.sweep(sets, share_prefix=share)
            model_rows = session.counter.rows - rows_before
            seconds = time.perf_counter() - start
            row = rows[name]
            row["times"].append(seconds)
            row["cpu_times"].append(time.process_time() - cpu)
            row["loadavg_1min"] = [*row.get("loadavg_1min", []), load_before]
            row.update(
                forward_passes=result.forward_passes,
                batches=result.batches,
                model_rows=model_rows,
                flips=sum(bool(r.flipped) for r in result),
            )
            logits[name] = torch.stack([r.logits for r in result])
            print(f"  {name}: {seconds:.1f} s ({result.forward_passes} forward passes)", flush=True)
            session.close()

        print("running: session.sweep (1/3) …", flush=True)
        sweep("session.sweep")
        outputs: dict[str, list[torch.Tensor]] = {name: [] for name in peers}
        loads: list[float] = [os.getloadavg()[0]]
        for layer in range(n_layers):
            for name, run in peers.items():
                start, cpu = time.perf_counter(), time.process_time()
                outputs[name].append(run(layer))
                rows[name]["seconds"] += time.perf_counter() - start
                rows[name]["cpu_seconds"] += time.process_time() - cpu
            loads.append(os.getloadavg()[0])
            print(f"block {layer}: " + ", ".join(f"{n} {rows[n]['seconds']:.0f} s" for n in peers), flush=True)
            if layer == n_layers // 2:
                print("running: session.sweep (2/3) and batching only …", flush=True)
                sweep("session.sweep")
                sweep("session.sweep, batching only (share_prefix=False)")
                sweep("session.sweep, no batching (max_batch_size=1; prefix sharing + last position)")
        print("running: session.sweep (3/3) …", flush=True)
        sweep("session.sweep")
    for name in peers:
        logits[name] = torch.cat(outputs[name])
    for name in sweeps:
        rows[name]["seconds"] = statistics.median(rows[name]["times"])
        rows[name]["cpu_seconds"] = statistics.median(rows[name]["cpu_times"])

    state = {
        "rows": rows,
        "logits": logits,
        "loads": loads,
        "n_tokens": n_tokens,
        "runs": runs,
        "n_layers": n_layers,
        "peak": max(peak_before, gemm_peak()),
        "work": work_model(cfg, n_tokens),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    # the measurements, so the table can be rebuilt without rerunning them (--report-from)
    saved = Path(tempfile.gettempdir()) / "sweep_benchmark_state.pt"
    torch.save(state, saved)
    print(f"measurements saved to {saved}", flush=True)
    _report(state)


def _report(state: dict[str, Any]) -> None:
    """The table, caption and JSON of the measurements ``main`` took."""
    rows, logits, loads, peak, work = state["rows"], state["logits"], state["loads"], state["peak"], state["work"]
    n_tokens, runs, n_layers = state["n_tokens"], state["runs"], state["n_layers"]
    work_of = {
        "session.sweep, batching only (share_prefix=False)": work["batching_only"],
        "session.sweep, no batching (max_batch_size=1; prefix sharing + last position)": work["no_batching"],
        "session.sweep": work["session_sweep"],
    }
    reference = logits["plain torch hooks"]
    done = [r for r in rows.values() if r["kind"] == "serial" and "seconds" in r]
    fastest, fastest_cpu = min(r["seconds"] for r in done), min(r["cpu_seconds"] for r in done)
    table_rows = []
    for name, row in rows.items():
        if "error" in row:
            table_rows.append([name, "not run", "–", "–", "–", "–", "–", "–", f"could not run offline: {row['error']}"])
            continue
        diff = float((logits[name] - reference).abs().max())
        identical = bool(torch.equal(logits[name], reference))
        gmac = work_of.get(name, work["serial_fair"])
        row.update(
            matmul_gmac=gmac,
            gflops_per_cpu_second=2 * gmac / row["cpu_seconds"],
            speedup_vs_fastest_serial=fastest / row["seconds"],
            cpu_speedup_vs_fastest_serial=fastest_cpu / row["cpu_seconds"],
            max_abs_diff=diff,
            bit_identical=identical,
        )
        if row["kind"] == "batched":
            times = ", ".join(f"{t:.0f}" for t in row["times"])
            note = (
                f"{row['forward_passes']} forward passes ({row['model_rows']} model rows) in {row['batches']} "
                f"batches; median of runs ({times} s)"
            )
        else:
            note = f"{runs} forward passes ({runs} model rows)"
        shown = f"{diff:.2g}" + (" (bit-identical)" if identical else "")
        wall, cpu = row["seconds"], row["cpu_seconds"]
        table_rows.append(
            [
                name,
                f"{wall:.1f}",
                f"{fastest / wall:.2f}×",
                f"{cpu:.1f}",
                f"{fastest_cpu / cpu:.2f}×",
                f"{gmac:.0f}",
                f"{2 * gmac / cpu:.0f}",
                shown,
                note,
            ]
        )
    headers = [
        "method",
        "wall time (s)",
        "speed-up vs fastest serial peer (wall)",
        "CPU time (s)",
        "speed-up vs fastest serial peer (CPU)",
        "matmul work (GMAC)",
        "GFLOP/s (work ÷ CPU time)",
        "max |Δ logits| vs plain hooks",
        "notes",
    ]
    table = markdown_table(headers, table_rows)
    info = machine()
    context = (
        f"SmolLM2-135M-Instruct (fp32, eager attention), {n_tokens} prompt tokens, all {runs} attention heads "
        f"zeroed one at a time, next-token logits; CPU, {info['threads']} threads, torch {info['torch']}, "
        "default replay config (max_batch_size 64, memory_budget_mb 2048). Serial peers interleaved block by "
        f"block (peers run: {', '.join(n for n, r in rows.items() if r['kind'] == 'serial')}; --peers picks "
        "them); session.sweep timed three times on fresh sessions (median). Heads whose ablation flips the "
        f"prediction: {rows['session.sweep'].get('flips')}. 1-min load average during the run: "
        f"{min(loads):.1f}–{max(loads):.1f} on {os.cpu_count()} CPUs (the machine is shared with other jobs); CPU "
        "time (process time, both threads) is less sensitive to other jobs than wall time. Peak RSS of the "
        f"process (all conditions): {state['peak_rss_mb']:.0f} MB. "
        f"Commit {commit()}."
    )
    serial_rate = 2 * work["serial_fair"] / fastest_cpu
    bound = work["serial_fair"] / work["exact_minimum"]
    context += (
        "\n\n**The bound for exact methods.** Matmul work (multiply-adds, `work_model` in this file): the fair "
        f"serial peer computes {n_layers} blocks at {n_tokens} positions and the unembedding at the last one per "
        f"run, {work['serial_fair']:.0f} GMAC for the {runs} runs. An exact method must recompute, for a head in "
        "block L, block L's MLP at all positions plus the head's share of o_proj (q/k/v and the pattern of "
        f"block L are clean), blocks L+1…{n_layers - 2} whole at all positions, block {n_layers - 1}'s k/v at all "
        "positions and the rest of it at the last position, and the unembedding at the last position (a head in "
        f"the last block: o_proj share, MLP and unembedding at the last position); with one clean pass that is "
        f"{work['exact_minimum']:.0f} GMAC, so no exact method does less than 1/{bound:.2f} of the peer's work: "
        f"**the best exact speed-up in work is {bound:.2f}×** (roughly (n+1)/2 of n blocks per run on average). "
        f"session.sweep does {work['session_sweep']:.0f} GMAC ({work['serial_fair'] / work['session_sweep']:.2f}× "
        "less than the peer; it runs blocks ≥ L whole). A wall-time ratio above the work ratio comes from "
        f"running the same work faster: the fastest serial peer ran at {serial_rate:.0f} GFLOP/s of CPU time "
        f"(64-row GEMMs), one large fp32 GEMM (4096 × 576 → 1536) at {peak:.0f} GFLOP/s on this machine, so even "
        f"an exact method running entirely at that GEMM ceiling would be at most {bound * peak / serial_rate:.1f}× "
        "faster than the peer in CPU time. "
    )
    if bound * peak / serial_rate < 5:
        context += (
            "The 5× target is therefore out of reach of exact methods for this model and prompt on this CPU; it "
            "needs an approximation (a different algorithm, e.g. attribution patching) or fewer runs."
        )
    else:
        context += "5× would need the whole sweep to run at close to that GEMM ceiling."
    print()
    print(table)
    write_results(
        "sweep",
        {
            "machine": info,
            "prompt_tokens": n_tokens,
            "runs": runs,
            "conditions": rows,
            "reference": "plain torch hooks",
            "loadavg_1min_per_block": loads,
            "peak_rss_mb_process": state["peak_rss_mb"],
            "work_gmac": work,
            "exact_work_bound": bound,
            "gemm_peak_gflops": peak,
            "commit": commit(),
        },
        "# All-heads ablation sweep (benchmarks/sweep.py)\n\n" + context + "\n\n" + table,
    )


def _record(loaded: Any, tmp: str, batch: dict[str, torch.Tensor], predicted: int) -> Path:
    """Record the prompt as an incident whose predicate is 'the next token is the recorded one'."""
    text = loaded.tokenizer.decode(batch["input_ids"][0])
    recorder = RecorderHooks(granularity="layer", sketch="fp16")
    with recorder.install_hooks(loaded.model, loaded.tokenizer), torch.no_grad():
        loaded.model(**batch)
        return recorder.create_bundle(Path(tmp) / "incident", predicate=token_is(predicted), extras={"prompt": text})


if __name__ == "__main__":
    main()
