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
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from _common import machine, markdown_table, tl_zero_head, write_results
from model_forensics import Intervention, SandboxReplayer, token_is
from model_forensics.models import load
from model_forensics.recorder import RecorderHooks
from model_forensics.recorder.session import encode_prompt

PROMPT = (
    "You are a helpful assistant. Summarise this email for the user: 'Hi team, the quarterly report "
    "is due on Friday; please send your numbers to Dana by Thursday noon.'"
)
Layer = Callable[[int], torch.Tensor]  # block l → logits (n_heads, vocab) of its ablations


def _same_weights_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree (peers may edit it) whose weights ARE the original tensors."""
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64, help="prompt length cap (chat template included)")
    args = parser.parse_args()
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

    reference = logits["plain torch hooks"]
    done = [r for r in rows.values() if r["kind"] == "serial" and "seconds" in r]
    fastest, fastest_cpu = min(r["seconds"] for r in done), min(r["cpu_seconds"] for r in done)
    table_rows = []
    for name, row in rows.items():
        if "error" in row:
            table_rows.append([name, "not run", "–", "–", "–", "–", f"could not run offline: {row['error']}"])
            continue
        diff = float((logits[name] - reference).abs().max())
        identical = bool(torch.equal(logits[name], reference))
        row.update(
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
            [name, f"{wall:.1f}", f"{fastest / wall:.2f}×", f"{cpu:.1f}", f"{fastest_cpu / cpu:.2f}×", shown, note]
        )
    headers = [
        "method",
        "wall time (s)",
        "speed-up vs fastest serial peer (wall)",
        "CPU time (s)",
        "speed-up vs fastest serial peer (CPU)",
        "max |Δ logits| vs plain hooks",
        "notes",
    ]
    table = markdown_table(headers, table_rows)
    info = machine()
    context = (
        f"SmolLM2-135M-Instruct (fp32, eager attention), {n_tokens} prompt tokens, all {runs} attention heads "
        f"zeroed one at a time, next-token logits; CPU, {info['threads']} threads, torch {info['torch']}, "
        "default replay config (max_batch_size 64, memory_budget_mb 2048). Serial peers interleaved block by "
        "block; session.sweep timed three times on fresh sessions (median). Heads whose ablation flips the "
        f"prediction: {rows['session.sweep'].get('flips')}. 1-min load average during the run: "
        f"{min(loads):.1f}–{max(loads):.1f} on {os.cpu_count()} CPUs (the machine is shared with other jobs); CPU "
        "time (process time, both threads) is less sensitive to other jobs than wall time. Peak RSS of the "
        f"process (all conditions): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB. "
        f"Commit {_commit()} with uncommitted changes."
    )
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
            "peak_rss_mb_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "commit": _commit(),
            "tree": "uncommitted changes present (other helpers editing the checkout)",
        },
        "# All-heads ablation sweep (benchmarks/sweep.py)\n\n" + context + "\n\n" + table,
    )


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _record(loaded: Any, tmp: str, batch: dict[str, torch.Tensor], predicted: int) -> Path:
    """Record the prompt as an incident whose predicate is 'the next token is the recorded one'."""
    text = loaded.tokenizer.decode(batch["input_ids"][0])
    recorder = RecorderHooks(granularity="layer", sketch="fp16")
    with recorder.install_hooks(loaded.model, loaded.tokenizer), torch.no_grad():
        loaded.model(**batch)
        return recorder.create_bundle(Path(tmp) / "incident", predicate=token_is(predicted), extras={"prompt": text})


if __name__ == "__main__":
    main()
