import json
import os
import shutil
import struct
import zipfile
from pathlib import Path

import jsonschema
import pytest
import torch

from model_forensics import Bundle, BundleError, RecorderHooks, class_is
from model_forensics.core import bundle as bundle_mod
from model_forensics.core.bundle import load_schema, pack_bundle


def _record(tiny, out: Path, sketch: str = "full", granularity: str = "all") -> Path:
    loaded = tiny["gpt2"]
    with RecorderHooks(granularity=granularity, sketch=sketch).install_hooks(loaded.model) as rec, torch.no_grad():
        loaded.model(input_ids=torch.tensor([[1, 5, 9, 3, 7, 2]]))
        return rec.create_bundle(out, predicate=class_is(3), extras={"note": "test"})


@pytest.fixture()
def bundle_dir(tiny, tmp_path: Path) -> Path:
    return _record(tiny, tmp_path / "b")


def test_round_trip_full_sketch_is_exact(tiny, tmp_path: Path) -> None:
    loaded = tiny["gpt2"]
    rec = RecorderHooks(granularity="all", sketch="full").install_hooks(loaded.model)
    with torch.no_grad():
        loaded.model(input_ids=torch.tensor([[1, 5, 9, 3, 7, 2]]))
    recorded = rec.recorded()
    path = rec.create_bundle(tmp_path / "b")
    rec.remove_hooks()
    b = Bundle.open(path)
    assert set(b.sites) == set(recorded)
    for site, tensor in recorded.items():
        assert torch.equal(b.activation(site), tensor), site
    assert torch.equal(b.inputs["input_ids"], torch.tensor([[1, 5, 9, 3, 7, 2]]))


@pytest.mark.parametrize("sketch", ["fp16", "int8", "topk"])
def test_lossy_sketches_decode_within_bound(tiny, tmp_path: Path, sketch: str) -> None:
    loaded = tiny["gpt2"]
    rec = RecorderHooks(granularity="layer", sketch=sketch).install_hooks(loaded.model)
    with torch.no_grad():
        loaded.model(input_ids=torch.tensor([[1, 5, 9, 3, 7, 2]]))
    recorded = rec.recorded()
    b = Bundle.open(rec.create_bundle(tmp_path / "b"))
    rec.remove_hooks()
    for site, x in recorded.items():
        y = b.activation(site)
        if sketch == "fp16":
            assert torch.all((y - x).abs() <= x.abs() * 2**-11 + 6e-8)
        elif sketch == "int8":
            assert torch.all((y - x).abs() <= x.abs().amax(-1, keepdim=True) / 254 + 1e-6)
        else:
            kept = y != 0
            assert torch.equal(y[kept], x[kept])


def test_manifest_and_cube_match_their_schemas(bundle_dir: Path) -> None:
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    jsonschema.validate(manifest, load_schema("manifest"))
    jsonschema.validate(json.loads((bundle_dir / "cube.json").read_text()), load_schema("cube"))
    broken = dict(manifest, sites={"embed": {"shape": [1], "dtype": "float32"}})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, load_schema("manifest"))


def test_manifest_records_hashes_and_provenance(bundle_dir: Path) -> None:
    m = Bundle.open(bundle_dir).manifest
    assert len(m["model"]["weights_sha256"]) == 64
    assert set(m["files"]) == set(bundle_mod.DATA_FILES)
    assert "torch" in m["provenance"]["package_versions"]
    assert m["determinism"]["torch"]["num_threads"] == torch.get_num_threads()
    assert m["predicate"]["kind"] == "class_is" and isinstance(m["predicate"]["holds"], bool)
    assert m["extras"] == {"note": "test"}


def test_tampered_activations_are_rejected(bundle_dir: Path) -> None:
    data = bytearray((bundle_dir / "activations.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bundle_dir / "activations.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="activations.safetensors blake3 differs"):
        Bundle.open(bundle_dir)


def test_newer_major_version_is_rejected(bundle_dir: Path) -> None:
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["format_version"] = "2.0"
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format version 2.0.*upgrade"):
        Bundle.open(bundle_dir)


def test_existing_bundle_is_not_overwritten(tiny, bundle_dir: Path) -> None:
    before = (bundle_dir / "manifest.json").read_bytes()
    with pytest.raises(BundleError, match="already exists"):
        _record(tiny, bundle_dir)
    assert (bundle_dir / "manifest.json").read_bytes() == before


def test_crash_mid_write_leaves_nothing(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle_mod, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        _record(tiny, tmp_path / "b")
    assert os.listdir(tmp_path) == []


def test_overwrite_replaces_atomically(tiny, bundle_dir: Path) -> None:
    _record(tiny, bundle_dir.parent / "b2")
    loaded = tiny["gpt2"]
    with RecorderHooks(granularity="layer").install_hooks(loaded.model) as rec, torch.no_grad():
        loaded.model(input_ids=torch.tensor([[4, 4, 4]]))
        rec.create_bundle(bundle_dir, overwrite=True)
    assert Bundle.open(bundle_dir).manifest["recorder"]["granularity"] == "layer"
    assert sorted(p.name for p in bundle_dir.parent.iterdir()) == ["b", "b2"]


def test_zip_round_trip(bundle_dir: Path, tmp_path: Path) -> None:
    z = pack_bundle(bundle_dir, tmp_path / "x.mfb.zip")
    b = Bundle.open(z)
    assert b.sites == Bundle.open(bundle_dir).sites
    assert torch.equal(b.activation("blocks.0.mlp"), Bundle.open(bundle_dir).activation("blocks.0.mlp"))


def test_zip_path_traversal_is_rejected(bundle_dir: Path, tmp_path: Path) -> None:
    z = tmp_path / "evil.mfb.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(bundle_dir / "manifest.json", arcname="manifest.json")
        zf.writestr("../escape.txt", "x")
    with pytest.raises(BundleError, match="path traversal"):
        Bundle.open(z)
    assert not (tmp_path.parent / "escape.txt").exists()


def test_links_are_rejected(bundle_dir: Path) -> None:
    (bundle_dir / "calls.jsonl").unlink()
    (bundle_dir / "calls.jsonl").symlink_to("/etc/hostname")
    with pytest.raises(BundleError, match="link"):
        Bundle.open(bundle_dir)


def test_oversized_header_is_rejected(bundle_dir: Path) -> None:
    path = bundle_dir / "inputs.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**40) + data[8:])
    b = Bundle.open(bundle_dir, verify=False)
    with pytest.raises(BundleError, match="header"):
        _ = b.inputs


def test_missing_and_non_bundle_paths(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        Bundle.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="no manifest.json"):
        Bundle.open(tmp_path / "empty")


def test_unwritable_parent_is_a_clear_error(tiny, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "file").write_text("x")
    with pytest.raises(BundleError, match="cannot write bundle"):
        _record(tiny, locked / "file" / "b")
    shutil.rmtree(locked)
