"""ModelInspector's knobs come from the ``inspection:`` config section; keywords and an
explicit ``settings=`` override it, unknown keys are errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from inspection_models import CharTokenizer, tiny_gpt2

from model_forensics import ConfigError, ModelInspector
from model_forensics.core.config import load_config
from model_forensics.inspection import InspectorSettings
from model_forensics.inspection.attribution import AttributionSettings

DEFAULT = Path(__file__).parents[2] / "configs" / "default.yaml"


def test_the_defaults_are_the_config_defaults():
    assert InspectorSettings() == load_config(DEFAULT).inspection
    assert ModelInspector(tiny_gpt2()).settings == InspectorSettings()


def test_the_inspection_section_of_a_yaml_file_is_read(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("inspection:\n  batch_size: 3\n  max_length: 16\n  shift:\n    alpha: 0.01\n")
    insp = ModelInspector(tiny_gpt2(), CharTokenizer(), config=path)
    assert insp.settings.batch_size == 3 and insp.settings.shift.alpha == 0.01
    assert insp.settings.shift.permutations == 200  # untouched keys keep their defaults
    assert insp.encoder.max_length == 16


def test_keywords_override_the_config_key_by_key():
    config = {"inspection": {"batch_size": 3, "seed": 5, "shift": {"alpha": 0.01, "permutations": 50}}}
    s = ModelInspector(tiny_gpt2(), config=config, batch_size=2, shift={"alpha": 0.02}).settings
    assert (s.batch_size, s.seed) == (2, 5)
    assert (s.shift.alpha, s.shift.permutations) == (0.02, 50)


def test_settings_override_only_the_fields_they_set():
    config = {"inspection": {"batch_size": 3, "max_length": 64, "attribution": {"folds": 3}}}
    settings = InspectorSettings(max_length=32, attribution=AttributionSettings(top_units=2))
    s = ModelInspector(tiny_gpt2(), config=config, settings=settings).settings
    assert (s.batch_size, s.max_length) == (3, 32)
    assert (s.attribution.folds, s.attribution.top_units) == (3, 2)


def test_settings_changed_after_construction_still_override():
    settings = InspectorSettings()
    settings.shift.alpha = 0.2
    s = ModelInspector(tiny_gpt2(), config={"inspection": {"shift": {"alpha": 0.01}}}, settings=settings).settings
    assert s.shift.alpha == 0.2


def test_an_unknown_keyword_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown key 'batchsize'"):
        ModelInspector(tiny_gpt2(), batchsize=2)
    with pytest.raises(ConfigError, match="unknown key 'shift.alfa'"):
        ModelInspector(tiny_gpt2(), shift={"alfa": 0.1})


def test_a_value_out_of_range_names_the_key():
    with pytest.raises(ConfigError, match="batch_size"):
        ModelInspector(tiny_gpt2(), batch_size=0)


def test_an_unknown_key_in_the_file_is_a_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("inspection:\n  tokens_capacity: 3\n")
    with pytest.raises(ConfigError, match="inspection.tokens_capacity"):
        ModelInspector(tiny_gpt2(), config=path)
