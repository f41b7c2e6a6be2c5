"""Peak memory of the SmolLM2 all-heads sweep against ``replay.memory_budget_mb``.

Each condition runs in a fresh child process: load SmolLM2-135M (fp32, weights copied into
ordinary memory as in benchmarks/sweep.py), record the 64-token incident, open a session
with the given ``memory_budget_mb``, then reset the kernel's peak-RSS mark
(``/proc/self/clear_refs``) and run ``session.sweep`` over all 270 single-head zero
ablations. The growth is the peak RSS during the sweep minus the RSS just before it (the
loaded model and session); it should stay within the budget (+10%).

Run: .venv/bin/python benchmarks/sweep_memory.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import commit, markdown_table, write_results

BUDGETS = (512, 2048)


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(budget: float, share_prefix: bool) -> dict[str, float | int | bool]:
    import torch
    from sweep import PROMPT, _record

    from model_forensics import Intervention, SandboxReplayer
    from model_forensics.models import load
    from model_forensics.recorder.session import encode_prompt
    from model_forensics.replay.sweep import rows_per_batch

    torch.set_num_threads(1)
    loaded = load("smollm2", progress=False)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.data = p.data.clone()
        batch = {k: v[:, :64] for k, v in encode_prompt(loaded, PROMPT).items()}
        predicted = int(loaded.model(**batch).logits[0, -1].argmax())
    with tempfile.TemporaryDirectory() as tmp:
        bundle = _record(loaded, tmp, batch, predicted)
        session = SandboxReplayer(memory_budget_mb=budget).load_bundle(bundle, model=loaded)
        sets = [[Intervention(f"blocks.{layer}.attn.head.{h}", "zero")] for layer in range(30) for h in range(9)]
        per_batch = rows_per_batch(session, session.inputs)
        before = _status_mb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
        start = time.process_time()
        result = session.sweep(sets, share_prefix=share_prefix)
        cpu = time.process_time() - start
        peak = _status_mb("VmHWM")
    return {
        "budget_mb": budget,
        "share_prefix": share_prefix,
        "rows_per_batch": per_batch,
        "batches": result.batches,
        "rss_before_mb": before,
        "peak_rss_mb": peak,
        "growth_mb": peak - before,
        "cpu_seconds": cpu,
    }


def main() -> None:
    rows, data = [], []
    loads = [os.getloadavg()[0]]
    for budget in BUDGETS:
        for share in (True, False):
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(budget), str(int(share))],
                capture_output=True,
                text=True,
                check=True,
                timeout=1800,
            )
            got = json.loads(out.stdout.strip().splitlines()[-1])
            loads.append(os.getloadavg()[0])
            print(got, flush=True)
            data.append(got)
            within = got["growth_mb"] <= 1.1 * budget
            rows.append(
                [
                    f"{budget:.0f}",
                    "batching + prefix + last position" if share else "batching only (share_prefix=False)",
                    got["rows_per_batch"],
                    got["batches"],
                    f"{got['rss_before_mb']:.0f}",
                    f"{got['peak_rss_mb']:.0f}",
                    f"{got['growth_mb']:.0f}",
                    "yes" if within else "NO",
                    f"{got['cpu_seconds']:.1f}",
                ]
            )
    headers = [
        "memory_budget_mb",
        "sweep",
        "rows per batch",
        "batches",
        "RSS before sweep (MB)",
        "peak RSS (MB)",
        "growth (MB)",
        "within budget +10%",
        "CPU s",
    ]
    table = markdown_table(headers, rows)
    label = commit()
    caption = (
        "# Sweep memory (benchmarks/sweep_memory.py)\n\nSmolLM2-135M-Instruct fp32, 64 prompt tokens, 270 "
        "single-head zero ablations, 1 thread, one child process per row; growth = peak RSS during the sweep "
        "(VmHWM after resetting it) − RSS before it (model, tokenizer and session loaded). 1-min load average "
        f"{min(loads):.1f}–{max(loads):.1f} on {os.cpu_count()} CPUs (shared with other jobs). Commit {label}."
    )
    print(table)
    write_results(
        "sweep_memory", {"conditions": data, "loadavg_1min": loads, "commit": label}, caption + "\n\n" + table
    )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(child(float(sys.argv[2]), bool(int(sys.argv[3])))))
    else:
        main()
