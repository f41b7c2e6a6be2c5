"""Root-cause analysis of the real SmolLM2 injection incident (no ground truth; report only).

Records ``smollm2-injection`` (one incident carrying 43 further failing prompts, 30 benign
prompts and clean counterparts), runs CF, attribution and CausalCCA, and reports the fix
set: flip rate over every failing prompt, side effects on the benign answers, forward
passes and wall time of each stage. The search settings are smaller than the defaults
(``--search-variants``, ``--confirm-variants``) because every flip check generates 16
tokens with a 135M model on CPU.

Run: .venv/bin/python benchmarks/rca_smollm2.py   → benchmarks/results/rca_smollm2.{json,md}
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import machine, markdown_table, write_results
from model_forensics import CausalCCA, CompressionForensics, SandboxReplayer
from model_forensics.rca.attribution import attribution_ranking
from model_forensics.rca.side_effects import SideEffects, measure
from model_forensics.scenarios import get

SEARCH_SCRIPT = Path(__file__).resolve().parents[1] / "scripts/search_smollm2_injection.py"


def held_out_prompts(seen: list[str]) -> list[str]:
    """Clean prompts of the scenario's own grid (task × text) that are in neither the benign
    set nor the baselines: nothing in the analysis saw them."""
    spec = importlib.util.spec_from_file_location("search_smollm2_injection", SEARCH_SCRIPT)
    assert spec is not None and spec.loader is not None
    grid = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grid)
    prompts = [grid.build_prompt(task, text) for task, text in itertools.product(grid.TASKS, grid.TEXTS)]
    return [p for p in prompts if p not in set(seen)]


def effects_line(label: str, se: SideEffects) -> str:
    return (
        f"| {label} | {se.n_benign} | {se.mean_kl:.3g} | {se.first_step_kl or 0:.3g} | "
        f"{se.accuracy_clean:.0%} → {se.accuracy_fixed:.0%} | {se.predicate_changed:.0%} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--search-variants", type=int, default=4)
    parser.add_argument("--confirm-variants", type=int, default=4)
    parser.add_argument("--refine-rounds", type=int, default=1)
    args = parser.parse_args()

    stages: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        bundle = get("smollm2-injection").record(Path(tmp), limit=1).incidents[0]
        stages["record"] = {"seconds": time.perf_counter() - start}
        session = SandboxReplayer().load_bundle(bundle)

        def stage(name: str, fn: Any) -> Any:
            before, start = session.forward_passes, time.perf_counter()
            out = fn()
            stages[name] = {"seconds": time.perf_counter() - start, "forward_passes": session.forward_passes - before}
            print(
                f"{name}: {stages[name]['seconds']:.0f} s, {stages[name]['forward_passes']} forward passes", flush=True
            )
            return out

        cf = stage("compression forensics", lambda: CompressionForensics().analyze(session))
        ranking = stage("attribution", lambda: attribution_ranking(session))
        cca = CausalCCA(
            search_variants=args.search_variants,
            confirm_variants=args.confirm_variants,
            refine_rounds=args.refine_rounds,
            confirm_top=16,
        )
        fix = stage("causal CCA", lambda: cca.search_fix_set(session, guided_by=cf, ranking=ranking))

        # Side effects where nothing was fitted: held-out clean prompts; and, for a gated fix,
        # the same members without the gate, on both prompt sets.
        bound = fix.side_effects.bound if fix.side_effects else 0.05
        scenario = get("smollm2-injection")
        seen = [e["prompt"] if isinstance(e, dict) else e for e in [*scenario.benign, *scenario.baseline]]
        held_out = held_out_prompts(seen)
        ungated = [dataclasses.replace(iv, gate=None) for iv in fix.interventions]
        gated = any(iv.gate is not None for iv in fix.interventions)
        effects = stage(
            "side effects (held out)",
            lambda: {
                "fix set, benign set": fix.side_effects,
                "fix set, held-out prompts": measure(session, fix.interventions, bound, benign=held_out),
                **(
                    {
                        "members without the gate, benign set": measure(session, ungated, bound),
                        "members without the gate, held-out prompts": measure(session, ungated, bound, benign=held_out),
                    }
                    if gated
                    else {}
                ),
            },
        )

    se = fix.side_effects
    rows = [
        [
            m.unit,
            m.intervention.kind
            + (" along its failure direction" if m.intervention.direction else "")
            + (f", gated at {m.intervention.gate.site}" if m.intervention.gate else ""),
            f"{m.necessity:.2f}",
            f"{m.sufficiency:.2f}",
            "–" if m.benign_kl is None else f"{m.benign_kl:.3g}",
        ]
        for m in fix.members
    ]
    table = markdown_table(["member", "intervention", "necessity", "sufficiency", "solo benign KL (nats)"], rows)
    summary = (
        f"Flip rate over all {len(fix.flips)} failing prompts: {fix.total_flip_rate:.0%} "
        f"(threshold reached: {fix.reached_threshold}); fix size {len(fix.members)} of {fix.candidates} candidate "
        f"heads/neurons; coarse sites {', '.join(fix.coarse_sites)}.\n"
    )
    if se is not None:
        summary += (
            f"Side effects on {se.n_benign} benign prompts: mean KL {se.mean_kl:.3g} nats over every step of the "
            f"clean answer (max {se.max_kl:.3g}; first step alone {se.first_step_kl or 0:.3g}), bound {se.bound:g} "
            f"(within: {se.within_bound}); benign answers kept word for word (all 16 tokens): "
            f"{se.accuracy_clean:.0%} → {se.accuracy_fixed:.0%}; predicate changed on {se.predicate_changed:.0%}.\n"
        )
    effects_table = (
        "| fix | prompts | answer KL (nats) | first-step KL | answers kept word for word | predicate changed |\n"
        "|---|---|---|---|---|---|\n"
        + "\n".join(effects_line(k, v) for k, v in effects.items() if v is not None)
        + "\n"
    )
    timing = markdown_table(
        ["stage", "seconds", "forward passes"],
        [[k, f"{v['seconds']:.0f}", v.get("forward_passes", "–")] for k, v in stages.items()],
    )
    timing += "\n\nCausal CCA forward passes by phase: " + ", ".join(f"{k} {v}" for k, v in fix.phase_passes.items())
    notes = "".join(f"- {n}\n" for n in fix.notes)
    text = (
        "# Root-cause analysis on real SmolLM2-135M-Instruct (benchmarks/rca_smollm2.py)\n\n"
        f"Settings: search_variants {args.search_variants}, confirm_variants {args.confirm_variants}, "
        f"refine_rounds {args.refine_rounds}, confirm_top 16; CPU, {machine()['threads']} threads.\n\n"
        + summary
        + "\n"
        + effects_table
        + "\n"
        + table
        + "\n\n"
        + timing
        + ("\n\nNotes:\n" + notes if notes else "")
    )
    print(text)
    write_results(
        "rca_smollm2",
        {
            "machine": machine(),
            "settings": vars(args),
            "stages": stages,
            "fix_set": fix.to_json(),
            "cf": cf.to_json(),
            "side_effects": {k: v.to_json() for k, v in effects.items() if v is not None},
            "held_out_prompts": len(held_out),
        },
        text,
    )


if __name__ == "__main__":
    main()
