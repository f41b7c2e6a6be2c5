"""Capture overhead on SmolLM2 (128 tokens), side by side in one process.

Conditions, each timed once per round (interleaved), medians over rounds, ratios to the
plain forward of the same round:
  plain forward · plain hooks copying block outputs to fp16 (floor) · recorder at layer
  granularity (fp16 sketch, in memory) · recorder at all sites except attention patterns ·
  recorder at all sites · nnsight 0.8.1 saving the same residual outputs · TransformerLens
  4.x TransformerBridge run_with_cache (residual outputs), where it loads offline.
Then bundle write / read throughput for a full-precision all-site bundle.

Run: .venv/bin/python benchmarks/capture_overhead.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from _common import commit, machine, markdown_table, median, smollm2_prompt, write_results
from model_forensics import Bundle, RecorderHooks

NO_PATTERN = [f"blocks.*.{k}" for k in ("resid_pre", "attn.q", "attn.k", "attn.v", "attn.z", "mlp.post")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    loaded, ids = smollm2_prompt(args.tokens)
    model, tok = loaded.model, loaded.tokenizer
    layers = model.model.layers

    def plain() -> None:
        with torch.no_grad():
            model(input_ids=ids)

    fp16_store: list[torch.Tensor] = []

    def fp16_hooks() -> None:
        fp16_store.clear()
        handles = [
            b.register_forward_hook(lambda m, a, o: fp16_store.append(o.detach().to(torch.float16))) for b in layers
        ]
        try:
            plain()
        finally:
            for h in handles:
                h.remove()

    recorders = {
        "recorder layer (fp16, in memory)": RecorderHooks(granularity="layer", sketch="fp16", max_bundle_size_mb=1e6),
        "recorder all except patterns": RecorderHooks(
            granularity="layer", sites=NO_PATTERN, sketch="fp16", max_bundle_size_mb=1e6
        ),
        "recorder all sites (incl. patterns)": RecorderHooks(granularity="all", sketch="fp16", max_bundle_size_mb=1e6),
    }

    def with_recorder(rec: RecorderHooks) -> Any:
        def run() -> None:
            rec.reset()
            rec.install_hooks(model, tok)
            try:
                plain()
            finally:
                rec.remove_hooks()

        return run

    conditions: dict[str, Any] = {"plain forward": plain, "plain hooks → fp16 (floor)": fp16_hooks}
    conditions.update({name: with_recorder(rec) for name, rec in recorders.items()})
    notes: dict[str, str] = {}
    # Peers get their own module tree (wrapping may edit the model: TransformerBridge swaps
    # modules) but the SAME weight tensors as every other condition, so no condition runs on
    # differently placed memory (before, peers ran on deep copies while ours ran on mmap'd weights).
    peers = {
        "nnsight 0.8.1 (resid outputs)": _nnsight(_same_weights_copy(model), tok, ids, notes),
        "TransformerLens 4.3 bridge run_with_cache": _tlens(_same_weights_copy(model), tok, ids, notes),
    }
    conditions.update({k: v for k, v in peers.items() if v is not None})

    load_before = os.getloadavg()
    times, cpus = _interleaved(conditions, args.repeats)
    load_after = os.getloadavg()
    base, base_cpu = times["plain forward"], cpus["plain forward"]
    rows: list[list[Any]] = []
    data: dict[str, Any] = {
        "machine": machine(),
        "commit": commit(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "tokens": int(ids.shape[1]),
        "repeats": args.repeats,
        "conditions": {},
        "notes": notes,
    }
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, base, strict=True)]
        cpu_ratios = [t / b for t, b in zip(cpus[name], base_cpu, strict=True)]
        # what the condition adds to a forward pass, in CPU ms: steadier across machines than
        # a ratio, whose denominator is the machine's speed that day
        extra = [t - b for t, b in zip(cpus[name], base_cpu, strict=True)]
        data["conditions"][name] = {
            "median_s": median(ts),
            "median_ratio": median(ratios),
            "median_cpu_s": median(cpus[name]),
            "median_cpu_ratio": median(cpu_ratios),
            "median_extra_cpu_s": median(extra),
            "times_s": ts,
            "cpu_s": cpus[name],
        }
        rows.append(
            [
                name,
                f"{median(ts) * 1000:.1f}",
                f"{median(ratios):.3f}×",
                f"{median(cpus[name]) * 1000:.1f}",
                f"{median(cpu_ratios):.3f}×",
                f"{median(extra) * 1000:+.1f}",
            ]
        )
    for name, reason in notes.items():
        rows.append([name, "—", f"not measured: {reason}", "—", "—", "—"])

    write, read = _bundle_throughput(model, tok, ids)
    data["bundle"] = {"write": write, "read": read}
    table = markdown_table(
        [
            "condition",
            "median wall ms",
            "wall ratio to plain (median of per-round ratios)",
            "median CPU ms",
            "CPU ratio to plain",
            "CPU ms added to a forward (median of per-round differences)",
        ],
        rows,
    )
    table += "\n\n" + markdown_table(
        ["full-precision all-site bundle", "MB", "seconds", "MB/s"],
        [
            [
                "first create_bundle of a new recorder (the weights' sha256, taken once per recorder, "
                "provenance, cube, then the write: bundle_io.py times the write alone)",
                f"{write['mb']:.1f}",
                f"{write['s']:.2f}",
                f"{write['mb_per_s']:.0f}",
            ],
            [
                "read (open + verify every digest + decode all sites)",
                f"{read['mb']:.1f}",
                f"{read['s']:.2f}",
                f"{read['mb_per_s']:.0f}",
            ],
        ],
    )
    header = (
        f"SmolLM2-135M, {ids.shape[1]} tokens, {args.repeats} interleaved rounds, {machine()['device']}, "
        f"{torch.get_num_threads()} threads; every condition on the same weight tensors. Commit {data['commit']}. "
        f"Load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (a "
        "2-core machine shared with other jobs: wall ratios are noisy, CPU time is the steadier figure).\n\n"
    )
    print(header + table)
    write_results("capture_overhead", data, header + table)


def _same_weights_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree whose parameters and buffers ARE the original tensors."""
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    twin = copy.deepcopy(model, memo)
    assert all(a is b for a, b in zip(twin.parameters(), model.parameters(), strict=True))
    return twin


