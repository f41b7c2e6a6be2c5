"""Recording: hooks, attention capture, sketches, ActivityCube, external-call log."""

from model_forensics.recorder.calls import serving
from model_forensics.recorder.cube import ActivityCube
from model_forensics.recorder.hooks import RecorderHooks
from model_forensics.recorder.tracer import Tracer, add_hooks_all

__all__ = ["ActivityCube", "RecorderHooks", "Tracer", "add_hooks_all", "serving"]
