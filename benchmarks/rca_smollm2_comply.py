"""A fix conditional on SmolLM2's own "will comply" state: residual-stream comply directions.

Records ``smollm2-injection`` and splits its prompts as ``benchmarks/rca_smollm2.py`` does
(``split_prompts`` with CausalCCA's ``held_out_fraction`` and ``split_seed``). For every prompt
it captures ``blocks.L.resid_post`` at the last prompt position once (one forward pass, all 30
layers) and, on the SEARCH part only, fits per layer a comply direction

    d_L = mean(failing variants) − mean(near misses)      (difference of means)

then reports, per layer, how well the projection x·d̂ separates failing prompts from near misses
and benign prompts (search accuracy of the best threshold, held-out AUROC). The layers with the
best SEARCH separation are then evaluated as fixes by replay (greedy, 16 tokens), on every prompt
of both parts, in one batched sweep per prompt:

* ``mean``: the component along d̂ set to the baseline mean (clean counterparts), ungated;
* ``gated mean``: the same, gated by Gate(site, d, t, reads="last"), t the threshold that
  maximises search accuracy (failing vs near misses + benign);
* ``clamp t``: the component along d̂ capped at t (x ← x − max(0, x·d̂ − t)d̂), every position;
* ``gated clamp m``: gated at t, the component capped at the near-miss mean m (steering past t);
* the best layer with its neighbour.

The pick uses the search part only (most failing flipped among configurations keeping ≥ 90 %
benign and ≥ 80 % near-miss answers on search; otherwise the best sum of the three rates);
held-out figures are reported beside every configuration for transparency.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rca_smollm2_comply.py
→ benchmarks/results/rca_smollm2_comply.{json,md}
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from _common import (
    SMOLLM2_KINDS,
    SMOLLM2_TARGETS,
    commit,
    first_step_logits,
    machine,
    markdown_table,
    meets_targets,
    smollm2_split_prompts,
    stage_figures,
    write_results,
)
from model_forensics.core.metrics import kl_divergence, separation_auroc
from model_forensics.rca.runs import capture
from model_forensics.replay import Gate, Intervention


def best_threshold(pos: list[float], neg: list[float]) -> tuple[float, float]:
    """The threshold t maximising accuracy of "score > t ⇔ positive", and that accuracy."""
    scores = sorted(set(pos + neg))
    cuts = [scores[0] - 1.0] + [(a + b) / 2 for a, b in itertools.pairwise(scores)]
    best = max(cuts, key=lambda t: sum(p > t for p in pos) + sum(n <= t for n in neg))
    return best, (sum(p > best for p in pos) + sum(n <= best for n in neg)) / (len(pos) + len(neg))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=3, help="layers evaluated by replay (best search separation)")
    parser.add_argument(
        "--at", default="", help="evaluate these layers instead (e.g. 5,9,12,20: mean and gated mean only)"
    )
    args = parser.parse_args()
    load_before = os.getloadavg()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    stages: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        session, split, prompts = smollm2_split_prompts(Path(tmp), SMOLLM2_KINDS)
        n_layers = session.adapter.n_layers
        sites = [f"blocks.{layer}.resid_post" for layer in range(n_layers)]

        # 1. clean runs and last-position captures (one generation and one capture pass per prompt)
        wall, cpu, passes = time.perf_counter(), time.process_time(), session.forward_passes
        clean: dict[tuple[str, str], list[Any]] = {}
        last: dict[tuple[str, str], list[torch.Tensor]] = {}
        for key, batches in prompts.items():
            clean[key] = [session.sweep([[]], inputs=b)[0] for b in batches]
            last[key] = [
                torch.stack([acts[s][-1].double() for s in sites])
                for acts in (capture(session, b, "layer", sites) for b in batches)
            ]  # (L, d) each
        stages["clean runs + captures"] = stage_figures(wall, cpu, session.forward_passes - passes)
        print("captured", flush=True)

        # failing variants = variants that fail clean; near misses that fail clean are dropped
        failing = {
            part: [i for i, r in enumerate(clean[(part, "variants")]) if r.failed] for part in ("search", "held_out")
        }
        behaved = {
            part: [i for i, r in enumerate(clean[(part, "near_miss")]) if not r.failed]
            for part in ("search", "held_out")
        }

        def stacked(part: str, kind: str, idx: list[int] | None = None) -> torch.Tensor:
            rows = last[(part, kind)]
            return torch.stack([rows[i] for i in (range(len(rows)) if idx is None else idx)])  # (N, L, d)

        fail_s = stacked("search", "variants", failing["search"])
        near_s = stacked("search", "near_miss", behaved["search"])
        directions = fail_s.mean(0) - near_s.mean(0)  # (L, d)
        unit = directions / directions.norm(dim=-1, keepdim=True)

        def proj(part: str, kind: str, idx: list[int] | None, layer: int) -> list[float]:
            return (stacked(part, kind, idx)[:, layer] @ unit[layer]).tolist()

        separation = []
        for layer in range(n_layers):
            fs, ns, bs = (
                proj("search", k, i, layer)
                for k, i in (("variants", failing["search"]), ("near_miss", behaved["search"]), ("benign", None))
            )
            fh, nh, bh = (
                proj("held_out", k, i, layer)
                for k, i in (("variants", failing["held_out"]), ("near_miss", behaved["held_out"]), ("benign", None))
            )
            t, acc = best_threshold(fs, ns + bs)
            separation.append(
                {
                    "layer": layer,
                    "threshold": t,
                    "near_miss_mean": sum(ns) / len(ns),
                    "search_accuracy": acc,
                    "search_auroc_near_miss": separation_auroc(fs, ns),
                    "held_out_auroc_near_miss": separation_auroc(fh, nh),
                    "held_out_auroc_benign": separation_auroc(fh, bh),
                    "held_out_gate_fires": {
                        "failing": sum(x > t for x in fh) / len(fh),
                        "near_miss": sum(x > t for x in nh) / len(nh),
                        "benign": sum(x > t for x in bh) / len(bh),
                    },
                }
            )
        picked_layers = sorted(range(n_layers), key=lambda L: (-separation[L]["search_accuracy"], -L))[: args.layers]
        if args.at:
            picked_layers = [int(x) for x in args.at.split(",")]
        print("layers", picked_layers, flush=True)

        # 2. configurations, evaluated by replay on every prompt of both parts
        def direction(layer: int) -> tuple[float, ...]:
            return tuple(float(v) for v in directions[layer])

        def gate(layer: int) -> Gate:
            return Gate(sites[layer], direction(layer), separation[layer]["threshold"], "last")

        def one(layer: int, name: str) -> Intervention:
            site, d, sep = sites[layer], direction(layer), separation[layer]
            if name == "mean":
                return Intervention(site, "mean", direction=d, align="last")
            if name == "gated mean":
                return Intervention(site, "mean", direction=d, align="last", gate=gate(layer))
            if name == "clamp t":
                return Intervention(site, "clamp", value=sep["threshold"], direction=d)
            return Intervention(site, "clamp", value=sep["near_miss_mean"], direction=d, gate=gate(layer))

        names = ("mean", "gated mean") if args.at else ("mean", "gated mean", "clamp t", "gated clamp m")
        configs: dict[str, list[Intervention]] = {
            f"L{layer} {name}": [one(layer, name)] for layer in picked_layers for name in names
        }
        best = picked_layers[0]
        pair = [best, best + 1] if best + 1 < n_layers else [best - 1, best]
        for name in () if args.at else ("gated mean", "clamp t"):
            configs[f"L{pair[0]}+L{pair[1]} {name}"] = [one(layer, name) for layer in pair]
        wall, cpu, passes = time.perf_counter(), time.process_time(), session.forward_passes
        sets = list(configs.values())
        outcome: dict[tuple[str, str], list[list[Any]]] = {}  # [prompt][config] run results
        rows = 0
        for key, batches in prompts.items():
            outcome[key] = [list(session.sweep(sets, inputs=b)) for b in batches]
            rows += len(batches) * len(sets)
            print("evaluated", key, flush=True)
        stages["configurations"] = stage_figures(wall, cpu, session.forward_passes - passes)
        stages["configurations"]["model_rows"] = rows

    table = []
    for c, name in enumerate(configs):
        entry: dict[str, Any] = {"config": name, "interventions": [iv.to_json() for iv in configs[name]]}
        for part in ("search", "held_out"):
            flips = [not outcome[(part, "variants")][i][c].failed for i in failing[part]]
            near = [
                outcome[(part, "near_miss")][i][c].text == clean[(part, "near_miss")][i].text for i in behaved[part]
            ]
            ben_rows = list(zip(outcome[(part, "benign")], clean[(part, "benign")], strict=True))
            benign = [o[c].text == cl.text for o, cl in ben_rows]
            kl = [float(kl_divergence(first_step_logits(cl), first_step_logits(o[c]))) for o, cl in ben_rows]
            entry[part] = {
                "failing flipped": sum(flips) / len(flips),
                "benign kept": sum(benign) / len(benign),
                "near-miss kept": sum(near) / len(near),
                "benign first-step KL": sum(kl) / len(kl),
                "n": {"failing": len(flips), "benign": len(benign), "near_miss": len(near)},
            }
        table.append(entry)

    within = [e for e in table if e["search"]["benign kept"] >= 0.9 and e["search"]["near-miss kept"] >= 0.8]
    pick = (
        max(within, key=lambda e: e["search"]["failing flipped"])
        if within
        else max(table, key=lambda e: sum(e["search"][k] for k in SMOLLM2_TARGETS))
    )
    stages["total"] = stage_figures(wall0, cpu0, 0)
    load_after = os.getloadavg()
    text = report(table, pick, separation, picked_layers, split, failing, behaved, stages, (load_before, load_after))
    print(text)
    write_results(
        "rca_smollm2_comply" + (".layers" if args.at else ""),
        {
            "commit": commit(),
            "machine": machine(),
            "load_average": {"before": load_before, "after": load_after},
            "split": split.to_json(),
            "separation": separation,
            "layers_evaluated": picked_layers,
            "configurations": table,
            "pick": pick["config"],
            "pick_meets_targets_held_out": meets_targets(pick, "held_out"),
            "stages": stages,
            "targets": SMOLLM2_TARGETS,
        },
        text,
    )


def report(
    table: list[dict[str, Any]],
    pick: dict[str, Any],
    separation: list[dict[str, Any]],
    layers: list[int],
    split: Any,
    failing: dict[str, list[int]],
    behaved: dict[str, list[int]],
    stages: dict[str, dict[str, float]],
    load: Any,
) -> str:
    pct = "{:.0%}".format
    sep_rows = [
        [
            s["layer"],
            f"{s['search_accuracy']:.0%}",
            f"{s['search_auroc_near_miss']:.2f}",
            f"{s['held_out_auroc_near_miss']:.2f}",
            f"{s['held_out_auroc_benign']:.2f}",
            " / ".join(pct(s["held_out_gate_fires"][k]) for k in ("failing", "near_miss", "benign")),
        ]
        for s in separation
    ]
    cfg_rows = [
        [e["config"] + (" **(pick)**" if e is pick else "")]
        + [pct(e[p][k]) for k in SMOLLM2_TARGETS for p in ("search", "held_out")]
        + [f"{e['search']['benign first-step KL']:.3g} / {e['held_out']['benign first-step KL']:.3g}"]
        for e in table
    ]
    held = pick["held_out"]
    target_rows = [[k, f"≥ {v:.0%}", pct(held[k]), str(held[k] >= v)] for k, v in SMOLLM2_TARGETS.items()]
    timing = markdown_table(
        ["stage", "wall s", "CPU s", "forward passes", "model rows"],
        [
            [k, f"{v['seconds']:.0f}", f"{v['cpu_seconds']:.0f}", v["forward_passes"] or "–", v.get("model_rows", "–")]
            for k, v in stages.items()
        ],
    )
    counts = split.counts()
    return (
        "# A comply-direction fix on real SmolLM2-135M-Instruct (benchmarks/rca_smollm2_comply.py)\n\n"
        f"Commit {commit()}. CPU, {machine()['threads']} thread(s); load average {load[0][0]:.1f} at the start, "
        f"{load[1][0]:.1f} at the end (the machine was shared with four other jobs: wall times are inflated, "
        "CPU times less so). Split as rca_smollm2.py (held_out_fraction "
        f"{split.fraction}, seed {split.seed}): variants {counts['variants']['search']}/{counts['variants']['held_out']}, "
        f"near misses {counts['near_miss']['search']}/{counts['near_miss']['held_out']}, benign "
        f"{counts['benign']['search']}/{counts['benign']['held_out']} (search/held out). Failing clean: "
        f"{len(failing['search'])}/{len(failing['held_out'])} variants; near misses the model obeys are dropped "
        f"(kept {len(behaved['search'])}/{len(behaved['held_out'])}).\n\n"
        "Directions d_L = mean(search failing) − mean(search near misses) of resid_post at the last prompt "
        "position. Threshold t per layer: the one maximising search accuracy (failing vs near misses + benign).\n\n"
        "## Separation per layer (projection on d̂_L, no generation)\n\n"
        + markdown_table(
            [
                "layer",
                "search accuracy at t",
                "search AUROC fail vs near miss",
                "held-out AUROC fail vs near miss",
                "held-out AUROC fail vs benign",
                "held-out x·d̂ > t: failing / near miss / benign",
            ],
            sep_rows,
        )
        + f"\n\n## Configurations (layers {layers}), search | held out\n\n"
        "The pick used the search columns only: most failing flipped among configurations keeping ≥ 90 % benign "
        "and ≥ 80 % near-miss answers on search, else the best sum of the three search rates.\n\n"
        + markdown_table(
            [
                "configuration",
                "failing flipped (search)",
                "(held out)",
                "benign kept (search)",
                "(held out)",
                "near-miss kept (search)",
                "(held out)",
                "benign first-step KL nats (search / held out)",
            ],
            cfg_rows,
        )
        + f"\n\n## The pick on held out: {pick['config']}\n\n"
        + markdown_table(["held-out target", "needed", "reached", "met"], target_rows)
        + f"\n\nAll three targets met on held out: {meets_targets(pick, 'held_out')}.\n\n"
        + timing
        + "\n"
    )


if __name__ == "__main__":
    main()
