"""Exact patching on SmolLM2: whole teacher-forced passes against rows entering at their blocks.

``exact_effects`` (the implicated units' exact patching, rca/implicated.py) ablates each
unit alone along each failing variant's recorded continuation. Two strategies, each on a
fresh session of the recorded smollm2-injection incident, rounds interleaved:

  whole    every unit's row runs the whole model (the path of models under 10M parameters)
  shared   each unit's row enters at its block on the clean computation of the blocks
           before it, scores kept at the positions the metric reads (the default on SmolLM2)

Units: the five members of the benchmark's fix (rca_smollm2.md) plus 16 heads and 16 MLP
neurons drawn with seed 0, as the implicated phase draws its noise floor; 4 failing
variants (``confirm_variants`` of rca_smollm2.py). Reported: wall and CPU seconds, forward
calls, and the largest difference of any effect between the strategies.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/exact_patching.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from _common import commit, machine, markdown_table, median, write_results
from model_forensics import SandboxReplayer
from model_forensics.rca.attribution import exact_effects
from model_forensics.scenarios import get

MEMBERS = [
    "blocks.29.attn.head.1",
    "blocks.23.attn.head.0",
    "blocks.23.attn.head.7",
    "blocks.23.attn.head.2",
    "blocks.23.attn.head.8",
]
VARIANTS = 4


def units(n_layers: int, n_heads: int, d_mlp: int) -> list[str]:
    generator = torch.Generator().manual_seed(0)
    heads = [f"blocks.{b}.attn.head.{h}" for b in range(n_layers) for h in range(n_heads)]
    neurons = [f"blocks.{b}.mlp.post[{n}]" for b in range(n_layers) for n in range(d_mlp)]
    drawn = [heads[i] for i in torch.randperm(len(heads), generator=generator)[:16].tolist()]
    drawn += [neurons[i] for i in torch.randperm(len(neurons), generator=generator)[:16].tolist()]
    return list(dict.fromkeys(MEMBERS + drawn))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    bundle = get("smollm2-injection").record(Path(tempfile.mkdtemp()), limit=1).incidents[0]
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {"whole": [], "shared": []}
    names: list[str] = []
    for _ in range(args.rounds):
        for name, shared in (("whole", False), ("shared", True)):
            session = SandboxReplayer().load_bundle(bundle)
            adapter = session.adapter
            names = units(adapter.n_layers, int(adapter.n_heads or 0), int(session.model.config.intermediate_size))
            calls = session.forward_passes
            wall, cpu = time.perf_counter(), time.process_time()
            effects = exact_effects(session, names, "mean", max_variants=VARIANTS, share_prefix=shared)
            runs[name].append(
                {
                    "wall_s": time.perf_counter() - wall,
                    "cpu_s": time.process_time() - cpu,
                    "forward_calls": session.forward_passes - calls,
                    "effects": effects,
                }
            )
            print(name, f"{runs[name][-1]['wall_s']:.1f} s", flush=True)
    load_after = os.getloadavg()
    whole, shared = runs["whole"][0]["effects"], runs["shared"][0]["effects"]
    scale = max(abs(v) for v in whole.values())
    diff = max(abs(whole[u] - shared[u]) for u in names) / scale
    rows = [
        [
            name,
            f"{median([r['wall_s'] for r in rs]):.1f}",
            f"{median([r['cpu_s'] for r in rs]):.1f}",
            rs[0]["forward_calls"],
            ", ".join(f"{r['wall_s']:.1f}" for r in rs),
        ]
        for name, rs in runs.items()
    ]
    table = markdown_table(["strategy", "median wall s", "median CPU s", "forward calls", "wall s per round"], rows)
    ratio = median([w["wall_s"] / s["wall_s"] for w, s in zip(runs["whole"], runs["shared"], strict=True)])
    header = (
        f"SmolLM2-135M, smollm2-injection incident; {len(names)} units ({len(MEMBERS)} fix members, 16 heads and "
        f"16 neurons drawn with seed 0) × {VARIANTS} failing variants; {args.rounds} interleaved rounds, a fresh "
        f"session per run; {torch.get_num_threads()} torch thread(s); load average {load_before[0]:.1f} → "
        f"{load_after[0]:.1f}; commit {commit()}.\n\n"
    )
    footer = (
        f"\n\nwhole / shared wall time (median of per-round ratios): {ratio:.2f}×. Largest difference of any "
        f"effect, relative to the largest |effect|: {diff:.1e}. Forward calls count batches: the shared path "
        "adds one clean-prefix capture per variant and one check.\n"
    )
    print(header + table + footer)
    data = {
        "machine": machine(),
        "commit": commit(),
        "load_average": {"before": load_before, "after": load_after},
        "units": names,
        "variants": VARIANTS,
        "runs": runs,
        "ratio": ratio,
        "max_relative_difference": diff,
    }
    write_results("exact_patching", data, header + table + footer)


if __name__ == "__main__":
    main()
