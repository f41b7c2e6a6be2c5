"""CausalCCA and CompressionForensics read every knob from the config; keywords override it."""

from __future__ import annotations

import pytest

from model_forensics import CausalCCA, CompressionForensics, ConfigError, ForensicsConfig


def _config(**cca: object) -> ForensicsConfig:
    return ForensicsConfig.from_mapping({"modules": {"cca": cca}})


def test_knobs_come_from_the_config() -> None:
    cca = CausalCCA(_config(gating="never", search_variants=3, guidance="cf", neurons_per_site=5))
    assert (cca.gating, cca.search_variants, cca.guidance, cca.neurons_per_site) == ("never", 3, "cf", 5)
    assert CausalCCA().config == ForensicsConfig().modules.cca


def test_a_keyword_overrides_only_its_own_knob() -> None:
    cca = CausalCCA(_config(gating="never", directions="never"), gating="always", confirm_top=4)
    assert cca.config.gating == "always" and cca.config.confirm_top == 4
    assert cca.config.directions == "never"  # not given: as configured


def test_a_bad_keyword_value_is_a_config_error_naming_the_knob() -> None:
    with pytest.raises(ConfigError, match="key 'neurons_per_site'"):
        CausalCCA(neurons_per_site=0)
    with pytest.raises(ConfigError, match="unknown guidance 'cff'"):
        CausalCCA(guidance="cff")
    with pytest.raises(TypeError):
        CausalCCA(no_such_knob=1)  # type: ignore[call-arg]


def test_unknown_config_keys_stay_errors() -> None:
    with pytest.raises(ConfigError, match="unknown key 'modules.cca.gatting'"):
        _config(gatting="never")


def test_cf_heads_come_from_the_config_and_the_keyword() -> None:
    no_heads = ForensicsConfig.from_mapping({"modules": {"cf": {"heads": False}}})
    assert CompressionForensics(no_heads).config.heads is False
    assert CompressionForensics(no_heads, heads=True).config.heads is True
    assert CompressionForensics().config.heads is True
