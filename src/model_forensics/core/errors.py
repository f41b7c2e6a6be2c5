"""The exception hierarchy: one base class and a few named kinds.

Every message names the input that was wrong and says what to do about it; the CLI
prints the message on one line and exits with code 2.
"""

from __future__ import annotations


class ForensicsError(Exception):
    """Base class for every error model-forensics raises on bad input or state."""


class ConfigError(ForensicsError):
    """A configuration file or option is invalid."""


class BundleError(ForensicsError):
    """An incident bundle cannot be written, read or trusted."""


class SiteError(ForensicsError):
    """A site name or selector does not exist in the model."""


class ModelLoadError(ForensicsError):
    """A model reference cannot be resolved or loaded."""


class ReplayDivergence(ForensicsError):
    """Replay did something the recording did not (a different external call, say)."""


class SandboxViolation(ForensicsError):
    """Code under replay tried to reach the network or spawn a process."""


class WeightMismatchWarning(UserWarning):
    """A bundle is replayed with weights other than those it was recorded with
    (``allow_weight_mismatch``): the results are not a faithful replay."""
