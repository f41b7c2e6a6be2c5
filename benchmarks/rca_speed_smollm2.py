"""Where CausalCCA's time goes on the real SmolLM2 injection incident, per phase, at a reduced size.

Builds the session as ``benchmarks/rca_smollm2.py`` does (record ``smollm2-injection``, split
its prompts into a search part and a held-out part, the same CausalCCA settings), but holds
out a larger share (``--held-out``, default 0.7) so that the search part, which every
phase runs on, is smaller and a run takes minutes instead of the full benchmark's 40. A
progress callback timestamps every phase: wall seconds, CPU seconds of this process,
forward calls (batches) and model rows (prompt × intervention set). It also reports the
search's memo hit rates (flip checks and side effects not run again) and the fix's flip
rate and side effects on the search part, so that speed-ups can be checked for quality.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rca_speed_smollm2.py [--held-out 0.7] [--name N]
     → benchmarks/results/rca_speed_smollm2.{json,md}
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rca_speed import PhaseClock

from _common import commit, machine, markdown_table, smollm2_cca, smollm2_cca_arguments, write_results
from model_forensics import CompressionForensics, SandboxReplayer
from model_forensics.rca import search as search_module
from model_forensics.rca.attribution import attribution_ranking
from model_forensics.rca.heldout import searching, split_prompts
from model_forensics.scenarios import get


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--held-out", type=float, default=0.7, help="share of each prompt kind held out")
    smollm2_cca_arguments(parser)
    parser.add_argument("--name", default="rca_speed_smollm2", help="results file name under benchmarks/results/")
    parser.add_argument("--label", default="", help="a line saying what this run measures")
    args = parser.parse_args()
    torch.manual_seed(0)
    load_before = os.getloadavg()
    searches: list[Any] = []
    init = search_module.FixSearch.__init__

    def keep(self: Any, *a: Any, **k: Any) -> None:
        init(self, *a, **k)
        searches.append(self)

    search_module.FixSearch.__init__ = keep  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as tmp:
        bundle = get("smollm2-injection").record(Path(tmp), limit=1).incidents[0]
        session = SandboxReplayer().load_bundle(bundle)
        cca = smollm2_cca(args)
        split = split_prompts(session.extras, args.held_out, cca.config.split_seed)
        clock = PhaseClock()
        clock.session = session
        with searching(session, split):
            clock("compression forensics", 0, 1)
            cf = CompressionForensics().analyze(session)
            clock("attribution", 0, 1)
            ranking = attribution_ranking(session)
            wall, cpu = time.perf_counter(), time.process_time()
            fix = cca.search_fix_set(session, guided_by=cf, ranking=ranking, progress=clock)
            cca_wall, cca_cpu = time.perf_counter() - wall, time.process_time() - cpu
            clock.switch(None)
            counts = {k: len(v) for k, v in split.search.items() if isinstance(v, list)}
    search_module.FixSearch.__init__ = init  # type: ignore[method-assign]
    memo = searches[-1].memo if searches and hasattr(searches[-1], "memo") else {}
    effects = fix.side_effects
    data = {
        "commit": commit(),
        "machine": machine(),
        "label": args.label,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "settings": vars(args),
        "search_part": counts,
        "phases": clock.phases,
        "causal_cca": {"wall_s": cca_wall, "cpu_s": cca_cpu, "phase_passes": fix.phase_passes},
        "memo": memo,
        "units": fix.units,
        "flip_rate": fix.total_flip_rate,
        "side_effects": None if effects is None else effects.to_json(),
        "notes": fix.notes,
    }
    text = render(data)
    print(text)
    write_results(args.name, data, text)


def render(data: dict[str, Any]) -> str:
    rows = [
        [p, f"{v['wall_s']:.1f}", f"{v['cpu_s']:.1f}", int(v["batches"]), int(v["rows"])]
        for p, v in data["phases"].items()
    ]
    effects = data["side_effects"] or {}
    cca = data["causal_cca"]
    load = data["load_average"]
    memo = data["memo"]
    memo_line = (
        ", ".join(f"{k} {v}" for k, v in memo.items()) if memo else "not counted (the search had no memo counters)"
    )
    return (
        "# CausalCCA on SmolLM2 by phase, reduced size (benchmarks/rca_speed_smollm2.py)\n\n"
        + (f"{data['label']}\n\n" if data["label"] else "")
        + f"Commit {data['commit']}; {data['machine']['threads']} torch thread(s); load average "
        f"{load['before'][0]:.1f} before, {load['after'][0]:.1f} after (the 2-core machine is shared with other "
        "jobs: wall times are inflated, CPU times less so). Settings as benchmarks/rca_smollm2.py (search_variants "
        f"{data['settings']['search_variants']}, confirm_variants {data['settings']['confirm_variants']}, "
        f"refine_rounds {data['settings']['refine_rounds']}, confirm_top 16) but held_out_fraction "
        f"{data['settings']['held_out']}: search part "
        + ", ".join(f"{k} {v}" for k, v in data["search_part"].items())
        + ".\n\n"
        + markdown_table(["phase", "wall s", "CPU s", "batches", "model rows"], rows)
        + f"\n\nCausal CCA: {cca['wall_s']:.0f} s wall, {cca['cpu_s']:.0f} s CPU; forward calls by phase: "
        + ", ".join(f"{k} {v}" for k, v in cca["phase_passes"].items())
        + f".\n\nSearch memo: {memo_line}.\n\n"
        f"Fix: {', '.join(data['units'])}; flip rate {data['flip_rate']:.0%} of the search part's failing variants; "
        f"benign mean KL {effects.get('mean_kl', float('nan')):.3g} nats, answers kept word for word "
        f"{effects.get('answers_unchanged', float('nan')):.0%}.\n\nNotes:\n"
        + "".join(f"- {n}\n" for n in data["notes"])
    )


if __name__ == "__main__":
    main()
