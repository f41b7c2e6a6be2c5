"""CausalCCA's gating stage on the real SmolLM2 injection, from the last full search.

``rca_smollm2.py`` takes about 50 min on 2 CPU cores, most of it the fix-set search. This
benchmark starts from the fix set that run found (``benchmarks/results/rca_smollm2.json``:
its members, with their attribution scores), and runs only what comes after the search:
CausalCCA's gating stage (``rca.gating.gate_if_it_helps``: the gate's site, reading, direction
and threshold are chosen by the library exactly as in a full analysis, from the 4 search
variants and the baselines), then measures by replay:

* flip rate over all 44 failing prompts, gated and ungated;
* side effects on the scenario's 30 benign prompts (which are also the baselines that set
  the gate's threshold: in-sample for the gate) and on 18 held-out clean prompts of the
  same task × text grid that nothing in the analysis saw (out-of-sample).

Run: .venv/bin/python benchmarks/rca_smollm2_gate.py → benchmarks/results/rca_smollm2_gate.{json,md}
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from rca_smollm2 import effects_line, held_out_prompts

from _common import RESULTS, machine, write_results
from model_forensics import CausalCCA, SandboxReplayer
from model_forensics.rca.attribution import UnitScore
from model_forensics.rca.cca import Ablation
from model_forensics.rca.gating import gate_if_it_helps
from model_forensics.rca.notes import Note
from model_forensics.rca.runs import flip_rate
from model_forensics.rca.search import FixChoice, FixSearch
from model_forensics.rca.side_effects import measure
from model_forensics.scenarios import get

SEARCH_VARIANTS = 4  # as in rca_smollm2.py


def main() -> None:
    previous = json.loads((RESULTS / "rca_smollm2.json").read_text())
    chosen = [UnitScore(m["unit"], m["level"], m["attribution"]) for m in previous["fix_set"]["members"]]
    scenario = get("smollm2-injection")
    seen = [e["prompt"] if isinstance(e, dict) else e for e in [*scenario.benign, *scenario.baseline]]
    held_out = held_out_prompts(seen)
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        session = SandboxReplayer().load_bundle(scenario.record(Path(tmp), limit=1).incidents[0])
        cca = CausalCCA(search_variants=SEARCH_VARIANTS)
        search = FixSearch(session, cca.config)  # finds the failing variants; searches on the first 4
        failing = search.failing
        timings["record and find the failing prompts"] = time.perf_counter() - start

        start, before = time.perf_counter(), session.forward_passes
        plain = Ablation("mean")
        ungated = plain.all(chosen)
        ungated_rate = flip_rate(search.flips(failing, ungated))
        ungated_kl = search.benign_kl(ungated)
        notes: list[Note] = []
        ablate = gate_if_it_helps(search, FixChoice(chosen, plain, ungated_kl, {}), ungated_rate, notes).ablation
        gated = ablate.all(chosen)
        gated_rate = flip_rate(search.flips(failing, gated))
        timings["gating stage"] = time.perf_counter() - start
        gating_passes = session.forward_passes - before

        start = time.perf_counter()
        bound = cca.config.max_side_effect_kl
        effects = {
            "gated, benign set (in-sample for the gate)": measure(session, gated, bound),
            "gated, held-out prompts": measure(session, gated, bound, benign=held_out),
            "ungated, benign set": measure(session, ungated, bound),
            "ungated, held-out prompts": measure(session, ungated, bound, benign=held_out),
        }
        timings["side effects"] = time.perf_counter() - start

    gate = ablate.gate
    lines = [
        "# Gating the SmolLM2 injection fix set (benchmarks/rca_smollm2_gate.py)\n",
        f"Fix set from the last full run of rca_smollm2.py: {len(chosen)} heads "
        f"({', '.join(u.unit for u in chosen)}), mean-ablated.\n",
        f"Flip rate over all {len(failing)} failing prompts: ungated {ungated_rate:.0%}, "
        f"gated {gated_rate:.0%}." + ("" if gate is not None else " Gating was not kept (see notes)."),
    ]
    if gate is not None:
        lines.append(
            f"Gate: {gate.site}, reads {gate.reads}, opens above {gate.above:.4g} "
            f"(direction fitted on {SEARCH_VARIANTS} failing prompts and {len(session.baselines)} baselines).\n"
        )
    lines += [
        "| fix | prompts | answer KL (nats) | first-step KL | answers kept word for word | predicate changed |",
        "|---|---|---|---|---|---|",
        *(effects_line(k, v) for k, v in effects.items()),
        "",
        f"Gating stage: {gating_passes} forward passes; "
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
        + f"; CPU, {machine()['threads']} threads.",
        "",
        "Notes:",
        *(f"- {n}" for n in notes),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    data: dict[str, Any] = {
        "machine": machine(),
        "members": [u.unit for u in chosen],
        "flip_rate": {"ungated": ungated_rate, "gated": gated_rate},
        "gate": None if gate is None else gate.to_json(),
        "side_effects": {k: v.to_json() for k, v in effects.items()},
        "held_out_prompts": len(held_out),
        "gating_forward_passes": gating_passes,
        "seconds": timings,
        "notes": [str(n) for n in notes],
    }
    write_results("rca_smollm2_gate", data, text)


if __name__ == "__main__":
    main()
