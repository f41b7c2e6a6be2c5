"""Root-cause analysis of the real SmolLM2 injection incident, with held-out prompts and near misses.

Records ``smollm2-injection`` (one incident carrying 43 further failing prompts, 30 benign
prompts, clean counterparts and 60 near misses: injected prompts SmolLM2 does not obey),
splits its prompts into a search part and a held-out part (``held_out_fraction`` 0.3,
stratified by kind, as ``analyze`` does: :mod:`model_forensics.rca.heldout`), runs CF,
attribution and CausalCCA on the search part, and measures the fix on both parts: failing
prompts flipped, benign and near-miss answers kept word for word, KL, and how often a gate
fires. Fresh clean prompts of the scenario's task × text grid that are in no prompt set are
measured too. Then analyze's step-gate phase (``rca/stepgate.py``; ``step_gate`` auto: tried
because the unit fix does not hold) is fitted on the search part and measured the same way.
The issue's targets (held out): ≥ 80 % failing flipped, ≥ 90 % benign and
≥ 80 % near-miss answers kept word for word.

The search settings are smaller than the defaults (``--search-variants``,
``--confirm-variants``) because every flip check generates 16 tokens with a 135M model on CPU.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rca_smollm2.py → benchmarks/results/rca_smollm2.{json,md}
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    SMOLLM2_TARGETS,
    commit,
    machine,
    markdown_table,
    smollm2_cca,
    smollm2_cca_arguments,
    smollm2_grid,
    write_results,
)
from model_forensics import CompressionForensics, SandboxReplayer
from model_forensics.rca.attribution import attribution_ranking
from model_forensics.rca.explain import held_out_rows, step_gate_rows
from model_forensics.rca.heldout import searching, split_prompts
from model_forensics.rca.pipeline import add_held_out, add_step_gate
from model_forensics.rca.progress import silent
from model_forensics.rca.side_effects import SideEffects, measure
from model_forensics.scenarios import get


def grid_prompts(seen: list[str]) -> list[str]:
    """Clean prompts of the scenario's own grid (task × text) that are in neither the benign
    set nor the baselines: nothing in the analysis saw them."""
    grid = smollm2_grid()
    prompts = [grid.build_prompt(task, text) for task, text in itertools.product(grid.TASKS, grid.TEXTS)]
    return [p for p in prompts if p not in set(seen)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    smollm2_cca_arguments(parser)
    args = parser.parse_args()

    stages: dict[str, dict[str, Any]] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        bundle = get("smollm2-injection").record(Path(tmp), limit=1).incidents[0]
        stages["record"] = {"seconds": time.perf_counter() - start}
        session = SandboxReplayer().load_bundle(bundle)
        cca = smollm2_cca(args)
        split = split_prompts(session.extras, cca.config.held_out_fraction, cca.config.split_seed)

        def stage(name: str, fn: Any) -> Any:
            before, wall, cpu = session.forward_passes, time.perf_counter(), time.process_time()
            out = fn()
            stages[name] = {
                "seconds": time.perf_counter() - wall,
                "cpu_seconds": time.process_time() - cpu,
                "forward_passes": session.forward_passes - before,
            }
            print(f"{name}: {stages[name]['seconds']:.0f} s, {stages[name]['forward_passes']} passes", flush=True)
            return out

        with searching(session, split):
            cf = stage("compression forensics", lambda: CompressionForensics().analyze(session))
            ranking = stage("attribution", lambda: attribution_ranking(session))
            fix = stage("causal CCA", lambda: cca.search_fix_set(session, guided_by=cf, ranking=ranking))
            stage("held out", lambda: add_held_out(session, fix, split, cca.config, lambda *_: None))
            scenario = get("smollm2-injection")
            seen = [e["prompt"] if isinstance(e, dict) else e for e in [*scenario.benign, *scenario.baseline]]
            fresh = grid_prompts(seen)
            bound = cca.config.max_side_effect_kl
            grid_effects: SideEffects = stage(
                "fresh grid prompts", lambda: measure(session, fix.interventions, bound, benign=fresh)
            )
            # analyze's step-gate phase (modules.cca.step_gate auto: tried when the unit fix does not hold)
            stepped = stage("step gate", lambda: add_step_gate(session, fix, split, cca.config, silent))
            step_grid = None
            if stepped is not None:
                step_grid = stage(
                    "step gate: fresh grid prompts",
                    lambda: measure(session, stepped.interventions, bound, benign=fresh),
                )
    load_after = os.getloadavg()
    held = fix.held_out
    assert held is not None
    text = report(args, fix, held, grid_effects, stages, (load_before, load_after))
    text += step_gate_report(stepped, step_grid)
    print(text)
    write_results(
        "rca_smollm2",
        {
            "commit": commit(),
            "machine": machine(),
            "load_average": {"before": load_before, "after": load_after},
            "settings": vars(args),
            "stages": stages,
            "fix_set": fix.to_json(),
            "fresh_grid_prompts": grid_effects.to_json(),
            "step_gate": None if stepped is None else stepped.to_json(),
            "step_gate_fresh_grid_prompts": None if step_grid is None else step_grid.to_json(),
            "targets": SMOLLM2_TARGETS,
        },
        text,
    )


def targets_table(reached: dict[str, float | None]) -> str:
    """The issue's held-out targets beside what a fix reached (None: not measured)."""
    return markdown_table(
        ["held-out target", "needed", "reached", "met"],
        [
            [
                k,
                f"≥ {SMOLLM2_TARGETS[k]:.0%}",
                "—" if v is None else f"{v:.0%}",
                "—" if v is None else str(v >= SMOLLM2_TARGETS[k]),
            ]
            for k, v in reached.items()
        ],
    )


