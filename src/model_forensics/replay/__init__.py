"""Replay: SandboxReplayer, Session, interventions, batched sweeps, sandbox guard.

Modules: ``loading`` (SandboxReplayer: opens a bundle, resolves its model), ``session``
(Session: runs), ``environment`` (determinism, sandbox, recorded calls, forward-pass
counting), ``verification`` (weights and bit-identity checks), ``baselines`` (what
mean/resample/patch read), ``outcomes`` (reading outputs and verdicts), ``interventions``,
``sweep``, ``results``, ``sandbox``, ``isolation``.
"""

from model_forensics.replay.interventions import Gate, Intervention
from model_forensics.replay.loading import SandboxReplayer
from model_forensics.replay.results import RunResult, VerifyReport
from model_forensics.replay.sandbox import sandboxed
from model_forensics.replay.session import Session
from model_forensics.replay.sweep import SweepResult

__all__ = [
    "Gate",
    "Intervention",
    "RunResult",
    "SandboxReplayer",
    "Session",
    "SweepResult",
    "VerifyReport",
    "sandboxed",
]
