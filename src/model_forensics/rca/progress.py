"""Progress of an analysis, as data: a phase name, how much of it is done, and its total.

``analyze_bundle(..., progress=callback)`` and ``CausalCCA.search_fix_set(..., progress=…)``
call ``callback(phase, done, total)`` at the start of each phase (done 0), as it advances,
and at its end (done == total). The phases and what they count, in order:

=====================  ===========================================================
phase                  counts
=====================  ===========================================================
replay                 the bundle replayed and verified (1)
compression forensics  benign baseline runs captured
attribution            failing variants patched (forward + backward pass each)
failing variants       the incident's variants, each run clean
smallest-fix sweep     single units and pairs tried (all at once, per variant)
search: sites          attention/MLP sites tried, in rank order (at most; it stops early)
search: units          heads/neurons tried inside those sites (at most)
gating / narrowing     steps (1), only when the fix's side effects exceed the bound
members                failing variants the members' necessity/sufficiency run on
implicated             steps (1): exact patching of the top-ranked units
side effects           benign prompts the final set runs on
step gate: captures    search prompts generated and teacher-forced (rca/stepgate.py)
step gate: config…     search prompts each step-gate configuration generates on
=====================  ===========================================================

:func:`describe` renders one line ("search: units: 12/56 candidates"), which the CLI
prints when stderr is not a terminal.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]  # (phase, done, total)

UNITS: dict[str, str] = {
    "replay": "bundle",
    "compression forensics": "baseline runs",
    "attribution": "variants",
    "failing variants": "variants",
    "held-out variants": "variants",
    "smallest-fix sweep": "sets",
    "search: sites": "candidates",
    "search: units": "candidates",
    "gating": "steps",
    "narrowing": "steps",
    "members": "variants",
    "implicated": "steps",
    "side effects": "benign prompts",
    "step gate: captures": "prompts",
    "step gate: configurations": "prompts",
}


def silent(_phase: str, _done: int, _total: int) -> None:
    """The callback used when none is given."""


def describe(phase: str, done: int, total: int, eta_s: float | None = None) -> str:
    """One progress line: ``search: units: 12/56 candidates`` (and ``, about 4 s left``
    given ``eta_s``)."""
    line = f"{phase}: {done}/{total} {UNITS.get(phase, 'steps')}"
    if eta_s is not None and done < total:
        line += f", about {eta_s:.0f} s left"
    return line


def step(progress: Progress, phase: str) -> Callable[[], None]:
    """Report ``phase`` as one step: 0/1 now; call the result to report 1/1."""
    progress(phase, 0, 1)
    return lambda: progress(phase, 1, 1)
