"""Replay: SandboxReplayer, Session, interventions, batched sweeps, sandbox guard."""

from model_forensics.replay.interventions import Gate, Intervention
from model_forensics.replay.sandbox import sandboxed
from model_forensics.replay.session import RunResult, SandboxReplayer, Session, VerifyReport
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