def _interleaved(conditions: dict[str, Any], repeats: int, warmup: int = 2) -> tuple[dict[str, list[float]], ...]:
    """Like ``interleaved_medians``, with the process CPU time of every run beside its wall time."""
    for _ in range(warmup):
        for fn in conditions.values():
            fn()
    wall: dict[str, list[float]] = {name: [] for name in conditions}
    cpu: dict[str, list[float]] = {name: [] for name in conditions}
    for _ in range(repeats):
        for name, fn in conditions.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    return wall, cpu


def _nnsight(model: Any, tok: Any, ids: torch.Tensor, notes: dict[str, str]) -> Any:
    try:
        import nnsight

        lm = nnsight.LanguageModel(model, tokenizer=tok)

        def run() -> None:
            saved: list[Any] = []
            with torch.no_grad(), lm.trace(ids):
                for layer in lm.model.layers:
                    saved.append(layer.output.save())
            assert len(saved) == len(model.model.layers)

        run()
        return run
    except Exception as exc:  # a peer that fails offline is reported, not fatal
        notes["nnsight 0.8.1 (resid outputs)"] = f"{type(exc).__name__}: {str(exc)[:120]}"
        return None


def _tlens(model: Any, tok: Any, ids: torch.Tensor, notes: dict[str, str]) -> Any:
    try:
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(
            "HuggingFaceTB/SmolLM2-135M-Instruct", hf_model=model, tokenizer=tok
        )

        def run() -> None:
            with torch.no_grad():
                bridge.run_with_cache(
                    ids, names_filter=lambda n: n.endswith("hook_resid_post") or n.endswith("hook_out")
                )

        run()
        return run
    except Exception as exc:
        notes["TransformerLens 4.3 bridge run_with_cache"] = f"{type(exc).__name__}: {str(exc)[:120]}"
        return None


def _bundle_throughput(model: Any, tok: Any, ids: torch.Tensor) -> tuple[dict[str, float], dict[str, float]]:
    tmp = Path(tempfile.mkdtemp())
    try:
        rec = RecorderHooks(granularity="all", sketch="full", max_bundle_size_mb=1e6).install_hooks(model, tok)
        with torch.no_grad():
            model(input_ids=ids)
        start = time.perf_counter()
        path = rec.create_bundle(tmp / "b")
        w = time.perf_counter() - start
        rec.remove_hooks()
        mb = Bundle.open(path).size_bytes() / 1e6
        start = time.perf_counter()
        b = Bundle.open(path)
        for _site, _t in b.activations():
            pass
        r = time.perf_counter() - start
        return {"mb": mb, "s": w, "mb_per_s": mb / w}, {"mb": mb, "s": r, "mb_per_s": mb / r}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
