"""The fast bundle writer and single-pass reader leave bundles byte for byte as the plain
algorithm makes them: safetensors' own ``save_file`` for the data files, and hashes of
copied bytes for every digest in the manifest (per entry, then derived), under the
manifest's ``hash``: blake3 (format 1.3, the default) or sha256 (``bundle.hash: sha256``,
the digests of format 1.2)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import blake3
import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save_file as safetensors_save_file

import model_forensics.core.bundle as bundle_mod
from model_forensics import Bundle, RecorderHooks

IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 8, 4]])
TENSOR_FILES = ("inputs.safetensors", "outputs.safetensors", "activations.safetensors")


HASHES = {"sha256": hashlib.sha256, "blake3": blake3.blake3}  # the plain libraries, not core.digests


def _plain_stored_sha256(entries: dict[str, torch.Tensor], hash: str = "sha256") -> str:
    """The site digest as format 1.2 defines it, from copied bytes: per entry (sorted by
    name) ``name:dtype:[shape];`` then the digest of its bytes, all under ``hash``."""
    digest = HASHES[hash]()
    for name in sorted(entries):
        t = entries[name].contiguous()
        digest.update(f"{name}:{str(t.dtype).removeprefix('torch.')}:{list(t.shape)};".encode())
        digest.update(HASHES[hash](t.reshape(-1).view(torch.uint8).numpy().tobytes()).digest())
    return digest.hexdigest()


def _plain_file_digest(data: bytes, hash: str = "sha256") -> str:
    """``<hash>-entries`` from the file's bytes: the header's digest, then each entry's, in
    the header's order."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    digest = HASHES[hash](HASHES[hash](data[: 8 + length]).digest())
    for name, entry in header.items():
        if name != "__metadata__":
            begin, end = entry["data_offsets"]
            digest.update(HASHES[hash](data[8 + length + begin : 8 + length + end]).digest())
    return digest.hexdigest()


def _record(tiny, path: Path, sketch: str, hash: str = "blake3") -> Path:
    loaded = tiny["llama"]
    config = {"bundle": {"hash": hash}}
    with RecorderHooks(config, granularity="all", sketch=sketch).install_hooks(loaded.model) as rec, torch.no_grad():
        loaded.model(input_ids=IDS)
        return rec.create_bundle(path)


@pytest.mark.parametrize("hash", ["blake3", "sha256"])
@pytest.mark.parametrize("sketch", ["full", "fp16", "int8", "topk"])
def test_written_bundle_equals_the_plain_algorithm(tiny, tmp_path: Path, sketch: str, hash: str) -> None:
    path = _record(tiny, tmp_path / "b", sketch, hash)
    manifest = json.loads((path / "manifest.json").read_bytes())
    for name in TENSOR_FILES:
        again = tmp_path / name
        safetensors_save_file(load_file(path / name), str(again))
        assert (path / name).read_bytes() == again.read_bytes(), name
    for name, info in manifest["files"].items():
        data = (path / name).read_bytes()
        if name in TENSOR_FILES:
            scheme = f"{hash}-entries"
            assert info == {"sha256": _plain_file_digest(data, hash), "bytes": len(data), "digest": scheme}, name
        elif hash == "sha256":  # exactly the 1.2 table entry
            assert info == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}, name
        else:
            assert info == {"sha256": blake3.blake3(data).hexdigest(), "bytes": len(data), "digest": "blake3"}, name
    stored = load_file(path / "activations.safetensors")
    for site, info in manifest["sites"].items():
        entries = {k: v for k, v in stored.items() if k == site or k.startswith(site + "::")}
        assert info["stored_sha256"] == _plain_stored_sha256(entries, hash), site
        if sketch == "full":
            assert info["sha256"] == HASHES[hash](stored[site].numpy().tobytes()).hexdigest()
    assert (manifest["format_version"], manifest["hash"]) == ("1.3", hash)
    assert Bundle.open(path, verify=False).verify_contents() == []


def test_same_run_gives_the_same_digest_through_both_writers(tiny, tmp_path: Path, monkeypatch) -> None:
    """The manifest (which holds every file's sha256) is the same whether the data files are
    written by the fast writer or by safetensors itself."""
    loaded = tiny["llama"]
    with RecorderHooks(granularity="all", sketch="int8").install_hooks(loaded.model) as rec, torch.no_grad():
        loaded.model(input_ids=IDS)
        fast = Bundle.open(rec.create_bundle(tmp_path / "fast"))
        monkeypatch.setattr(
            bundle_mod, "save_file", lambda tensors, name, algorithm: safetensors_save_file(tensors, name)
        )
        plain = Bundle.open(rec.create_bundle(tmp_path / "plain"))

    def content(b: Bundle) -> dict:  # what may differ: the name, the time, and the cube's time stamp
        files = {k: v for k, v in b.manifest["files"].items() if k != "cube.json"}
        return {**{k: v for k, v in b.manifest.items() if k not in ("created", "name")}, "files": files}

    assert content(fast) == content(plain)
    assert {**fast.cube(), "meta": None} == {**plain.cube(), "meta": None}


def test_layout_matches_safetensors_for_every_dtype(tmp_path: Path) -> None:
    dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32]
    dtypes += [torch.int16, torch.int8, torch.uint8, torch.bool]
    tensors = {f"t{i}": torch.ones(3, i + 1, dtype=dt) for i, dt in enumerate(dtypes)}
    tensors |= {"blocks.0.attn::scale": torch.zeros(2, 0), "a b/c": torch.arange(5), "": torch.zeros(1)}
    safetensors_save_file(tensors, str(tmp_path / "peer"))
    assert bundle_mod.save_file(tensors, str(tmp_path / "ours")) is not None
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "peer").read_bytes()
    assert bundle_mod.save_file({}, str(tmp_path / "empty")) is not None
    safetensors_save_file({}, str(tmp_path / "empty-peer"))
    assert (tmp_path / "empty").read_bytes() == (tmp_path / "empty-peer").read_bytes()


def test_names_outside_the_fast_layout_fall_back_to_safetensors(tmp_path: Path) -> None:
    tensors = {'quote"d': torch.ones(2), "ünï": torch.zeros(3)}
    assert bundle_mod.save_file(tensors, str(tmp_path / "ours")) is None
    safetensors_save_file(tensors, str(tmp_path / "peer"))
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "peer").read_bytes()


def test_single_pass_verification_catches_a_changed_full_site(tiny, tmp_path: Path) -> None:
    path = _record(tiny, tmp_path / "b", "full")
    manifest = json.loads((path / "manifest.json").read_bytes())
    site = next(iter(manifest["sites"]))
    manifest["sites"][site]["sha256"] = "0" * 64
    (path / "manifest.json").write_text(json.dumps(manifest))
    problems = Bundle.open(path, verify=False).verify_contents()
    assert problems == [f"site '{site}': tensor blake3 differs from the manifest"]
