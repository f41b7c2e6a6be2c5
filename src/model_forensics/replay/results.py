"""What a replay returns: :class:`RunResult` (one run), :class:`VerifyReport` (replay against
the recording) and its :class:`SiteCheck` rows. Plain data with ``to_json()``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from model_forensics.core.records import fields_json
from model_forensics.replay.interventions import Intervention


@dataclass
class SiteCheck:
    """One site (or output) compared between recording and replay."""

    site: str
    identical: bool
    recorded_sha256: str | None
    replayed_sha256: str | None
    max_abs_diff: float | None = None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class VerifyReport:
    """The result of :meth:`Session.verify`: per-site and per-output sha256 comparisons.

    ``max_abs_diff`` of a differing site is measured against the bundle's stored sketch
    (exact for ``full`` sketches, approximate otherwise; the note says which). ``verdict``
    compares the manifest's ``output.text`` and ``predicate.holds`` with the replay's.
    """

    bit_identical: bool
    sites: list[SiteCheck]
    outputs: list[SiteCheck]
    forward_passes: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    verdict: list[SiteCheck] = field(default_factory=list)

    @property
    def differing(self) -> list[SiteCheck]:
        """Sites, outputs and the recorded verdict (``output.text``, ``predicate.holds``)
        where the replay differs from the manifest."""
        return [c for c in self.sites + self.outputs + self.verdict if not c.identical]

    def summary(self) -> str:
        n = len(self.sites)
        if self.bit_identical:
            verdict = f"; recorded {' and '.join(c.site for c in self.verdict)} confirmed" if self.verdict else ""
            return f"bit-identical: {n} sites and {len(self.outputs)} outputs match their recorded sha256{verdict}"
        worst = ", ".join(
            f"{c.site} (max |Δ| {c.max_abs_diff:.3g})" if c.max_abs_diff is not None else f"{c.site} ({c.note})"
            for c in self.differing[:5]
        )
        notes = f" ({'; '.join(self.notes)})" if self.notes else ""
        return (
            f"NOT bit-identical: {len(self.differing)} of {n + len(self.outputs) + len(self.verdict)} differ: {worst}"
            + notes
        )

    def to_json(self) -> dict[str, Any]:
        return fields_json(
            self,
            summary=self.summary(),
            sites=[c.to_json() for c in self.sites],
            outputs=[c.to_json() for c in self.outputs],
            verdict=[c.to_json() for c in self.verdict],
            notes=list(self.notes),
        )


@dataclass
class RunResult:
    """One replay, with or without interventions.

    Attributes:
        interventions: what was changed.
        failed: the failure predicate holds on this run's output (None: no predicate).
        flipped: the unchanged run failed and this one does not (None: unknown).
        text: generated continuation (generation) or decoded next token (forward).
        prediction: argmax of ``logits``.
        logits: (V,) or (C,): the scores the predicate reads (last step, last position).
        outputs: ``logits`` (S, V) per-step last-position scores (S = 1 for a forward
            pass); ``generated_ids`` (T_prompt + S,) for generation.
        forward_passes: forward calls the run (or its sweep batch) took.
        gates: for each gated intervention, keyed by its site, whether its gate opened in
            this run (True: the intervention applied; False: the run was left unchanged).
    """

    interventions: list[Intervention]
    failed: bool | None
    flipped: bool | None
    text: str | None
    prediction: int
    logits: torch.Tensor
    outputs: dict[str, torch.Tensor]
    forward_passes: int
    gates: dict[str, bool] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        top = torch.topk(self.logits.float(), k=min(5, self.logits.numel()))
        return {
            "interventions": [iv.to_json() for iv in self.interventions],
            "failed": self.failed,
            "flipped": self.flipped,
            "text": self.text,
            "prediction": self.prediction,
            "top": [[int(i), float(v)] for v, i in zip(top.values, top.indices, strict=True)],
            "forward_passes": self.forward_passes,
            "gates": dict(self.gates),
        }
