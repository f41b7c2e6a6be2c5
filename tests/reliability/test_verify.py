"""`verify` means it: every data file is mandatory, one content digest covers the manifest
and every file, a signature binds the digest to a key, and verification parses every file
and re-derives the recorded verdict, so no edit passes unnoticed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hostile import edit_manifest, rehash

from model_forensics import Bundle, BundleError, RecorderHooks, SandboxReplayer
from model_forensics.core import signing
from model_forensics.core.bundle import DATA_FILES, pack_bundle


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.update(files={}),
        lambda m: m["files"].pop("calls.jsonl"),
        lambda m: m.pop("files"),
        lambda m: m["files"].update({"extra.bin": m["files"]["cube.json"]}),
    ],
)
def test_every_data_file_must_be_in_the_table(fresh, change) -> None:
    bundle = fresh("forward")
    edit_manifest(bundle, change)
    with pytest.raises(BundleError, match="files"):
        Bundle.open(bundle)


@pytest.mark.parametrize("name", DATA_FILES)
def test_a_missing_data_file_is_refused(fresh, name: str) -> None:
    bundle = fresh("forward")
    (bundle / name).unlink()
    with pytest.raises(BundleError, match=name):
        Bundle.open(bundle)


def test_the_digest_names_the_contents_and_nothing_else(fresh, tmp_path: Path) -> None:
    bundle = fresh("forward")
    digest = Bundle.open(bundle).digest
    assert digest.startswith("sha256:") and len(digest) == 7 + 64
    copy = Path(shutil.copytree(bundle, tmp_path / "copy"))
    assert Bundle.open(copy).digest == digest
    assert Bundle.open(pack_bundle(bundle, tmp_path / "b.mfb.zip")).digest == digest
    # Reformatting the manifest changes no value, so it keeps the digest.
    (copy / "manifest.json").write_text(json.dumps(json.loads((copy / "manifest.json").read_text()), indent=4))
    assert Bundle.open(copy).digest == digest


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m["predicate"].update(holds=not m["predicate"]["holds"]),
        lambda m: m["output"].update(text="something else"),
        lambda m: m["model"].update(name="another-model"),
        lambda m: m["extras"].update(benign=["w3 w4"]),
    ],
)
def test_any_manifest_edit_changes_the_digest(fresh, change) -> None:
    bundle = fresh("generate")
    digest = Bundle.open(bundle).digest
    edit_manifest(bundle, change)
    assert Bundle.open(bundle).digest != digest


def test_a_rehashed_data_file_changes_the_digest(fresh) -> None:
    bundle = fresh("forward")
    digest = Bundle.open(bundle).digest
    data = bytearray((bundle / "outputs.safetensors").read_bytes())
    data[-1] ^= 0x01
    (bundle / "outputs.safetensors").write_bytes(bytes(data))
    rehash(bundle)
    assert Bundle.open(bundle).digest != digest


@pytest.mark.parametrize("kind", ["generate", "forward", "bert"])
def test_an_edited_verdict_is_caught_without_the_model(fresh, kind: str) -> None:
    bundle = fresh(kind)
    assert Bundle.open(bundle).verify_contents() == []
    edit_manifest(bundle, lambda m: m["predicate"].update(holds=not m["predicate"]["holds"]))
    problems = Bundle.open(bundle).verify_contents()
    assert any("predicate.holds" in p for p in problems), problems


def test_an_edited_output_text_is_caught_by_a_text_predicate(fresh) -> None:
    bundle = fresh("generate")  # predicate: contains(the first generated words)
    edit_manifest(bundle, lambda m: m["output"].update(text="nothing to see"))
    assert any("predicate.holds" in p for p in Bundle.open(bundle).verify_contents())


def test_an_edited_prediction_is_caught(fresh) -> None:
    bundle = fresh("forward")
    edit_manifest(bundle, lambda m: m["output"].update(prediction=(m["output"]["prediction"] + 1) % 50))
    assert any("output.prediction" in p for p in Bundle.open(bundle).verify_contents())


@pytest.mark.parametrize("field", ["output.text", "predicate.holds"])
def test_replay_verification_confirms_the_recorded_verdict(fresh, word_models, field: str) -> None:
    bundle = fresh("generate")
    session = SandboxReplayer().load_bundle(bundle, model=word_models["llama"])
    assert session.verify().bit_identical
    if field == "output.text":
        edit_manifest(bundle, lambda m: m["output"].update(text=m["output"]["text"] + " extra"))
    else:
        edit_manifest(bundle, lambda m: m["predicate"].update(holds=not m["predicate"]["holds"]))
    report = SandboxReplayer().load_bundle(bundle, model=word_models["llama"]).verify()
    assert not report.bit_identical
    assert [c.site for c in report.differing] == [field]


def _fp16_bundle(word_models, path: Path) -> Path:
    loaded = word_models["gpt2"]
    with RecorderHooks(sketch="fp16", granularity="layer").install_hooks(loaded.model) as rec, torch.no_grad():
        loaded.model(input_ids=torch.tensor([[3, 4, 5, 6, 7]]))
        return rec.create_bundle(path)


def test_lossy_sketches_are_rechecked_site_by_site(word_models, tmp_path: Path) -> None:
    bundle = _fp16_bundle(word_models, tmp_path / "b")
    opened = Bundle.open(bundle)
    assert all(info["sketch"] == "fp16" and "stored_sha256" in info for info in opened.manifest["sites"].values())
    assert opened.verify_contents() == []
    data = bytearray((bundle / "activations.safetensors").read_bytes())
    data[-3] ^= 0x10  # inside the last site's fp16 values
    (bundle / "activations.safetensors").write_bytes(bytes(data))
    rehash(bundle)
    problems = Bundle.open(bundle).verify_contents()
    assert len(problems) == 1 and "stored sketch blake3" in problems[0], problems


def test_a_site_that_does_not_decode_to_its_shape_is_reported(word_models, tmp_path: Path) -> None:
    bundle = _fp16_bundle(word_models, tmp_path / "b")
    site = Bundle.open(bundle).sites[0]
    edit_manifest(bundle, lambda m: m["sites"][site].pop("stored_sha256"))
    edit_manifest(bundle, lambda m: m["sites"][site].update(shape=[1, 5, 33]))
    problems = Bundle.open(bundle).verify_contents()
    assert any(site in p and "declared shape" in p for p in problems), problems


def test_format_1_0_bundles_still_open_and_verify(fresh) -> None:
    bundle = fresh("forward")

    def downgrade(m: dict) -> None:
        m["format_version"] = "1.0"
        for info in m["sites"].values():
            info.pop("stored_sha256")
        m.pop("partial", None)

    edit_manifest(bundle, downgrade)
    assert Bundle.open(bundle).verify_contents() == []


# -- signatures -------------------------------------------------------------------------------------
@pytest.fixture()
def keys(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    return {who: signing.generate_key(tmp_path / who) for who in ("alice", "mallory")}


def test_a_signed_bundle_verifies_against_its_key(fresh, keys) -> None:
    bundle = fresh("forward")
    signing.write_signature(bundle, keys["alice"][0])
    opened = Bundle.open(bundle)
    signer = signing.check_signature(opened, trusted_key=keys["alice"][1])
    assert signer == signing.fingerprint(signing.load_public_key(keys["alice"][1]))
    with pytest.raises(BundleError, match="not by the trusted key"):
        signing.check_signature(opened, trusted_key=keys["mallory"][1])


def test_a_bundle_changed_after_signing_fails(fresh, keys) -> None:
    bundle = fresh("forward")
    signing.write_signature(bundle, keys["alice"][0])
    edit_manifest(bundle, lambda m: m["predicate"].update(holds=not m["predicate"]["holds"]))
    with pytest.raises(BundleError, match="changed after signing"):
        signing.check_signature(Bundle.open(bundle), trusted_key=keys["alice"][1])


def test_a_re_signed_forgery_fails_against_the_trusted_key(fresh, keys) -> None:
    bundle = fresh("forward")
    signing.write_signature(bundle, keys["alice"][0])
    edit_manifest(bundle, lambda m: m["output"].update(text="forged"))
    signing.write_signature(bundle, keys["mallory"][0])  # the attacker signs their edit
    with pytest.raises(BundleError, match="not by the trusted key"):
        signing.check_signature(Bundle.open(bundle), trusted_key=keys["alice"][1])


def test_a_damaged_signature_fails(fresh, keys) -> None:
    bundle = fresh("forward")
    signing.write_signature(bundle, keys["alice"][0])
    record = json.loads((bundle / "signature.json").read_text())
    record["signature"] = record["signature"][:-4] + ("AAA=" if not record["signature"].endswith("AAA=") else "BBB=")
    (bundle / "signature.json").write_text(json.dumps(record))
    with pytest.raises(BundleError, match="invalid signature"):
        signing.check_signature(Bundle.open(bundle))


def test_an_unsigned_bundle_fails_a_signature_check(fresh, keys) -> None:
    with pytest.raises(BundleError, match="not signed"):
        signing.check_signature(Bundle.open(fresh("forward")), trusted_key=keys["alice"][1])


def test_recording_with_a_key_writes_a_signed_bundle_and_it_survives_packing(word_models, keys, tmp_path) -> None:
    from model_forensics.recorder.session import record_prompt

    path = record_prompt(word_models["gpt2"], "w3 w4 w5", tmp_path / "b", sign_key=keys["alice"][0])
    assert (path / "signature.json").is_file()
    packed = Bundle.open(pack_bundle(path, tmp_path / "b.mfb.zip"))
    assert signing.check_signature(packed, trusted_key=keys["alice"][1]).startswith("ed25519:")


def test_openssh_public_keys_are_accepted(fresh, keys, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    bundle = fresh("forward")
    signing.write_signature(bundle, keys["alice"][0])
    public = signing.load_public_key(keys["alice"][1])
    ssh = tmp_path / "alice_ed25519.pub"
    ssh.write_bytes(public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    assert signing.check_signature(Bundle.open(bundle), trusted_key=ssh)
