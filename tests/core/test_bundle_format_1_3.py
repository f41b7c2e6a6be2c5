"""Format 1.3: the manifest names its digest algorithm (``hash``), every content digest
uses it (blake3 by default), replay compares with the bundle's algorithm, and bundles of
format 1.2 (sha256, no ``hash``) still read, verify and replay."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import blake3
import pytest
import torch

from model_forensics import Bundle, BundleError, RecorderHooks
from model_forensics.core import digests
from model_forensics.core.bundle import pack_bundle, unpack_bundle

sys.path.insert(0, str(Path(__file__).parents[1] / "replay"))

from replay_models import PROMPT, make_models, record


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from model_forensics.models.loading import load

    return load(str(make_models(tmp_path_factory.mktemp("v13-models"))["llama"]))


@pytest.fixture(scope="module")
def generated(llama, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A blake3 (default) generation bundle: step logits, generated ids, every site."""
    return record(llama, tmp_path_factory.mktemp("v13") / "generate", max_new_tokens=3)


def _replay(path: Path, llama):  # type: ignore[no-untyped-def]
    from model_forensics.replay import SandboxReplayer

    return SandboxReplayer().load_bundle(path, model=llama)


def _edit(path: Path, change) -> None:  # type: ignore[no-untyped-def]
    manifest = json.loads((path / "manifest.json").read_bytes())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))


def test_a_blake3_bundle_names_its_hash_and_replays_bit_identically(generated: Path, llama) -> None:
    bundle = Bundle.open(generated)
    assert (bundle.manifest["format_version"], bundle.hash) == ("1.3", "blake3")
    assert {info.get("digest") for info in bundle.manifest["files"].values()} == {"blake3", "blake3-entries"}
    assert bundle.manifest["output"]["step_logits_sha256"]  # a generation: one digest per step
    assert bundle.verify_contents() == []
    report = _replay(generated, llama).verify()
    assert report.bit_identical, report.summary()
    assert report.sites and all(check.identical for check in report.sites)


def test_a_1_2_bundle_reads_verifies_and_replays(llama, tmp_path: Path) -> None:
    """``bundle.hash: sha256`` writes the digests of format 1.2; without ``hash`` and as
    version 1.2 that is the bundle an older model-forensics wrote."""
    from model_forensics.recorder.session import record_prompt

    path = record(llama, tmp_path / "b", max_new_tokens=2)  # blake3, to compare with below
    sha = tmp_path / "sha"
    recorder = RecorderHooks({"bundle": {"hash": "sha256"}}, granularity="all", sketch="full")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as record() does: the bundle records it, its replay uses it
    try:
        record_prompt(llama, PROMPT, sha, recorder=recorder, max_new_tokens=2, predicate=Bundle.open(path).predicate)
    finally:
        torch.set_num_threads(threads)
    _edit(sha, lambda m: (m.pop("hash"), m.update(format_version="1.2")))
    old = Bundle.open(sha)
    assert old.hash == "sha256" and old.verify_contents() == []
    site = old.sites[0]
    recorded = old.activation(site)
    assert old.manifest["sites"][site]["sha256"] == hashlib.sha256(recorded.numpy().tobytes()).hexdigest()
    assert Bundle.open(path).manifest["sites"][site]["sha256"] == blake3.blake3(recorded.numpy().tobytes()).hexdigest()
    report = _replay(sha, llama).verify()
    assert report.bit_identical, report.summary()


def test_logits_digests_are_of_the_bundle_hash(tiny, tmp_path: Path) -> None:
    loaded = tiny["gpt2"]
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits  # (1, 5, V): what the recorder hashes
    expected = {"sha256": hashlib.sha256, "blake3": blake3.blake3}
    for name, plain in expected.items():
        config = {"bundle": {"hash": name}}
        with RecorderHooks(config, granularity="layer").install_hooks(loaded.model) as rec, torch.no_grad():
            loaded.model(input_ids=ids)
            manifest = Bundle.open(rec.create_bundle(tmp_path / name)).manifest
        assert manifest["output"]["logits_sha256"] == plain(logits.numpy().tobytes()).hexdigest(), name


