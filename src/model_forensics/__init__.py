"""model-forensics: flight recorder, replay and root-cause analysis for PyTorch models."""

import model_forensics.core.numerics  # noqa: F401  (warms the math kernels: replays start as recordings did)
from model_forensics.core.bundle import Bundle
from model_forensics.core.config import ForensicsConfig, load_config
from model_forensics.core.errors import (
    BundleError,
    ConfigError,
    ForensicsError,
    ModelLoadError,
    ReplayDivergence,
    SandboxViolation,
    SiteError,
)
from model_forensics.core.predicates import Predicate, class_is, contains, logit_diff, regex, token_is
from model_forensics.inspection import ModelInspector
from model_forensics.rca import CausalCCA, CompressionForensics, FixSet
from model_forensics.recorder import ActivityCube, RecorderHooks, add_hooks_all
from model_forensics.replay import Gate, Intervention, SandboxReplayer, Session

__version__ = "0.2.0"

__all__ = [
    "ActivityCube",
    "Bundle",
    "BundleError",
    "CausalCCA",
    "CompressionForensics",
    "ConfigError",
    "FixSet",
    "ForensicsConfig",
    "ForensicsError",
    "Gate",
    "Intervention",
    "ModelInspector",
    "ModelLoadError",
    "Predicate",
    "RecorderHooks",
    "ReplayDivergence",
    "SandboxReplayer",
    "SandboxViolation",
    "Session",
    "SiteError",
    "__version__",
    "add_hooks_all",
    "class_is",
    "contains",
    "load_config",
    "logit_diff",
    "regex",
    "token_is",
]
