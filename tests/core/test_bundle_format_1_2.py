"""Format 1.2 on: each byte is hashed once (per entry; file and site digests derived from
the entry digests), a tampered byte anywhere is still caught, and 1.1 bundles still read."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model_forensics import Bundle, BundleError, RecorderHooks

IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 8, 4]])
TENSOR_FILES = ("inputs.safetensors", "outputs.safetensors", "activations.safetensors")


@pytest.fixture(scope="module")
def recorded(tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    with RecorderHooks(granularity="all", sketch="int8").install_hooks(tiny["llama"].model) as rec, torch.no_grad():
        tiny["llama"].model(input_ids=IDS)
        return rec.create_bundle(tmp_path_factory.mktemp("v12") / "b")


@pytest.fixture()
def bundle(recorded: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(recorded, tmp_path / "b"))


def _flip(file: Path, offset: int) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x01
    file.write_bytes(bytes(data))


def _data_start(file: Path) -> int:
    return 8 + struct.unpack("<Q", file.read_bytes()[:8])[0]


@pytest.mark.parametrize("name", TENSOR_FILES)
@pytest.mark.parametrize("where", ["header", "first data byte", "last byte"])
def test_a_flipped_byte_anywhere_is_caught(bundle: Path, name: str, where: str) -> None:
    file = bundle / name
    start, size = _data_start(file), file.stat().st_size
    offset = {"header": start - 3, "first data byte": start, "last byte": size - 1}[where]
    if where == "header":  # a digit of the JSON header, so that it still parses
        text = file.read_bytes()[:start]
        offset = max(i for i, c in enumerate(text) if chr(c).isdigit() and text[i - 1 : i] in b"[,:0123456789")
    _flip(file, offset)
    with pytest.raises(BundleError, match=name):
        Bundle.open(bundle)
    assert any(name in p for p in Bundle.open(bundle, verify=False).verify_contents())


def test_a_flipped_site_byte_names_the_file(bundle: Path) -> None:
    file = bundle / "activations.safetensors"
    _flip(file, (_data_start(file) + file.stat().st_size) // 2)
    assert Bundle.open(bundle, verify=False).verify_contents() == [
        "activations.safetensors blake3 differs from the manifest"
    ]


def test_each_byte_is_hashed_once_on_verify(bundle: Path, monkeypatch) -> None:
    """verify_contents hashes each data byte exactly once (the digests in the manifest are
    derived from the entry digests)."""
    import model_forensics.core.bundle as bundle_mod

    hashed = []
    real = bundle_mod.digests.digest  # every raw digest the bundle code takes

    def counting(data, algorithm):  # type: ignore[no-untyped-def]
        hashed.append(memoryview(data).nbytes)
        return real(data, algorithm)

    monkeypatch.setattr(bundle_mod.digests, "digest", counting)
    whole = []
    real_file = bundle_mod.file_digest
    monkeypatch.setattr(bundle_mod, "file_digest", lambda f, a: whole.append(f.name) or real_file(f, a))
    assert Bundle.open(bundle, verify=False).verify_contents() == []
    assert sum(hashed) == sum((bundle / name).stat().st_size for name in TENSOR_FILES)
    assert sorted(whole) == ["calls.jsonl", "cube.json"]  # the JSON files: one plain digest each


def _downgrade_to_1_1(path: Path) -> None:
    """Rewrite the manifest as format 1.1 defines it: plain file sha256s and site digests
    over the entries' bytes."""
    manifest = json.loads((path / "manifest.json").read_bytes())
    manifest["format_version"] = "1.1"
    del manifest["hash"]  # sha256 (the exact digests of sketched sites: not checked without a replay)
    for name in TENSOR_FILES:
        data = (path / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    stored = load_file(path / "activations.safetensors")
    for site, info in manifest["sites"].items():
        digest = hashlib.sha256()
        for name in sorted(k for k in stored if k == site or k.startswith(site + "::")):
            t = stored[name]
            digest.update(f"{name}:{str(t.dtype).removeprefix('torch.')}:{list(t.shape)};".encode())
            digest.update(t.numpy().tobytes())
        info["stored_sha256"] = digest.hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))


def test_format_1_1_bundles_still_open_and_verify(bundle: Path) -> None:
    _downgrade_to_1_1(bundle)
    opened = Bundle.open(bundle)
    assert opened.manifest["format_version"] == "1.1"
    assert opened.verify_contents() == []
    site = opened.sites[0]
    edit = json.loads((bundle / "manifest.json").read_bytes())
    edit["sites"][site]["stored_sha256"] = "0" * 64
    (bundle / "manifest.json").write_text(json.dumps(edit))
    assert Bundle.open(bundle).verify_contents() == [f"site '{site}': stored sketch sha256 differs from the manifest"]


def test_a_1_1_bundle_with_a_changed_byte_fails(bundle: Path) -> None:
    _downgrade_to_1_1(bundle)
    _flip(bundle / "outputs.safetensors", (bundle / "outputs.safetensors").stat().st_size - 1)
    with pytest.raises(BundleError, match="outputs.safetensors sha256 differs"):
        Bundle.open(bundle)