@pytest.mark.parametrize("name", ["activations.safetensors", "outputs.safetensors", "cube.json", "calls.jsonl"])
def test_a_flipped_byte_in_a_1_3_file_is_reported(generated: Path, tmp_path: Path, name: str) -> None:
    path = Path(shutil.copytree(generated, tmp_path / "b"))
    data = bytearray((path / name).read_bytes())
    if not data:  # no external calls were recorded: a changed file is one that is not empty
        data = bytearray(b"{}\n")
    else:
        data[len(data) // 2] ^= 0x01
    (path / name).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{name}"):
        Bundle.open(path)
    problems = Bundle.open(path, verify=False).verify_contents()
    assert any(p.startswith(name) for p in problems), problems


@pytest.mark.parametrize("value", ["md5", "SHA256", 3, None])
def test_an_unknown_hash_is_refused_in_one_line(generated: Path, tmp_path: Path, value: object) -> None:
    path = Path(shutil.copytree(generated, tmp_path / "b"))
    _edit(path, lambda m: m.update(hash=value))
    with pytest.raises(BundleError, match="is not a digest algorithm this model-forensics knows") as info:
        Bundle.open(path)
    assert "\n" not in str(info.value) and "upgrade model-forensics" in str(info.value)


def test_a_file_entry_names_its_own_digest(generated: Path, tmp_path: Path) -> None:
    """A tool that re-hashes one file with plain sha256 (no ``digest`` key: sha256, as in
    1.2) leaves a bundle that still verifies; the site digests stay under ``hash``."""
    path = Path(shutil.copytree(generated, tmp_path / "b"))
    file = path / "activations.safetensors"
    plain = {"sha256": digests.file_digest(file, "sha256"), "bytes": file.stat().st_size}
    _edit(path, lambda m: m["files"].update({file.name: plain}))
    assert Bundle.open(path).verify_contents() == []
    _edit(path, lambda m: m["files"][file.name].update(digest="blake3"))
    assert Bundle.open(path, verify=False).verify_files() == [
        "activations.safetensors blake3 differs from the manifest"
    ]


def test_pack_and_unpack_keep_a_1_3_bundle(generated: Path, tmp_path: Path) -> None:
    archive = pack_bundle(generated, tmp_path / "b.mfb.zip")
    back = unpack_bundle(archive, tmp_path / "back")
    with Bundle.open(archive) as packed, Bundle.open(back) as unpacked:
        assert packed.digest == unpacked.digest == Bundle.open(generated).digest
        assert unpacked.verify_contents() == []


def test_close_releases_files_and_refuses_reading(generated: Path, tmp_path: Path) -> None:
    archive = pack_bundle(generated, tmp_path / "b.mfb.zip")
    with Bundle.open(archive) as bundle:
        unpacked = bundle.path
        site = bundle.sites[0]
        kept = bundle.activation(site)  # a view of the map: stays valid after close
        copy = kept.clone()
    assert not unpacked.exists()  # the archive's unpacked copy is gone
    bundle.close()  # idempotent
    assert torch.equal(kept, copy)
    assert bundle.name and bundle.sites  # the manifest stays readable
    for read in (lambda: bundle.activation(site), lambda: bundle.inputs, bundle.cube, bundle.verify_contents):
        with pytest.raises(BundleError, match="was closed; open it again") as info:
            read()
        assert "\n" not in str(info.value)


def test_close_releases_the_file_descriptors(generated: Path) -> None:
    import gc
    import os

    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    bundle = Bundle.open(generated)
    assert bundle.verify_contents() == [] and bundle.inputs
    assert len(os.listdir("/proc/self/fd")) > before  # the three mapped files, held open
    bundle.close()
    assert len(os.listdir("/proc/self/fd")) == before  # no tensor views them: closed now, not at GC