def step_gate_report(stepped: Any, grid: SideEffects | None) -> str:
    """The step-gate phase's section: its pick, search | held-out rows, the held-out targets."""
    if stepped is None:
        return "\n## Step gate\n\nNot tried (the unit fix holds, or the phase cannot read this incident).\n"
    step = stepped.to_json()
    rows = markdown_table(["figure", "search", "held out"], [list(r) for r in step_gate_rows(step)])
    flipped, benign, near = stepped.rates("held_out") if stepped.held_out is not None else (None, None, None)
    reached = {"failing flipped": flipped, "benign kept": benign, "near-miss kept": near}
    targets = targets_table(reached)
    rows_by_layer = {(row["layer"], row["gate"]): row for row in stepped.layers}

    def rule(c: Any) -> str:
        row = rows_by_layer[c.layer, c.gate]
        names = [n for n, key in (("accuracy", "threshold"), ("bound", "bound_threshold")) if row[key] == c.threshold]
        return " = ".join(names)

    tried = markdown_table(
        [
            "layer",
            "gate",
            "α",
            "threshold",
            "rule",
            "failing flipped",
            "benign kept",
            "near-miss kept",
            "within",
            "pick",
        ],
        [
            [
                c.layer,
                c.gate,
                f"{c.alpha:g}",
                f"{c.threshold:.3g}",
                rule(c),
                f"{c.failing_flipped:.0%}",
                f"{c.benign_kept:.0%}",
                "—" if c.near_miss_kept is None else f"{c.near_miss_kept:.0%}",
                str(c.within),
                "**pick**" if c is stepped.search else "",
            ]
            for c in stepped.candidates
        ],
    )
    fresh = (
        "" if grid is None else f" On the fresh grid prompts: answers kept word for word {grid.answers_unchanged:.0%}."
    )
    return (
        "\n## Step gate (analyze's phase, rca/stepgate.py)\n\n"
        "Fitted on the search part, picked on search figures only (configurations, search part; gate: the "
        "direction the gate reads, `difference` of means or `lda`; thresholds: "
        "`accuracy` maximises the search prompts' accuracy, `bound` is the lowest at which the search near misses "
        f"and benign prompts whose gate would open fit the bounds even if all of them changed):\n\n{tried}\n\n"
        f"The pick, blocks.{stepped.layer}.resid_post steer {stepped.alpha:g}, {stepped.gate} gate above "
        f"{stepped.threshold:.3g}; "
        f"threshold reached (decided by the {stepped.decided_by.replace('_', '-')} part): {stepped.reached_threshold}."
        f"{fresh}\n\n{rows}\n\n{targets}\n" + "".join(f"- {n}\n" for n in step["notes"])
    )


def report(args: Any, fix: Any, held: Any, grid: SideEffects, stages: dict[str, Any], load: Any) -> str:
    fix_json = fix.to_json()
    parts = fix_json["held_out"]
    figures = markdown_table(["figure", "search", "held out"], [list(r) for r in held_out_rows(fix_json)])
    out = parts["held_out"]
    reached = {
        "failing flipped": out["flip_rate"],
        "benign kept": (out["benign"] or {}).get("answers_unchanged"),
        "near-miss kept": (out["near_miss"] or {}).get("answers_unchanged"),
    }
    targets = targets_table(reached)
    members = markdown_table(
        ["member", "intervention", "necessity", "sufficiency", "solo benign KL (nats)"],
        [
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
        ],
    )
    timing = markdown_table(
        ["stage", "wall s", "CPU s", "forward passes"],
        [
            [
                k,
                f"{v['seconds']:.0f}",
                f"{v['cpu_seconds']:.0f}" if "cpu_seconds" in v else "–",
                v.get("forward_passes", "–"),
            ]
            for k, v in stages.items()
        ],
    )
    counts = parts["split"]["counts"]
    split = ", ".join(f"{k} {v['search']}/{v['held_out']}" for k, v in counts.items())
    gate = "" if grid.gate_fired is None else f", gate fires on {grid.gate_fired:.0%}"
    return (
        "# Root-cause analysis on real SmolLM2-135M-Instruct (benchmarks/rca_smollm2.py)\n\n"
        f"Commit {commit()}. Settings: search_variants {args.search_variants}, confirm_variants "
        f"{args.confirm_variants}, refine_rounds {args.refine_rounds}, confirm_top 16, held_out_fraction "
        f"{parts['split']['fraction']}, split_seed {parts['split']['seed']}; CPU, {machine()['threads']} threads; "
        f"load average {load[0][0]:.1f} at the start, {load[1][0]:.1f} at the end (the machine was shared with "
        "other jobs: wall times are inflated, CPU times less so).\n\n"
        f"Split (search/held out): {split}. Fix: {len(fix.members)} member(s) of {fix.candidates} candidates; "
        f"threshold reached (decided by the {parts['decides'].replace('_', '-')} flip rate): {fix.reached_threshold}.\n\n"
        + figures
        + f"\n\nFresh clean prompts of the task × text grid in no prompt set ({grid.n_benign}): answers kept word for "
        f"word {grid.answers_unchanged:.0%}, mean KL {grid.mean_kl:.3g} nats{gate}.\n\n"
        + targets
        + "\n\n"
        + members
        + "\n\n"
        + timing
        + "\n\nCausal CCA forward passes by phase: "
        + ", ".join(f"{k} {v}" for k, v in fix.phase_passes.items())
        + "\n\nNotes:\n"
        + "".join(f"- {n}\n" for n in fix.notes)
    )


if __name__ == "__main__":
    main()
