"""The published SmolLM2 fixes on fresh injected prompts: the scenario's grid beyond the part its search screened.

The SmolLM2 injection scenario's prompts come from the first 320 candidates of a seeded
shuffle of the grid tasks × texts × injections × placements × targets (5184 prompts,
``scripts/search_smollm2_injection.py``). Its held-out part is drawn from those; choices made
while building the analysis (which gate directions to try, which thresholds) were made
looking at figures on them. This benchmark takes the next ``--fresh`` candidates of the same
shuffle, which no fit, choice or check has seen, decodes each one clean (greedy, one prompt,
as the scenario's reference decoding), sorts them into failing prompts (the reply contains
a target) and near misses (it does not), and measures the fixes that
``benchmarks/rca_smollm2.py`` published (``benchmarks/results/rca_smollm2.json``: the unit
fix set and the step-gated fix) on them: failing flipped, near-miss answers kept word for
word, how often the step gate's gate fires. The unit fix's mean ablations read the search
part's baselines, as in the analysis that found it. Every prompt is one batched sweep of
three rows (clean, unit fix, step gate).

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rca_smollm2_fresh.py
→ benchmarks/results/rca_smollm2_fresh.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import SMOLLM2_TARGETS, commit, machine, markdown_table, smollm2_grid, write_results
from model_forensics import CausalCCA, SandboxReplayer
from model_forensics.rca.heldout import searching, split_prompts
from model_forensics.replay import Intervention
from model_forensics.scenarios import get

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results/rca_smollm2.json"


def share(hits: int, n: int) -> str:
    return "—" if not n else f"{hits}/{n} ({hits / n:.0%})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", type=int, default=160, help="candidates after the searched ones")
    parser.add_argument("--offset", type=int, default=0, help="candidates after the searched ones to skip first")
    parser.add_argument("--name", default="rca_smollm2_fresh", help="results file name under benchmarks/results/")
    args = parser.parse_args()
    published = json.loads(RESULTS.read_text())
    fixes = {
        "unit fix": [Intervention.from_json(iv) for iv in published["fix_set"]["interventions"]],
        "step gate": [Intervention.from_json(iv) for iv in published["step_gate"]["interventions"]],
    }
    data = json.loads((ROOT / "src/model_forensics/scenarios/data/smollm2_injection.json").read_text())
    searched, seed = int(data["search"]["candidates"]), int(data["search"]["seed"])
    grid = smollm2_grid()
    first = searched + args.offset
    candidates = grid.build_candidates(first + args.fresh, seed)[first:]
    load_before = os.getloadavg()
    wall, cpu = time.perf_counter(), time.process_time()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        bundle = get("smollm2-injection").record(Path(tmp), limit=1).incidents[0]
        session = SandboxReplayer().load_bundle(bundle)
        seen = {
            e if isinstance(e, str) else e.get("prompt")
            for kind in ("variants", "near_miss", "benign", "baseline")
            for e in session.extras.get(kind) or []
        }
        config = CausalCCA().config
        split = split_prompts(session.extras, config.held_out_fraction, config.split_seed)
        passes = session.forward_passes
        with searching(session, split):  # the unit fix's means over the search part's baselines
            for n, case in enumerate(candidates):
                assert case["prompt"] not in seen  # fresh: in no prompt set of the bundle
                batch = session.encode(case["prompt"])
                clean, unit, gated = session.sweep([[], fixes["unit fix"], fixes["step gate"]], inputs=batch)
                rows.append(
                    {
                        "prompt": case["prompt"],
                        "target": case["target"],
                        "failing": bool(clean.failed),
                        "clean": clean.text,
                        "unit fix": {"failed": unit.failed, "text": unit.text},
                        "step gate": {"failed": gated.failed, "text": gated.text, "fired": any(gated.gates.values())},
                    }
                )
                if n % 20 == 0:
                    print(f"{n}/{len(candidates)} fresh prompts, {time.perf_counter() - wall:.0f} s", flush=True)
        passes = session.forward_passes - passes
    seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
    load_after = os.getloadavg()
    failing = [r for r in rows if r["failing"]]
    near = [r for r in rows if not r["failing"]]
    figures: dict[str, dict[str, Any]] = {}
    for name in fixes:
        flipped = sum(not r[name]["failed"] for r in failing)
        kept = sum(r[name]["text"] == r["clean"] for r in near)
        figures[name] = {
            "failing_flipped": flipped / len(failing) if failing else None,
            "near_miss_kept": kept / len(near) if near else None,
            "counts": {"failing": len(failing), "near_miss": len(near), "flipped": flipped, "kept": kept},
        }
    groups = {"failing": failing, "near_miss": near}
    fired = {k: sum(r["step gate"]["fired"] for r in group) for k, group in groups.items()}
    figures["step gate"]["gate_fired"] = {k: fired[k] / len(g) for k, g in groups.items() if g}
    table = markdown_table(
        ["fix", "fitted at", "fresh failing flipped", "fresh near-miss answers kept word for word"],
        [
            [
                name,
                published["commit"],
                share(f["counts"]["flipped"], f["counts"]["failing"]),
                share(f["counts"]["kept"], f["counts"]["near_miss"]),
            ]
            for name, f in figures.items()
        ],
    )
    step = published["step_gate"]
    text = (
        "# The published SmolLM2 fixes on fresh injected prompts (benchmarks/rca_smollm2_fresh.py)\n\n"
        f"Commit {commit()}; the fixes are those of benchmarks/results/rca_smollm2.json (commit "
        f"{published['commit']}). Fresh prompts: candidates {first}–{first + args.fresh - 1} of the scenario's "
        f"seeded grid shuffle (seed {seed}; its search screened the first {searched}), none in the bundle's prompt "
        f"sets: {len(failing)} fail clean (the reply contains a target), {len(near)} are near misses. "
        f"CPU, {machine()['threads']} torch threads; {seconds:.0f} s wall, {cpu_seconds:.0f} s CPU, "
        f"{passes} forward calls of 3 rows; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after.\n\n"
        f"{table}\n\n"
        f"The step gate (blocks.{step['layer']}.resid_post, {step.get('gate', 'difference')} gate above "
        f"{step['threshold']:.3g}, steer {step['alpha']:g}) fires on "
        f"{share(fired['failing'], len(failing))} of the fresh failing prompts and "
        f"{share(fired['near_miss'], len(near))} of the fresh near misses. The issue's held-out targets, for "
        f"comparison: failing flipped ≥ {SMOLLM2_TARGETS['failing flipped']:.0%}, near-miss answers kept "
        f"≥ {SMOLLM2_TARGETS['near-miss kept']:.0%}.\n"
    )
    print(text)
    write_results(
        args.name,
        {
            "commit": commit(),
            "fixes_from": {"file": "benchmarks/results/rca_smollm2.json", "commit": published["commit"]},
            "machine": machine(),
            "load_average": {"before": load_before, "after": load_after},
            "settings": {"fresh": args.fresh, "offset": args.offset, "searched": searched, "seed": seed},
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "forward_passes": passes,
            "figures": figures,
            "prompts": rows,
        },
        text,
    )


if __name__ == "__main__":
    main()
