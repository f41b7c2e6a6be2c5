"""Where analyze's model time goes, call by call: generation split into prompt pass and decoding steps.

Runs ``benchmarks/rca_smollm2.py`` with every ``Session.execute`` (generation sweeps), every
prefix-shared teacher-forced pass (``_Prefix.scores``) and every whole-model teacher-forced pass
(``Session.forced``) timed, and each labelled with the analysis module that asked for it (the
innermost of ``rca/*.py`` on the stack, skipping the shared ``flips``, ``runs``, ``search``,
``cca`` and ``pipeline``; ``runs`` is left where nothing else is: the greedy search's sweeps).
A generation's first forward call is its prompt pass; the others are decoding steps.

Run: OMP_NUM_THREADS=1 .venv/bin/python scripts/trace_generation.py
     → benchmarks/results/rca_smollm2_trace.json (one row per call) and, with ``--summary``
     alone, the tables of benchmarks/results/rca_smollm2_trace.md from that JSON.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "rca_smollm2_trace.json"
SHARED = ("flips", "runs", "search", "cca", "pipeline")


def _phase() -> str:
    frame = sys._getframe(2)
    names = []
    while frame is not None:
        name = frame.f_code.co_filename
        if "/rca/" in name:
            names.append(os.path.basename(name)[:-3])
        frame = frame.f_back  # type: ignore[assignment]
    return next((n for n in names if n not in SHARED), names[0] if names else "other")


def trace() -> None:
    from model_forensics.models.inputs import ModelInputs
    from model_forensics.replay import session as session_module
    from model_forensics.replay import sweep

    log: list[dict[str, Any]] = []
    execute, scores, forced = session_module.Session.execute, sweep._Prefix.scores, session_module.Session.forced

    def timed_execute(self: Any, batch: Any, rows: Any, *args: Any, **kwargs: Any) -> Any:
        calls: list[float] = []
        start: dict[str, float] = {}
        before = self.model.register_forward_pre_hook(lambda *_: start.__setitem__("t", time.perf_counter()))
        after = self.model.register_forward_hook(lambda *_: calls.append(time.perf_counter() - start["t"]))
        wall = time.perf_counter()
        try:
            out = execute(self, batch, rows, *args, **kwargs)
        finally:
            before.remove()
            after.remove()
        kind = "generation" if self.mode == "generate" else "forward"
        log.append({"kind": kind, "phase": _phase(), "rows": len(rows), "tokens": ModelInputs.of(batch).length,
                    "s": time.perf_counter() - wall, "prompt_pass_s": calls[0] if calls else 0.0,
                    "decode_s": sum(calls[1:]), "steps": max(0, len(calls) - 1)})  # fmt: skip
        return out

    def timed_scores(self: Any, rows: Any, starts: Any, keep: int, prompt_len: int) -> Any:
        wall = time.perf_counter()
        out = scores(self, rows, starts, keep, prompt_len)
        log.append({"kind": "forced, prefix-shared", "phase": _phase(), "rows": len(rows), "tokens": self.prompt_len,
                    "s": time.perf_counter() - wall})  # fmt: skip
        return out

    def timed_forced(self: Any, batch: Any, rows: Any, prompt_len: int | None = None) -> Any:
        wall = time.perf_counter()
        out = forced(self, batch, rows, prompt_len)
        log.append({"kind": "forced, whole model", "phase": _phase(), "rows": len(rows),
                    "tokens": ModelInputs.of(batch).length, "s": time.perf_counter() - wall})  # fmt: skip
        return out

    session_module.Session.execute = timed_execute  # type: ignore[method-assign]
    sweep._Prefix.scores = timed_scores  # type: ignore[method-assign]
    session_module.Session.forced = timed_forced  # type: ignore[method-assign]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import rca_smollm2

    sys.argv = ["rca_smollm2.py"]
    try:
        rca_smollm2.main()
    finally:
        OUT.write_text(json.dumps(log))


def summary(log: list[dict[str, Any]]) -> str:
    """The tables of the .md: by module and kind of call, then generation's totals."""
    groups: dict[tuple[str, str], collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for e in log:
        g = groups[(e["phase"], e["kind"])]
        g["calls"] += 1
        g["s"] += e["s"]
        g["rows"] += e["rows"]
        for key in ("prompt_pass_s", "decode_s", "steps"):
            g[key] += e.get(key, 0)
        g["small"] += e["kind"] == "generation" and e["rows"] <= 2
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import markdown_table

    headers = ["module", "kind", "calls", "s", "rows", "rows per call", "prompt pass s", "decoding s", "decoding steps",
               "sweeps of ≤ 2 rows"]  # fmt: skip
    rows = []
    for (phase, kind), g in sorted(groups.items(), key=lambda kv: -kv[1]["s"]):
        gen = kind == "generation"
        cells = (
            [f"{g['prompt_pass_s']:.0f}", f"{g['decode_s']:.0f}", str(g["steps"]), str(g["small"])]
            if gen
            else ["–"] * 4
        )
        rows.append([phase, kind, g["calls"], f"{g['s']:.0f}", g["rows"], f"{g['rows'] / g['calls']:.1f}", *cells])
    lines = [markdown_table(headers, rows)]
    gen = [e for e in log if e["kind"] == "generation"]
    steps = sum(e["steps"] for e in gen)
    decode = sum(e["decode_s"] for e in gen)
    lines += [
        "",
        f"Logged calls: {sum(e['s'] for e in log):.0f} s. Generation: {sum(e['s'] for e in gen):.0f} s in {len(gen)} sweeps "
        f"(prompt passes {sum(e['prompt_pass_s'] for e in gen):.0f} s, decoding {decode:.0f} s over {steps} steps, "
        f"{1000 * decode / max(1, steps):.0f} ms a step, {sum(e['rows'] for e in gen) / max(1, len(gen)):.1f} rows a sweep).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["--summary"]:
        print(summary(json.loads(OUT.read_text())))
    else:
        trace()
