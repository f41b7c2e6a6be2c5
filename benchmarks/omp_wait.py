"""OpenMP wait policy for short replay passes: default (spinning) vs ``OMP_WAIT_POLICY=PASSIVE``.

``OMP_WAIT_POLICY`` is read once, when torch loads its OpenMP runtime, so each condition
runs in a fresh child process with the variable set before ``import torch``. Conditions:
zoo ``induction-2l`` (one forward of 24 tokens, a short pass) and SmolLM2-135M (64 tokens,
``logits_to_keep=1``), at 1 and 2 threads, default policy vs PASSIVE. Rounds are interleaved
(every condition once per round) and each cell is the median over rounds of the per-pass
wall and CPU time (process time: all threads, spinning included). The machine is shared
with other jobs: the load average is in the caption.

Run: .venv/bin/python benchmarks/omp_wait.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _common import commit, markdown_table, write_results

CHILD = """
import json, sys, time, torch
from model_forensics.models import load
name, threads, passes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
loaded = load(name, progress=False)
model = loaded.model
ids = torch.randint(0, int(model.config.vocab_size), (1, 24 if name != "smollm2" else 64))
kwargs = {"logits_to_keep": 1} if name == "smollm2" else {}
with torch.no_grad():
    for _ in range(3):
        model(input_ids=ids, **kwargs)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(passes):
        model(input_ids=ids, **kwargs)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
print(json.dumps({"wall_ms": 1e3 * wall / passes, "cpu_ms": 1e3 * cpu / passes}))
"""

MODELS = {"zoo:induction-2l": 200, "smollm2": 10}  # model → passes per child


def _child(model: str, threads: int, policy: str | None) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model, str(threads), str(MODELS[model])],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    conditions = [(m, t, p) for m in MODELS for t in (1, 2) for p in (None, "PASSIVE")]
    times: dict[tuple[str, int, str | None], list[dict[str, float]]] = {c: [] for c in conditions}
    loads = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for c in conditions:
            times[c].append(_child(*c))
            print(f"round {r + 1}: {c} {times[c][-1]}", flush=True)
        loads.append(os.getloadavg()[0])
    rows, data = [], []
    for model, threads, policy in conditions:
        got = times[(model, threads, policy)]
        wall = statistics.median(g["wall_ms"] for g in got)
        cpu = statistics.median(g["cpu_ms"] for g in got)
        walls = ", ".join(f"{g['wall_ms']:.1f}" for g in got)
        rows.append([model, threads, policy or "default (spin)", f"{wall:.1f}", f"{cpu:.1f}", walls])
        data.append({"model": model, "threads": threads, "policy": policy, "rounds": got})
    table = markdown_table(
        ["model", "threads", "OMP_WAIT_POLICY", "median wall ms/pass", "median CPU ms/pass", "wall per round"], rows
    )
    label = commit()
    caption = (
        f"# OpenMP wait policy (benchmarks/omp_wait.py)\n\nOne child process per cell and round, {args.rounds} "
        f"interleaved rounds; 1-min load average {min(loads):.1f}–{max(loads):.1f} on {os.cpu_count()} CPUs "
        f"(shared with other jobs). Commit {label}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."
    )
    print(table)
    write_results("omp_wait", {"conditions": data, "loadavg_1min": loads, "commit": label}, caption + "\n\n" + table)


if __name__ == "__main__":
    main()
