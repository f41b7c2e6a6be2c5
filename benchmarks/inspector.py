"""ModelInspector on SmolLM2-135M: all eight experiments (plus verified pruning) over 256
prompts, and the memory curve of the streaming experiments as prompts grow 256 → 2048.

Each measurement runs in a fresh child process, so peak memory is that run's alone:

* wall time per stage (``InspectionResult.timings``) and in total;
* peak RSS during the run (Linux ``VmHWM`` reset after loading the model(s) and one plain
  forward of a full batch, so neither loading nor the model's own working memory counts),
  and its growth over the RSS at that point;
* tracemalloc peak during the run (Python and numpy allocations; torch tensors are not
  traced);
* the bytes held by the streaming summaries at the end (``result.state_bytes``).

Prompts are generated deterministically from templates over five topics whose mix
drifts over four "weeks" (the drift series); the reference set has week 0's mix; capital
city prompts carry a ``label`` (regression correctness); ``passed`` is a synthetic label
(finance/sports prompts "fail") for attribution. The candidate model for regression is
SmolLM2 with small Gaussian noise on the MLP down-projections of blocks 20–29 (a
simulated fine-tune).

Run: .venv/bin/python benchmarks/inspector.py [--prompts 256] [--curve 256,512,1024,2048] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import subprocess
import sys
import time
import tracemalloc
import warnings
from pathlib import Path
from typing import Any

import torch

from _common import machine, markdown_table, write_results

TOPICS = {
    "science": [
        "The speed of light",
        "A black hole",
        "The human brain",
        "Photosynthesis in plants",
        "The theory of evolution",
    ],
    "cooking": [
        "A good tomato sauce",
        "Fresh bread from the oven",
        "The secret of a soft omelette",
        "Slow roasted vegetables",
    ],
    "travel": [
        "The old town of Prague",
        "A night train across Europe",
        "The beaches of Portugal",
        "Hiking in the Alps",
    ],
    "sports": [
        "The final match of the season",
        "A marathon runner",
        "The new football coach",
        "Winning the championship",
    ],
    "finance": [
        "The interest rate decision",
        "A volatile stock market",
        "The quarterly earnings report",
        "Inflation this year",
    ],
}
VERBS = ["is", "was", "has always been", "can be described as", "seems to be", "will become"]
TAILS = ["", " quite", " truly", " in many ways", " for most people"]
CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Greece", "Athens"), ("Russia", "Moscow"), ("Poland", "Warsaw"),
]  # fmt: skip
# Topic weights per week: the mix drifts from science/cooking towards finance/sports.
WEEKS = [
    {"science": 4, "cooking": 3, "travel": 2, "sports": 1, "finance": 1},
    {"science": 3, "cooking": 3, "travel": 2, "sports": 2, "finance": 2},
    {"science": 2, "cooking": 2, "travel": 2, "sports": 3, "finance": 3},
    {"science": 1, "cooking": 1, "travel": 2, "sports": 4, "finance": 4},
]


def prompts(n: int, seed: int, weeks: list[int]) -> list[dict[str, Any]]:
    """``n`` JSONL-style records drawn from the given weeks' topic mixes (round robin)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        week = weeks[i % len(weeks)]
        if rng.random() < 0.1:
            country, capital = rng.choice(CAPITALS)
            out.append(
                {"text": f"The capital of {country} is", "label": capital, "passed": True, "group": f"week{week}"}
            )
            continue
        mix = WEEKS[week]
        topic = rng.choices(list(mix), weights=list(mix.values()))[0]
        text = f"{rng.choice(TOPICS[topic])} {rng.choice(VERBS)}{rng.choice(TAILS)}"
        out.append({"text": text, "passed": topic not in ("finance", "sports"), "group": f"week{week}"})
    return out


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(mode: str, n: int, n_ref: int, threads: int, batch_size: int) -> dict[str, Any]:
    """One measured run in this (fresh) process; returns the measurements."""
    from model_forensics.inspection import InspectorSettings, ModelInspector
    from model_forensics.models import load

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    loaded = load("smollm2", progress=False)
    data = prompts(n, seed=1, weeks=[0, 1, 2, 3])
    reference = prompts(n_ref, seed=2, weeks=[0])
    candidate = None
    if mode == "full":
        candidate = copy.deepcopy(loaded.model)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for layer in candidate.model.layers[20:]:
                w = layer.mlp.down_proj.weight
                w.add_(0.05 * w.std() * torch.randn(w.shape, generator=g))
        experiments = None
    else:
        experiments = ["sparsity", "stats", "shift", "drift"]
    settings = InspectorSettings(batch_size=batch_size, max_length=64)
    inspector = ModelInspector(loaded.model, loaded.tokenizer, settings=settings, name="smollm2")
    # The model's own working memory (one plain forward of a full batch) is part of the
    # baseline: what follows is what inspection adds.
    warm = [max(data, key=lambda r: len(r["text"]))["text"]] * batch_size
    with torch.no_grad():
        loaded.model(**loaded.tokenizer(warm, return_tensors="pt"))
    rss_loaded = _rss_mb("VmRSS")
    exact_peak = _reset_peak_rss()
    tracemalloc.start()
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = inspector.run(
            data, reference=reference, experiments=experiments, compare_model=candidate, compare_name="smollm2-noised"
        )
    wall = time.perf_counter() - started
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    peak = _rss_mb("VmHWM")
    out: dict[str, Any] = {
        "mode": mode,
        "prompts": n,
        "reference_prompts": len(reference),
        "experiments": result.experiments,
        "skipped": result.skipped,
        "wall_s": wall,
        "timings_s": result.timings,
        "rss_after_load_mb": rss_loaded,
        "peak_rss_mb": peak,
        "peak_rss_exact": exact_peak,
        "rss_growth_mb": peak - rss_loaded,
        "tracemalloc_peak_mb": traced_peak / 2**20,
        "state_mb": result.state_bytes / 2**20,
        "warnings": sorted({str(w.message)[:200] for w in caught}),
    }
    if mode == "full":
        out["summary"] = result.summary_markdown()
    return out


