"""Incident scenarios with ground truth: zoo models and real weights.

``get(name).record(out_dir)`` writes ``incident-<i>/`` and ``baseline-<i>/`` bundles ready
for analysis; ``names()`` lists the scenarios (``model-forensics scenarios list``).
"""

from model_forensics.scenarios.registry import get, names, scenarios
from model_forensics.scenarios.scenario import Scenario, ScenarioRun

__all__ = ["Scenario", "ScenarioRun", "get", "names", "scenarios"]
