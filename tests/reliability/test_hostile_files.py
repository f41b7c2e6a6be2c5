"""Hostile archives and files: every one is a BundleError with one clear line, never a
traceback, and nothing is allocated from a size the file only declares."""

from __future__ import annotations

import json
import os
import struct
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest
from hostile import edit_manifest, rehash, safetensors_parts, write_safetensors

from model_forensics import Bundle, BundleError
from model_forensics.core.bundle import BUNDLE_FILES, pack_bundle
from model_forensics.core.config import BundleConfig

ZIP_NAMES = sorted(BUNDLE_FILES - {"signature.json"})


def _zip(path: Path, entries: list[tuple[str, bytes]], method: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return path


def _entries(bundle: Path) -> list[tuple[str, bytes]]:
    return [(name, (bundle / name).read_bytes()) for name in ZIP_NAMES]


def _refused(path: Path, match: str, limits: BundleConfig | None = None) -> str:
    with pytest.raises(BundleError, match=match) as info:
        Bundle.open(path, limits=limits)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# -- archives ----------------------------------------------------------------------------------
def test_a_crc_error_is_refused(fresh, tmp_path: Path) -> None:
    archive = pack_bundle(fresh("forward"), tmp_path / "b.mfb.zip")
    raw = bytearray(archive.read_bytes())
    start = raw.index(b"model-forensics-bundle")  # inside the stored manifest entry
    raw[start] ^= 0x20
    archive.write_bytes(bytes(raw))
    _refused(archive, "corrupt|CRC")


def test_an_encrypted_entry_is_refused(fresh, tmp_path: Path) -> None:
    archive = pack_bundle(fresh("forward"), tmp_path / "b.mfb.zip")
    raw = bytearray(archive.read_bytes())
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # local header, central directory
        at = raw.index(sig)
        raw[at + flag_at] |= 0x01
    archive.write_bytes(bytes(raw))
    _refused(archive, "encrypted")


def test_an_unsupported_compression_method_is_refused(fresh, tmp_path: Path) -> None:
    archive = _zip(tmp_path / "b.mfb.zip", _entries(fresh("forward")), method=zipfile.ZIP_BZIP2)
    _refused(archive, "compression method")


def test_duplicate_names_are_refused(fresh, tmp_path: Path) -> None:
    entries = _entries(fresh("forward"))
    with pytest.warns(UserWarning, match="Duplicate name"):
        archive = _zip(tmp_path / "b.mfb.zip", [*entries, entries[0]])
    _refused(archive, "twice")


@pytest.mark.parametrize("delta", [-7, 5])
def test_lying_sizes_are_refused(fresh, tmp_path: Path, delta: int) -> None:
    archive = _zip(tmp_path / "b.mfb.zip", _entries(fresh("forward")), method=zipfile.ZIP_DEFLATED)
    raw = bytearray(archive.read_bytes())
    central = raw.index(b"PK\x01\x02")  # the first entry's central-directory record
    (size,) = struct.unpack_from("<I", raw, central + 24)
    struct.pack_into("<I", raw, central + 24, size + delta)
    archive.write_bytes(bytes(raw))
    _refused(archive, "declared size|corrupt|inflates")


def test_a_zip_bomb_is_stopped_by_ratio_before_inflating(fresh, tmp_path: Path) -> None:
    entries = [(n, d) for n, d in _entries(fresh("forward")) if n != "calls.jsonl"]
    archive = _zip(tmp_path / "b.mfb.zip", [*entries, ("calls.jsonl", b"\n" * 50_000_000)], zipfile.ZIP_DEFLATED)
    assert archive.stat().st_size < 1_000_000
    _refused(archive, "zip bomb")


def test_a_zip_bomb_that_lies_about_its_size_is_stopped_while_inflating(fresh, tmp_path: Path) -> None:
    entries = [(n, d) for n, d in _entries(fresh("forward")) if n != "calls.jsonl"]
    archive = _zip(tmp_path / "b.mfb.zip", [*entries, ("calls.jsonl", b"\n" * 20_000_000)], zipfile.ZIP_DEFLATED)
    raw = bytearray(archive.read_bytes())
    at = raw.rindex(b"PK\x01\x02")  # calls.jsonl is the last entry
    (csize,) = struct.unpack_from("<I", raw, at + 20)
    struct.pack_into("<I", raw, at + 24, csize * 2)  # claims a 2x ratio
    archive.write_bytes(bytes(raw))
    tracemalloc.start()
    _refused(archive, "inflates past|declared size|corrupt")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 * 1024 * 1024


def test_the_total_inflated_size_is_capped(fresh, tmp_path: Path) -> None:
    archive = pack_bundle(fresh("forward"), tmp_path / "b.mfb.zip")
    _refused(archive, "max_unpacked_mb", BundleConfig(max_unpacked_mb=0.001))


@pytest.mark.parametrize(
    "entries",
    [
        [("manifest.json", b"{}"), ("../../etc/passwd", b"x")],
        [("sub/manifest.json", b"{}")],
        [("manifest.json/", b"")],
        [("/abs.json", b"x")],
    ],
)
def test_paths_and_folders_in_an_archive_are_refused(tmp_path: Path, entries) -> None:
    _refused(_zip(tmp_path / "b.mfb.zip", entries), "unexpected entry")


@pytest.mark.parametrize("data", [b"", b"PK\x05\x06" + b"\x00" * 18, b"PK\x03\x04garbage", os.urandom(4096)])
def test_garbage_archives_are_refused(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "b.mfb.zip"
    path.write_bytes(data)
    _refused(path, ".")


def test_a_truncated_archive_is_refused(fresh, tmp_path: Path) -> None:
    archive = pack_bundle(fresh("forward"), tmp_path / "b.mfb.zip")
    raw = archive.read_bytes()
    for cut in (len(raw) // 3, len(raw) - 30, len(raw) - 1):
        archive.write_bytes(raw[:cut])
        _refused(archive, ".")


# -- safetensors headers ------------------------------------------------------------------------
def _entry(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda h, d: (h, d, 10**12), "header"),
        (lambda h, d: ("[1, 2, 3]", d, None), "not a JSON object"),
        (lambda h, d: ({**h, "__metadata__": {"x": 1}}, d, None), "__metadata__"),
        (lambda h, d: ({_entry(h): {**h[_entry(h)], "dtype": "F128"}}, d, None), "dtype"),
        (lambda h, d: ({_entry(h): {**h[_entry(h)], "shape": [10**6, 10**6]}}, d, None), "does not fill"),
        (lambda h, d: ({_entry(h): {**h[_entry(h)], "shape": [-1]}}, d, None), "shape"),
        (lambda h, d: ({_entry(h): {**h[_entry(h)], "data_offsets": [0, 10**15]}}, d, None), "beyond"),
        (lambda h, d: ({_entry(h): {**h[_entry(h)], "data_offsets": [1, 0]}}, d, None), "beyond"),
        (lambda h, d: ({_entry(h): {**h[_entry(h)], "extra": 1}}, d, None), "malformed"),
        (lambda h, d: (h, d + b"\x00" * 16, None), "after the last entry"),
        (lambda h, d: ({**h, "copy": dict(h[_entry(h)])}, d, None), "overlap"),
    ],
)
def test_hostile_safetensors_headers_are_refused(fresh, damage, match: str) -> None:
    bundle = fresh("forward")
    file = bundle / "inputs.safetensors"
    header, data = safetensors_parts(file)
    new_header, new_data, declared = damage(header, data)
    if isinstance(new_header, str):
        text = new_header.encode()
        file.write_bytes(len(text).to_bytes(8, "little") + text + new_data)
    else:
        write_safetensors(file, new_header, new_data, declared)
    rehash(bundle)
    with pytest.raises(BundleError, match=match):
        Bundle.open(bundle).inputs  # noqa: B018


def test_a_site_declared_huge_is_refused_before_any_allocation(fresh) -> None:
    bundle = fresh("forward")
    edit_manifest(bundle, lambda m: next(iter(m["sites"].values())).update(shape=[10**6, 10**6]))
    tracemalloc.start()
    _refused(bundle, "before allocating")
    assert tracemalloc.get_traced_memory()[1] < 64 * 1024 * 1024
    tracemalloc.stop()


def test_a_topk_sketch_pointing_outside_its_site_is_refused(word_models, tmp_path: Path) -> None:
    import torch

    from model_forensics import RecorderHooks
    from model_forensics.core.bundle import Bundle as B

    loaded = word_models["gpt2"]
    with RecorderHooks(sketch="topk").install_hooks(loaded.model) as rec, torch.no_grad():
        loaded.model(input_ids=torch.tensor([[3, 4, 5, 6]]))
        path = rec.create_bundle(tmp_path / "b")
    site = B.open(path).sites[0]
    edit_manifest(path, lambda m: m["sites"][site].update(shape=[1, 1, 1]))
    with pytest.raises(BundleError, match="outside the declared shape|does not match"):
        B.open(path).activation(site)


# -- JSON files ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "match"),
    [
        (b"[1, 2, 3]", "JSON object"),
        (b'"just a string"', "JSON object"),
        (b"null", "JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "deep"),
        (b'{"a": ' * 200 + b"1" + b"}" * 200, "deep"),
        (b'{"format": NaN}', "NaN"),
        (b'{"format": Infinity}', "Infinity"),
        (b'{"x": 1e999}', "infinity"),
        (b'{"format": "a", "format": "b"}', "repeats the key"),
        (b"\xff\xfe{}", "UTF-8"),
        (b'{"x": 1' + b"0" * 5000 + b"}", "not valid JSON"),
        (b"{", "not valid JSON"),
    ],
)
def test_malformed_manifests_are_refused(fresh, text: bytes, match: str) -> None:
    bundle = fresh("forward")
    (bundle / "manifest.json").write_bytes(text)
    _refused(bundle, match)


def test_a_huge_string_in_the_manifest_is_refused(fresh) -> None:
    bundle = fresh("forward")
    edit_manifest(bundle, lambda m: m["extras"].update(note="x" * 2_000_000))
    _refused(bundle, "max_string_chars")


def test_an_oversized_manifest_is_refused_without_parsing(fresh) -> None:
    bundle = fresh("forward")
    (bundle / "manifest.json").write_bytes(b" " * (9 * 1024 * 1024))
    _refused(bundle, "over the .*limit")


def test_a_fifo_in_place_of_the_manifest_is_refused_without_blocking(fresh) -> None:
    bundle = fresh("forward")
    (bundle / "manifest.json").unlink()
    os.mkfifo(bundle / "manifest.json")
    start = time.perf_counter()
    _refused(bundle, "not a plain file")
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize(
    ("line", "match"),
    [(b"\xff\xff", "UTF-8"), (b"[1, 2]", "not a JSON object"), (b"{oops", "not valid JSON"), (b'{"a": NaN}', "NaN")],
)
def test_calls_lines_must_be_utf8_json_objects(fresh, line: bytes, match: str) -> None:
    bundle = fresh("forward")
    (bundle / "calls.jsonl").write_bytes(b'{"order": 0}\n' + line + b"\n")
    rehash(bundle)
    with pytest.raises(BundleError, match=match):
        Bundle.open(bundle).calls()
    assert any(match.split("|")[0] in p or "calls.jsonl" in p for p in Bundle.open(bundle).verify_contents())


def test_a_cube_that_breaks_its_schema_is_reported(fresh) -> None:
    bundle = fresh("forward")
    (bundle / "cube.json").write_text(json.dumps({"meta": 1}))
    rehash(bundle)
    assert any("cube.json" in p for p in Bundle.open(bundle).verify_contents())
