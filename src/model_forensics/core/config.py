"""Configuration: the YAML file's schema as pydantic models.

Every option lives in ``configs/default.yaml`` with its default and a one-line comment.
Unknown keys and wrong types are errors that name the key and the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from model_forensics.core.errors import ConfigError

Granularity = Literal["layer", "head", "neuron", "all"]
SketchKind = Literal["full", "fp16", "int8", "topk"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RecorderConfig(_Strict):
    enabled: bool = True
    granularity: Granularity = "layer"
    sites: list[str] = Field(default_factory=list)
    sketch: SketchKind = "fp16"
    compression_ratio: float = Field(default=0.1, gt=0.0, le=1.0)
    max_bundle_size_mb: float = Field(default=500.0, gt=0.0)
    memory_budget_mb: float = Field(default=256.0, ge=0.0)
    spool_dir: str | None = None


class ReplayConfig(_Strict):
    seed: int = 0
    deterministic: bool = True
    max_batch_size: int = Field(default=64, ge=1)
    memory_budget_mb: float = Field(default=2048.0, gt=0.0)
    threads: int | None = Field(default=None, ge=1)
    allow_network: bool = False
    allow_subprocess: bool = False


class BundleConfig(_Strict):
    """Limits a bundle reader enforces: everything in a bundle is hostile until checked;
    and ``hash``, the digest algorithm of the bundles written (format 1.3)."""

    hash: Literal["blake3", "sha256"] = "blake3"
    max_manifest_mb: float = Field(default=8.0, gt=0.0)
    max_json_depth: int = Field(default=64, ge=2)
    max_json_containers: int = Field(default=100_000, ge=1)
    max_string_chars: int = Field(default=1_000_000, ge=1)
    max_sites: int = Field(default=10_000, ge=1)
    max_site_mb: float = Field(default=8192.0, gt=0.0)
    max_unpacked_mb: float = Field(default=16384.0, gt=0.0)
    max_compression_ratio: float = Field(default=200.0, ge=1.0)
    max_calls_mb: float = Field(default=64.0, gt=0.0)
    max_new_tokens: int = Field(default=4096, ge=1)
    max_num_beams: int = Field(default=16, ge=1)
    max_input_rows: int = Field(default=1024, ge=1)
    max_input_tokens: int = Field(default=131_072, ge=1)
    max_prompts: int = Field(default=100_000, ge=0)
    regex_timeout_s: float = Field(default=1.0, gt=0.0)


class CFConfig(_Strict):
    enabled: bool = True
    anomaly_threshold: float = Field(default=2.0, gt=0.0)
    baseline_samples: int = Field(default=1000, ge=1)
    heads: bool = True
    ranker: Literal["features", "relative", "auto"] = "features"
    codebook_variance: float = Field(default=0.9, gt=0.0, lt=1.0)


GateDirection = Literal["difference", "lda"]
GATE_DIRECTIONS: tuple[GateDirection, ...] = ("difference", "lda")
"""What a step gate may read (``modules.cca.step_gate_directions``, rca/stepgate.py)."""


class CCAConfig(_Strict):
    enabled: bool = True
    max_fix_set_size: int = Field(default=50, ge=1)
    search_strategy: Literal["greedy", "exhaustive"] = "greedy"
    early_stop_threshold: float = Field(default=0.8, gt=0.0, le=1.0)
    max_side_effect_kl: float = Field(default=0.05, ge=0.0)
    max_accuracy_drop: float = Field(default=0.02, ge=0.0, le=1.0)
    guidance: Literal["attribution", "cf", "unguided"] = "attribution"
    neurons_per_site: int = Field(default=48, ge=1)
    search_variants: int = Field(default=12, ge=1)
    confirm_top: int = Field(default=48, ge=1)
    refine_rounds: int = Field(default=2, ge=0)
    confirm_variants: int = Field(default=16, ge=1)
    directions: Literal["auto", "always", "never"] = "auto"
    direction_pool: int = Field(default=60, ge=1)
    gating: Literal["auto", "always", "never"] = "auto"
    sweep_smallest: bool = True
    sweep_neurons: int = Field(default=48, ge=0)
    sweep_pairs: int = Field(default=10, ge=0)
    positions: bool = False
    saturation_tolerance: float = Field(default=1e-6, ge=0.0)
    held_out_fraction: float = Field(default=0.3, ge=0.0, lt=1.0)
    split_seed: int = Field(default=0, ge=0)
    step_gate: Literal["auto", "always", "never"] = "auto"
    step_gate_layers: int = Field(default=2, ge=1)
    step_gate_directions: list[GateDirection] = Field(default_factory=lambda: list(GATE_DIRECTIONS), min_length=1)
    step_gate_alphas: list[Annotated[float, Field(gt=0.0)]] = Field(default_factory=lambda: [2.0, 4.0], min_length=1)
    step_gate_min_benign_kept: float = Field(default=0.9, ge=0.0, le=1.0)
    step_gate_min_near_miss_kept: float = Field(default=0.8, ge=0.0, le=1.0)


class ShiftConfig(_Strict):
    """Thresholds and sample-size floors of the shift tests (also drift)."""

    alpha: float = Field(default=0.05, gt=0.0, lt=1.0)
    layer_fraction: float = Field(default=0.2, ge=0.0, le=1.0)
    min_effect: float = Field(default=0.1, ge=0.0)
    min_samples: int = Field(default=20, ge=2)
    min_inputs_mmd: int = Field(default=10, ge=2)
    permutations: int = Field(default=200, ge=1)
    components: int = Field(default=32, ge=1)
    seed: int = Field(default=0, ge=0)


class SensitivityConfig(_Strict):
    """Perturbation size and seed of the layer-sensitivity experiment."""

    noise_scale: float = Field(default=0.1, gt=0.0)
    seed: int = Field(default=0, ge=0)


class FailureAttributionConfig(_Strict):
    """Probes, effect sizes and the confirming ablation of failure attribution."""

    folds: int = Field(default=5, ge=2)
    top_units: int = Field(default=8, ge=1)
    min_per_class: int = Field(default=5, ge=1)
    max_ablation_inputs: int = Field(default=32, ge=1)
    margin: float = Field(default=0.1, ge=0.0)
    min_auroc: float = Field(default=0.6, ge=0.0, le=1.0)
    seed: int = Field(default=0, ge=0)


class PruningConfig(_Strict):
    """Which units pruning proposes and what held-out check they must pass."""

    tau: float = Field(default=0.1, ge=0.0)
    max_fraction: float = Field(default=0.25, gt=0.0, le=1.0)
    max_sites: int = Field(default=8, ge=1)
    max_kl: float = Field(default=0.01, ge=0.0)
    min_agreement: float = Field(default=0.98, ge=0.0, le=1.0)
    heldout_inputs: int = Field(default=32, ge=1)
    min_heldout: int = Field(default=8, ge=1)


class InspectionConfig(_Strict):
    """ModelInspector: every knob of the eight experiments (docs/metrics.md explains each)."""

    batch_size: int = Field(default=8, ge=1)
    max_length: int = Field(default=128, ge=1)
    epsilon: float = Field(default=1e-3, ge=0.0)
    tau: float = Field(default=0.025, ge=0.0)
    token_capacity: int = Field(default=1024, ge=1)
    pooled_capacity: int = Field(default=512, ge=1)
    series_capacity: int = Field(default=256, ge=1)
    series_windows: int = Field(default=5, ge=1)
    shift: ShiftConfig = Field(default_factory=ShiftConfig)
    sensitivity: SensitivityConfig = Field(default_factory=SensitivityConfig)
    sensitivity_inputs: int = Field(default=32, ge=1)
    attribution: FailureAttributionConfig = Field(default_factory=FailureAttributionConfig)
    robustness_inputs: int = Field(default=64, ge=1)
    robustness_variants: int = Field(default=2, ge=1)
    robustness_tolerance: float = Field(default=0.1, ge=0.0)
    bootstrap: int = Field(default=1000, ge=1)
    confidence: float = Field(default=0.95, gt=0.0, lt=1.0)
    pruning: PruningConfig = Field(default_factory=PruningConfig)
    seed: int = Field(default=0, ge=0)


class ModulesConfig(_Strict):
    cf: CFConfig = Field(default_factory=CFConfig)
    cca: CCAConfig = Field(default_factory=CCAConfig)


class ForensicsConfig(_Strict):
    """The whole configuration tree (``configs/default.yaml``)."""

    recorder: RecorderConfig = Field(default_factory=RecorderConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    bundle: BundleConfig = Field(default_factory=BundleConfig)
    modules: ModulesConfig = Field(default_factory=ModulesConfig)
    inspection: InspectionConfig = Field(default_factory=InspectionConfig)

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str = "<mapping>") -> ForensicsConfig:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(validation_message(exc, source)) from None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def load_config(config: str | Path | ForensicsConfig | dict[str, Any] | None) -> ForensicsConfig:
    """Load and validate a configuration.

    Args:
        config: a path to a YAML file, an already-built config, a plain mapping, or None
            for the defaults.
    Returns:
        The validated :class:`ForensicsConfig`.
    Raises:
        ConfigError: the file is missing or unreadable, or a key is unknown or mistyped.
    """
    if config is None:
        return ForensicsConfig()
    if isinstance(config, ForensicsConfig):
        return config
    if isinstance(config, dict):
        return ForensicsConfig.from_mapping(config)
    path = Path(config)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass a YAML file such as configs/default.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file '{path}' is not UTF-8 (byte {exc.start}); save it as UTF-8 YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level, not {type(data).__name__}")
    return ForensicsConfig.from_mapping(data, source=str(path))


def validation_message(exc: ValidationError, source: str) -> str:
    """One line naming every bad key of a pydantic ValidationError and where it came from."""
    problems = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown key '{key}'")
        else:
            problems.append(f"key '{key}': {err['msg']} (got {err.get('input')!r})")
    return f"invalid config in {source}: " + "; ".join(problems) + "; see configs/default.yaml for every key"
