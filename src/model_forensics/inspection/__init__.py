"""ModelInspector and its eight experiments (plus verified pruning recommendations)."""

from model_forensics.inspection.attribution import AttributionResult
from model_forensics.inspection.collect import InputAdapter, Sample, read_jsonl
from model_forensics.inspection.drift import DriftResult
from model_forensics.inspection.inspector import EXPERIMENTS, InspectionResult, InspectorSettings, ModelInspector
from model_forensics.inspection.pruning import PruningResult
from model_forensics.inspection.regression import RegressionResult
from model_forensics.inspection.robustness import RobustnessResult
from model_forensics.inspection.sensitivity import SensitivityResult
from model_forensics.inspection.shift import ShiftResult
from model_forensics.inspection.sparsity import SparsityResult
from model_forensics.inspection.stats import StatsResult

__all__ = [
    "EXPERIMENTS",
    "AttributionResult",
    "DriftResult",
    "InputAdapter",
    "InspectionResult",
    "InspectorSettings",
    "ModelInspector",
    "PruningResult",
    "RegressionResult",
    "RobustnessResult",
    "Sample",
    "SensitivityResult",
    "ShiftResult",
    "SparsityResult",
    "StatsResult",
    "read_jsonl",
]
