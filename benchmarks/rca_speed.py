"""Analysis wall time: ``analyze`` end to end on each zoo scenario (and, with ``--smollm2``,
the real SmolLM2 injection incident), per phase.

Each scenario's first incident is recorded into a temporary directory, then analysed by
``analyze_bundle`` (replay → CF → attribution → CausalCCA → held-out figures, the default
config), with a progress callback that timestamps every phase. Per phase: wall seconds, CPU
seconds of this process, forward passes as batches (forward calls) and as model rows
(prompt × intervention set: the batch size of every call summed). Per scenario: the flip
rate and the side effects reached, and the peak RSS of the process so far
(``resource.getrusage``; it only grows, so the SmolLM2 figure is taken in its own run).

``--profile NAME`` runs cProfile on one scenario instead and prints the top functions.

Run: .venv/bin/python benchmarks/rca_speed.py [--smollm2] [--only NAME ...]
     → benchmarks/results/rca_speed.{json,md}
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from _common import commit, machine, markdown_table, median, write_results
from model_forensics import SandboxReplayer
from model_forensics.rca.pipeline import analyze_bundle
from model_forensics.scenarios import get, names

RESULTS_NAME = "rca_speed"


def zoo_scenarios() -> list[str]:
    return [n for n in names() if str(get(n).model).startswith("zoo:")]


class PhaseClock:
    """Wall, CPU, batches and rows per progress phase (a phase lasts until the next one starts)."""

    def __init__(self) -> None:
        self.session: Any = None
        self.phases: dict[str, dict[str, float]] = {}
        self.current: str | None = None
        self.mark = self._now()

    def _now(self) -> tuple[float, float, int, int]:
        counter = None if self.session is None else self.session.counter
        return (
            time.perf_counter(),
            time.process_time(),
            0 if counter is None else counter.passes,
            0 if counter is None else counter.rows,
        )

    def switch(self, phase: str | None) -> None:
        now = self._now()
        if self.current is not None:
            row = self.phases.setdefault(self.current, {"wall_s": 0.0, "cpu_s": 0.0, "batches": 0, "rows": 0})
            row["wall_s"] += now[0] - self.mark[0]
            row["cpu_s"] += now[1] - self.mark[1]
            row["batches"] += now[2] - self.mark[2]
            row["rows"] += now[3] - self.mark[3]
        self.current, self.mark = phase, now

    def __call__(self, phase: str, done: int, total: int) -> None:
        name = {"search: sites": "search", "search: units": "search"}.get(phase, phase)
        if name != self.current:
            self.switch(name)


def analyse(name: str, tmp: Path) -> dict[str, Any]:
    """Record ``name``'s first incident and analyse it as ``analyze_bundle`` does, timed per phase."""
    return analyse_bundle(get(name).record(tmp / name, limit=1).incidents[0])