def _spawn(mode: str, n: int, n_ref: int, threads: int, batch_size: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", mode, "--n", str(n), "--reference", str(n_ref)]
    cmd += ["--threads", str(threads), "--batch-size", str(batch_size)]
    # One BLAS thread per torch thread: oversubscribed OpenBLAS threads spin on a shared machine.
    blas = {k: str(threads) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env = {**os.environ, **blas, "PYTHONPATH": str(Path(__file__).parent)}
    for attempt in range(2):  # a second try: a first load may race another process's model cache
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode == 0:
            return dict(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"child {mode} {n} failed (attempt {attempt + 1}):\n{proc.stderr[-2000:]}", file=sys.stderr)
    raise SystemExit(f"child {mode} {n} failed twice")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--curve", default="256,512,1024,2048")
    parser.add_argument("--reference", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--child", choices=["full", "stream"])
    parser.add_argument("--n", type=int, default=256)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.n, args.reference, args.threads, args.batch_size)))
        return

    started = time.perf_counter()
    full = _spawn("full", args.prompts, args.reference, args.threads, args.batch_size)
    print(f"full run: {full['wall_s']:.0f} s", file=sys.stderr)
    curve = []
    for n in [int(x) for x in args.curve.split(",") if x]:
        curve.append(_spawn("stream", n, args.reference, args.threads, args.batch_size))
        print(f"stream {n}: {curve[-1]['wall_s']:.0f} s, peak RSS {curve[-1]['peak_rss_mb']:.0f} MB", file=sys.stderr)

    info = machine() | {"threads": args.threads, "batch_size": args.batch_size, "load_average": os.getloadavg()}
    stage_rows = [[stage, f"{seconds:.1f}"] for stage, seconds in full["timings_s"].items()]
    stage_rows.append(["**total**", f"{full['wall_s']:.1f}"])
    mem = [
        ["RSS after loading both models + one plain forward", f"{full['rss_after_load_mb']:.0f}"],
        ["peak RSS during the run", f"{full['peak_rss_mb']:.0f}"],
        ["growth over load", f"{full['rss_growth_mb']:.0f}"],
        ["tracemalloc peak (numpy/Python)", f"{full['tracemalloc_peak_mb']:.0f}"],
        ["streaming summaries at the end", f"{full['state_mb']:.0f}"],
    ]
    curve_rows = [
        [
            c["prompts"],
            f"{c['wall_s']:.0f}",
            f"{c['wall_s'] / (c['prompts'] + c['reference_prompts']):.3f}",
            f"{c['peak_rss_mb']:.0f}",
            f"{c['rss_growth_mb']:.0f}",
            f"{c['tracemalloc_peak_mb']:.0f}",
            f"{c['state_mb']:.0f}",
        ]
        for c in curve
    ]
    text = "\n\n".join(
        [
            f"ModelInspector on SmolLM2-135M-Instruct, {info['device']}, {args.threads} thread(s), batch {args.batch_size}, "
            f"load average {info['load_average'][0]:.1f} (shared machine)",
            f"All experiments over {full['prompts']} prompts (+{full['reference_prompts']} reference; candidate = noised copy "
            f"for regression); skipped: {full['skipped'] or 'none'}",
            markdown_table(["stage", "seconds"], stage_rows),
            markdown_table(["memory", "MB"], mem),
            f"Memory as prompts grow (streaming experiments sparsity, stats, shift, drift; {args.reference} reference prompts each run; "
            "growth over the RSS after loading + one plain forward)",
            markdown_table(
                [
                    "prompts",
                    "wall s",
                    "s / prompt",
                    "peak RSS MB",
                    "RSS growth MB",
                    "tracemalloc peak MB",
                    "summaries MB",
                ],
                curve_rows,
            ),
            full["summary"],
        ]
    )
    write_results(
        "inspector", {"machine": info, "full": full, "curve": curve, "total_s": time.perf_counter() - started}, text
    )
    print(text)


if __name__ == "__main__":
    main()
