"""Where the time of ``benchmarks/rca_smollm2.py`` goes, from a py-spy profile of it.

py-spy is not a project dependency (``pip install py-spy``). Record, then summarise::

    OMP_NUM_THREADS=1 py-spy record --nonblocking -r 5 -f raw -o /tmp/smol.spy -- \\
        .venv/bin/python benchmarks/rca_smollm2.py
    .venv/bin/python scripts/profile_phases.py /tmp/smol.spy > benchmarks/results/rca_smollm2_profile.md

Every sample is put in the benchmark stage on its stack (the ``stage(...)`` line of
rca_smollm2.py it runs under), in the CausalCCA phase (the outermost phase function on the
stack) and in one kind of work: generation, a teacher-forced pass entering at a block
(prefix-shared), a whole-model teacher-forced pass, a clean-prefix capture, an activation
capture, or anything else. Shares are of all samples.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "rca_smollm2.py"
# outermost phase function on a CausalCCA stack → the phase name the benchmark's pass counts use
PHASES = {
    "failing_variants": "variants",
    "smallest_fix": "smallest",
    "greedy": "search",
    "minimise": "search",
    "refine": "search",
    "coarse_to_fine": "search",
    "exhaustive": "search",
    "gate_if_it_helps": "gating",
    "fit_gate": "gating",
    "narrow_if_it_helps": "narrowing",
    "score_members": "members",
    "implicated_units": "implicated",
    "implicated": "implicated",
    "side_effects": "side_effects",
    "measure": "side_effects",
}
KINDS = (  # the first that matches a stack names its kind
    ("generation", ("generate", "_sample")),
    ("clean-prefix capture", ("_prefix_for",)),
    ("teacher-forced, prefix-shared (entering at a block)", ("scores", "tail")),
    ("teacher-forced, whole model", ("forced_answers", "_forced", "divergences", "clean_answer", "forced")),
    ("activation capture", ("capture", "_capture", "capture_prompt")),
)


def stage_lines() -> dict[int, str]:
    """Line number of each ``stage("name", lambda: …)`` call in the benchmark → its name."""
    lines: dict[int, str] = {}
    after: dict[int, str] = {}
    pending: int | None = None
    for number, text in enumerate(BENCHMARK.read_text().splitlines(), start=1):
        found = re.search(r'stage\(\s*"([^"]+)"', text)
        if text.rstrip().endswith("stage("):
            pending = number
        elif found or (pending is not None and (found := re.search(r'^\s*"([^"]+)"', text))):
            lines[number] = found[1]
            if pending is not None:
                lines[pending] = found[1]
            after.setdefault(number + 1, found[1])  # a lambda on the line after the name
            pending = None
    return {**after, **lines}


def summarise(raw: Path) -> str:
    stages_at = stage_lines()
    total = 0
    stages: Counter[str] = Counter()
    phases: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    cross: Counter[tuple[str, str]] = Counter()  # (stage, or "causal CCA: phase") × kind
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        names = [f.split(" (")[0].split(".")[-1] for f in frames]
        stage = "record and load"
        for frame in frames:
            at = re.match(r"main\.<locals>\.<lambda> \(rca_smollm2\.py:(\d+)\)", frame)
            if at:
                stage = stages_at.get(int(at[1]), f"line {at[1]}")
        stages[stage] += n
        part = stage
        if stage == "causal CCA":
            phase = next((PHASES[s] for s in names if s in PHASES), "other")
            phases[phase] += n
            part = f"causal CCA: {phase}"
        kind = next((kind for kind, marks in KINDS if any(m in names for m in marks)), "other")
        kinds[kind] += n
        cross[(part, kind)] += n

    def table(title: str, counts: Counter[str]) -> str:
        rows = "\n".join(f"| {k} | {100 * v / total:.1f}% |" for k, v in counts.most_common())
        return f"| {title} | share of all samples |\n|---|---|\n{rows}\n"

    parts = Counter[str]()
    for (part, _kind), v in cross.items():
        parts[part] += v
    columns = [kind for kind, _ in kinds.most_common()]
    head = "| stage or phase | all | " + " | ".join(columns) + " |\n|---|---|" + "---|" * len(columns) + "\n"
    body = "".join(
        f"| {part} | {100 * v / total:.1f}% | "
        + " | ".join(f"{100 * cross[(part, c)] / total:.1f}%" for c in columns)
        + " |\n"
        for part, v in parts.most_common()
    )
    return (
        f"{total} samples.\n\n"
        + table("benchmark stage", stages)
        + "\n"
        + table("causal CCA phase", phases)
        + "\n"
        + table("kind of work", kinds)
        + "\n"
        + head
        + body
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", type=Path, help="py-spy's raw output (-f raw)")
    print(summarise(parser.parse_args().raw))


if __name__ == "__main__":
    main()
