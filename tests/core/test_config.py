from pathlib import Path

import pytest

from model_forensics.core.config import ForensicsConfig, load_config
from model_forensics.core.errors import ConfigError

DEFAULT = Path(__file__).parents[2] / "configs" / "default.yaml"


def test_default_yaml_equals_built_in_defaults() -> None:
    assert load_config(DEFAULT) == ForensicsConfig()


def test_seed_keys_are_present() -> None:
    cfg = load_config(DEFAULT)
    assert cfg.recorder.granularity == "layer"
    assert cfg.recorder.compression_ratio == 0.1
    assert cfg.recorder.max_bundle_size_mb == 500
    assert cfg.modules.cf.anomaly_threshold == 2.0
    assert cfg.modules.cf.baseline_samples == 1000
    assert cfg.modules.cca.max_fix_set_size == 50
    assert cfg.modules.cca.search_strategy == "greedy"
    assert cfg.modules.cca.early_stop_threshold == 0.8


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("recorder:\n  granularty: layer\n")
    with pytest.raises(ConfigError, match=r"unknown key 'recorder.granularty'.*bad.yaml|bad.yaml.*recorder.granularty"):
        load_config(bad)


def test_wrong_type_names_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("modules:\n  cf:\n    anomaly_threshold: high\n")
    with pytest.raises(ConfigError, match=r"modules\.cf\.anomaly_threshold"):
        load_config(bad)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
