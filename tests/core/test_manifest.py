"""The manifest model: the shipped JSON Schema is generated from it, and both agree on
real manifests."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch

from model_forensics import BundleError, RecorderHooks
from model_forensics.core.bundle import load_schema
from model_forensics.core.config import BundleConfig
from model_forensics.core.manifest import (
    GenerationSettings,
    allowed_keys,
    check_manifest,
    manifest_json_schema,
    parse_json,
)


def test_the_shipped_schema_is_generated_from_the_model() -> None:
    assert load_schema("manifest") == json.loads(json.dumps(manifest_json_schema())), (
        "schemas/manifest.schema.json is stale: run .venv/bin/python scripts/write_manifest_schema.py"
    )


def test_a_recorded_manifest_passes_the_model_and_the_generated_schema(tiny, tmp_path: Path) -> None:
    loaded = tiny["gpt2"]
    with RecorderHooks(granularity="all").install_hooks(loaded.model) as rec, torch.no_grad():
        loaded.model(input_ids=torch.tensor([[1, 5, 9, 3]]))
        path = rec.create_bundle(tmp_path / "b")
    manifest = json.loads((path / "manifest.json").read_text())
    assert check_manifest(manifest, BundleConfig()) is manifest
    jsonschema.validate(manifest, load_schema("manifest"))
    bad = dict(manifest, input={**manifest["input"], "generation": {"custom_generate": "x"}})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, load_schema("manifest"))
    with pytest.raises(BundleError, match=r"input\.generation\.custom_generate"):
        check_manifest(bad, BundleConfig())


def test_the_generation_allowlist_is_what_replay_may_pass_on() -> None:
    keys = allowed_keys(GenerationSettings)
    assert {"max_new_tokens", "do_sample", "num_beams", "pad_token_id", "eos_token_id"} <= keys
    assert not keys & {"trust_remote_code", "custom_generate", "assistant_model", "streamer", "logits_processor"}


def test_strict_json_names_what_is_wrong() -> None:
    limits = BundleConfig(max_json_depth=4, max_string_chars=10)
    assert parse_json(b'{"a": [1, 2.5, "short"]}', "x.json", limits) == {"a": [1, 2.5, "short"]}
    for raw, match in [
        (b'{"a": 1, "a": 2}', "repeats the key 'a'"),
        (b'{"a": [[[[1]]]]}', "max_json_depth"),
        (b'{"a": "' + b"y" * 11 + b'"}', "max_string_chars"),
        (b'{"a": -Infinity}', "-Infinity"),
    ]:
        with pytest.raises(BundleError, match=match):
            parse_json(raw, "x.json", limits)