def analyse_bundle(bundle: Path) -> dict[str, Any]:
    """``analyze_bundle`` (the default config), timed per phase; the session it loads is
    borrowed for its pass counter."""
    clock = PhaseClock()
    load = SandboxReplayer.load_bundle

    def load_and_keep(self: SandboxReplayer, *args: Any, **kwargs: Any) -> Any:
        clock.session = load(self, *args, **kwargs)  # its load's passes count under "replay"
        return clock.session

    start_wall, start_cpu = time.perf_counter(), time.process_time()
    SandboxReplayer.load_bundle = load_and_keep  # type: ignore[method-assign]
    try:
        analysis = analyze_bundle(bundle, progress=clock)
    finally:
        SandboxReplayer.load_bundle = load  # type: ignore[method-assign]
    clock.switch(None)
    fix = analysis.fix_set or {}
    se = fix.get("side_effects") or {}
    held = fix.get("held_out") or {}
    session = clock.session
    return {
        "wall_s": time.perf_counter() - start_wall,
        "cpu_s": time.process_time() - start_cpu,
        "batches": session.counter.passes,
        "rows": session.counter.rows,
        "phases": clock.phases,
        "flip_rate": fix.get("total_flip_rate"),
        "held_out_flip_rate": (fix.get("flip_rate") or {}).get("held_out"),
        "held_out": held,
        "reached_threshold": fix.get("reached_threshold"),
        "size": len(fix.get("members", [])),
        "units": [m["unit"] for m in fix.get("members", [])],
        "benign_kl": se.get("mean_kl"),
        "answers_unchanged": se.get("answers_unchanged"),
        "accuracy_drop": se.get("accuracy_drop"),
        "within_bound": se.get("within_bound"),
        "phase_passes": fix.get("phase_passes"),
        "notes": fix.get("notes"),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def render(data: dict[str, Any]) -> str:
    lines = [
        "# Analysis wall time (benchmarks/rca_speed.py)",
        "",
        f"Commit {data['commit']}; {data['machine']['threads']} torch threads; load average "
        f"{data['load_before']} before, {data['load_after']} after (the machine is shared with other jobs: "
        "CPU time is the steadier figure). Default config; each scenario's first incident.",
        "",
    ]
    rows = []
    for name, r in data["scenarios"].items():
        kl = "–" if r["benign_kl"] is None else f"{r['benign_kl']:.3g}"
        rows.append(
            [
                name,
                f"{r['wall_s']:.1f}",
                f"{r['cpu_s']:.1f}",
                r["batches"],
                r["rows"],
                f"{r['flip_rate']:.0%}",
                "–" if r["held_out_flip_rate"] is None else f"{r['held_out_flip_rate']:.0%}",
                r["size"],
                kl,
                "–" if r["within_bound"] is None else r["within_bound"],
                f"{r['peak_rss_mb']:.0f}",
            ]
        )
    headers = [
        "scenario",
        "wall s",
        "CPU s",
        "batches",
        "rows",
        "flip rate",
        "held-out flip rate",
        "size",
        "benign KL",
        "in bound",
        "peak RSS MB",
    ]
    lines += [markdown_table(headers, rows), ""]
    for name, r in data["scenarios"].items():
        lines += [f"## {name}: by phase", ""]
        phase_rows = [
            [p, f"{v['wall_s']:.2f}", f"{v['cpu_s']:.2f}", int(v["batches"]), int(v["rows"])]
            for p, v in r["phases"].items()
        ]
        lines += [markdown_table(["phase", "wall s", "CPU s", "batches", "rows"], phase_rows), ""]
        lines += [f"Fix set: {', '.join(r['units'])}", ""]
    return "\n".join(lines)


def profile(name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        profiler = cProfile.Profile()
        profiler.enable()
        result = analyse(name, Path(tmp))
        profiler.disable()
    print({k: v for k, v in result.items() if k != "phases"})
    for phase, v in result["phases"].items():
        print(
            f"{phase:24s} {v['wall_s']:7.2f} s wall {v['cpu_s']:7.2f} s CPU {v['batches']:6d} batches {v['rows']:7d} rows"
        )
    stats = pstats.Stats(profiler).sort_stats("cumulative")
    stats.print_stats(45)


def compare(names_: list[str], rounds: int) -> None:
    """The teacher-forced screen on (wherever it is exact, whatever the model's size) and off
    (:mod:`model_forensics.rca.flips`), side by side in one process, rounds interleaved: CPU
    and wall time (medians), rows, and whether the results are identical."""
    from model_forensics.rca import flips

    screens = flips.screens
    conditions = {"screen on": flips.exact, "screen off": lambda _session: False}
    out: dict[str, Any] = {"commit": commit(), "machine": machine(), "rounds": rounds, "scenarios": {}}
    out["load_before"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        for name in names_:
            bundle = get(name).record(Path(tmp) / name, limit=1).incidents[0]
            runs: dict[str, list[dict[str, Any]]] = {c: [] for c in conditions}
            for _ in range(rounds):
                for label, fn in conditions.items():
                    flips.screens = fn  # type: ignore[assignment]
                    try:
                        runs[label].append(analyse_bundle(bundle))
                    finally:
                        flips.screens = screens  # type: ignore[assignment]
            keys = ("units", "flip_rate", "benign_kl", "answers_unchanged", "accuracy_drop", "notes")
            first = {c: {k: r[0][k] for k in keys} for c, r in runs.items()}
            out["scenarios"][name] = {
                c: {
                    "cpu_s": [x["cpu_s"] for x in r],
                    "wall_s": [x["wall_s"] for x in r],
                    "rows": r[0]["rows"],
                    "batches": r[0]["batches"],
                }
                for c, r in runs.items()
            }
            out["scenarios"][name]["identical"] = first["screen on"] == first["screen off"]
            print(name, out["scenarios"][name], flush=True)
    out["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = []
    for name, r in out["scenarios"].items():
        on, off = r["screen on"], r["screen off"]
        rows.append(
            [
                name,
                f"{median(off['cpu_s']):.1f}",
                f"{median(on['cpu_s']):.1f}",
                f"{median(off['cpu_s']) / median(on['cpu_s']):.2f}",
                f"{median(off['wall_s']):.1f}",
                f"{median(on['wall_s']):.1f}",
                f"{off['batches']} / {off['rows']}",
                f"{on['batches']} / {on['rows']}",
                r["identical"],
            ]
        )
    headers = ["scenario", "CPU s off", "CPU s on", "CPU ratio", "wall s off", "wall s on"]
    headers += ["batches / rows off", "batches / rows on", "identical results"]
    text = (
        "# Teacher-forced screen, on and off (benchmarks/rca_speed.py --compare)\n\n"
        f"Commit {out['commit']}; {out['machine']['threads']} torch threads; medians of {rounds} interleaved "
        f"rounds; load average {out['load_before']} before, {out['load_after']} after (shared machine).\n\n"
        + markdown_table(headers, rows)
    )
    print(text)
    write_results(f"{RESULTS_NAME}_screen", out, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2", action="store_true", help="also the real SmolLM2 injection incident")
    parser.add_argument("--only", nargs="*", help="these scenarios only")
    parser.add_argument("--profile", help="cProfile one scenario and print where the time goes")
    parser.add_argument("--name", default=RESULTS_NAME, help="results file name under benchmarks/results/")
    parser.add_argument("--compare", action="store_true", help="the teacher-forced screen on and off, side by side")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of --compare")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.profile:
        profile(args.profile)
        return
    if args.compare:
        compare(args.only or ["gpt2-injection", "gpt2-toxic"], args.rounds)
        return
    chosen = args.only or zoo_scenarios() + (["smollm2-injection"] if args.smollm2 else [])
    data: dict[str, Any] = {
        "machine": machine(),
        "commit": commit(),
        "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "scenarios": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in chosen:
            data["scenarios"][name] = result = analyse(name, Path(tmp))
            print(
                f"{name}: {result['wall_s']:.1f} s wall, {result['cpu_s']:.1f} s CPU, flip {result['flip_rate']:.0%}",
                flush=True,
            )
    data["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    text = render(data)
    print(text)
    write_results(args.name, data, text)


if __name__ == "__main__":
    main()
