"""Sessions: loading, bit-identical verification, runs, generation, and bad input."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from replay_models import PROMPT

from model_forensics import BundleError, Intervention, ModelLoadError, SandboxReplayer
from model_forensics.core.bundle import pack_bundle


@pytest.mark.parametrize("name", ["forward", "generate", "gpt2", "bert"])
def test_replay_is_bit_identical_to_the_recording(sessions, name):
    report = sessions[name].verify()
    assert report.bit_identical, report.summary()
    assert report.sites and all(c.identical for c in report.sites)
    assert report.outputs and all(c.identical for c in report.outputs)


def test_load_resolves_the_model_from_the_manifest_and_opens_zips(bundles, tmp_path):
    packed = pack_bundle(bundles["forward"], tmp_path / "incident.mfb.zip")
    session = SandboxReplayer().load_bundle(packed, verify=True)
    assert session.verification is not None and session.verification.bit_identical
    assert session.run().failed is True  # the recorded failure reproduces


def test_unchanged_run_reproduces_the_recorded_output(sessions):
    s = sessions["forward"]
    r = s.run()
    assert r.failed is True and r.flipped is False
    assert r.prediction == s.manifest["output"]["prediction"]
    assert torch.equal(r.logits, s.bundle.outputs["logits"][0, -1])
    assert r.text == s.manifest["output"]["text"]


def test_intervention_changes_the_prediction_and_flips(sessions):
    s = sessions["forward"]
    r = s.run([Intervention("final", "scale", value=-1.0)])  # negates the logits
    assert r.prediction != s.manifest["output"]["prediction"]
    assert r.failed is False and r.flipped is True
    assert json.loads(json.dumps(r.to_json()))["flipped"] is True


def test_generation_replays_token_by_token_and_interventions_change_the_text(sessions):
    s = sessions["generate"]
    clean = s.run()
    assert clean.text == s.manifest["output"]["text"] and clean.failed is True
    assert torch.equal(clean.outputs["generated_ids"], s.bundle.outputs["generated_ids"][0])
    changed = s.run([Intervention("embed", "scale", value=-3.0)])
    assert changed.text != clean.text
    assert changed.failed == (s.predicate.args["text"] in changed.text)
    assert changed.outputs["logits"].shape[0] == changed.outputs["generated_ids"].shape[0] - s.prompt_len


def test_classifier_predicate_is_reevaluated(sessions):
    s = sessions["bert"]
    clean = s.run()
    assert clean.failed is True and clean.logits.shape == (2,)
    flipped = s.run([Intervention("blocks.1.resid_post", "scale", value=-1.0)])
    assert flipped.failed == (flipped.prediction == s.predicate.args["label"])


def test_run_on_a_variant_input(sessions):
    s = sessions["forward"]
    variant = s.variants()[1]
    r = s.run([], inputs=variant)
    assert r.flipped is False  # an unchanged run never flips
    assert len(s.benign()) == 1


def test_determinism_settings_are_restored(sessions):
    s = sessions["forward"]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the bundle was recorded with 1
    try:
        state = torch.get_rng_state()
        s.run()
        assert torch.get_num_threads() == 2
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.equal(torch.get_rng_state(), state)
    finally:
        torch.set_num_threads(threads)


def test_forward_passes_are_counted(sessions):
    s = sessions["forward"]
    before = s.forward_passes
    r = s.run([Intervention("blocks.0.mlp", "zero")])
    assert s.forward_passes - before == 1 == r.forward_passes


# -- bad input ---------------------------------------------------------------------------------
def _copy_with_manifest(src, dst, edit):
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    edit(manifest)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_newer_format_version_is_refused(bundles, tmp_path):
    path = _copy_with_manifest(bundles["forward"], tmp_path / "b", lambda m: m.update(format_version="2.0"))
    with pytest.raises(BundleError, match="format version 2.0.*upgrade"):
        SandboxReplayer().load_bundle(path)


def test_missing_model_is_a_clear_error(bundles, tmp_path):
    path = _copy_with_manifest(
        bundles["forward"], tmp_path / "b", lambda m: m["model"].update(reference=str(tmp_path / "gone"))
    )
    with pytest.raises(ModelLoadError, match="pass --model / model="):
        SandboxReplayer().load_bundle(path)


def test_tampered_activations_are_refused(bundles, tmp_path):
    path = tmp_path / "b"
    shutil.copytree(bundles["forward"], path)
    data = bytearray((path / "activations.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "activations.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="activations.safetensors blake3 differs"):
        SandboxReplayer().load_bundle(path)


def test_weight_mismatch_is_an_error_unless_allowed(bundles, lm_dirs):
    with pytest.raises(BundleError, match="weights .* differ.*--allow-weight-mismatch"):
        SandboxReplayer().load_bundle(bundles["forward"], model=str(lm_dirs["gpt2"]))
    from model_forensics.models.loading import load

    other = load(str(lm_dirs["llama"]))
    with torch.no_grad():
        other.model.lm_head.weight.mul_(1.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = SandboxReplayer().load_bundle(bundles["forward"], model=other, allow_weight_mismatch=True)
    assert any("WEIGHT MISMATCH" in str(w.message) for w in caught)
    report = session.verify()
    assert not report.bit_identical
    assert {c.site for c in report.differing} == {"logits"}
    assert report.differing[0].max_abs_diff > 0


def test_verify_names_the_sites_that_differ(bundles, lms):
    session = SandboxReplayer().load_bundle(bundles["forward"], model=lms["llama"])
    handle = lms["llama"].model.model.layers[1].mlp.register_forward_hook(lambda m, a, out: out * 1.5)
    try:
        report = session.verify()
    finally:
        handle.remove()
    assert not report.bit_identical
    differing = {c.site for c in report.differing}
    assert "blocks.1.mlp" in differing and "blocks.0.mlp" not in differing
    assert all(c.max_abs_diff and c.max_abs_diff > 0 for c in report.differing if c.site.startswith("blocks"))
    assert "NOT bit-identical" in report.summary()


def test_prompt_is_the_recorded_one(sessions):
    assert sessions["forward"].manifest["input"]["text"] == PROMPT
