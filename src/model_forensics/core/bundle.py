"""Incident bundles, format v1: a directory (or the same tree zipped, ``*.mfb.zip``).

::

    manifest.json            format + version, model reference, inputs, outputs, predicate,
                             sites (shape, dtype, sketch, sha256 of the exact tensor),
                             determinism, provenance, sha256 + size of every other file
    inputs.safetensors       what the model was called with (input_ids, attention_mask, …)
    outputs.safetensors      logits at the positions the predicate reads, generated ids
    activations.safetensors  one entry (or a few ``site::part`` entries) per site
    cube.json                ActivityCube
    calls.jsonl              recorded external calls, in order

No pickle anywhere. Writes go to a temporary sibling directory that is renamed into place,
so a crash never leaves a half bundle. Readers check the schema, the major version and
every file's sha256, and refuse links, path traversal and oversized headers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model_forensics.core import sketches
from model_forensics.core.errors import BundleError
from model_forensics.core.predicates import Predicate

FORMAT_NAME = "model-forensics-bundle"
FORMAT_VERSION = "1.0"
MANIFEST = "manifest.json"
DATA_FILES = ("inputs.safetensors", "outputs.safetensors", "activations.safetensors", "cube.json", "calls.jsonl")
MAX_HEADER_BYTES = 64 * 1024 * 1024
MAX_ZIP_BYTES = 64 * 1024**3


def load_schema(name: str) -> dict[str, Any]:
    """A JSON Schema shipped with the package: ``manifest`` or ``cube``."""
    text = resources.files("model_forensics.core").joinpath(f"schemas/{name}.schema.json").read_text()
    return dict(json.loads(text))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class BundleContents:
    """Everything that goes into a bundle, before it is written."""

    manifest: dict[str, Any]
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    activations: dict[str, torch.Tensor]
    cube: dict[str, Any] | None = None
    calls: list[dict[str, Any]] | None = None


def write_bundle(path: str | Path, contents: BundleContents, overwrite: bool = False) -> Path:
    """Write a bundle atomically and return its path.

    ``contents.manifest`` gets its ``files`` table filled in here; ``contents.activations``
    must already be sketch-encoded (see :mod:`model_forensics.core.sketches`).

    Raises:
        BundleError: the target exists (and ``overwrite`` is False) or is not writable.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise BundleError(f"bundle '{target}' already exists; choose another path or pass overwrite=True (--overwrite)")
    parent = target.parent if str(target.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    except OSError as exc:
        raise BundleError(
            f"cannot write bundle under '{parent}': {exc.strerror}; choose a writable directory"
        ) from None
    try:
        _write_files(tmp, contents)
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=parent))
            os.replace(target, trash / "old")
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BundleError(f"cannot write bundle '{target}': {exc}; nothing was written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write_files(tmp: Path, contents: BundleContents) -> None:
    tensors = {
        "inputs.safetensors": contents.inputs,
        "outputs.safetensors": contents.outputs,
        "activations.safetensors": contents.activations,
    }
    for name, entries in tensors.items():
        save_file({k: v.detach().contiguous() for k, v in entries.items()}, str(tmp / name))
    (tmp / "cube.json").write_text(json.dumps(contents.cube or {}, allow_nan=False))
    with (tmp / "calls.jsonl").open("w") as fh:
        for call in contents.calls or []:
            fh.write(json.dumps(call, sort_keys=True) + "\n")
    manifest = dict(contents.manifest)
    manifest["files"] = {
        name: {"sha256": file_sha256(tmp / name), "bytes": (tmp / name).stat().st_size} for name in DATA_FILES
    }
    jsonschema.validate(manifest, load_schema("manifest"))
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, allow_nan=False))
    for name in (*DATA_FILES, MANIFEST):
        with (tmp / name).open("rb") as fh:
            os.fsync(fh.fileno())


def pack_bundle(path: str | Path, out: str | Path) -> Path:
    """Zip a bundle directory into ``out`` (``*.mfb.zip``), atomically."""
    bundle = Bundle.open(path)
    target = Path(out)
    tmp = target.with_name(f".{target.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in (MANIFEST, *DATA_FILES):
            zf.write(bundle.path / name, arcname=name)
    os.replace(tmp, target)
    return target


class Bundle:
    """A bundle opened for reading. Use :meth:`open`; checksums are verified on open."""

    def __init__(self, path: Path, manifest: dict[str, Any], cleanup: tempfile.TemporaryDirectory[str] | None = None):
        self.path = path
        self.manifest = manifest
        self._cleanup = cleanup

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> Bundle:
        """Open a bundle directory or ``*.mfb.zip``.

        Raises:
            BundleError: missing, not a bundle, unknown major version, links or path
                traversal, oversized headers, or (with ``verify``) a checksum mismatch.
        """
        src = Path(path)
        if not src.exists():
            raise BundleError(f"bundle '{src}' does not exist; pass a bundle directory or a .mfb.zip file")
        cleanup = None
        if src.is_file():
            cleanup = tempfile.TemporaryDirectory(prefix="mfb-")
            _safe_extract(src, Path(cleanup.name))
            root = Path(cleanup.name)
        else:
            root = src
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise BundleError(
                f"'{src}' is not a bundle: it has no {MANIFEST}; record one with `model-forensics record`"
            )
        for entry in root.iterdir():
            if entry.is_symlink():
                raise BundleError(f"bundle '{src}' contains a link ({entry.name}); bundles must hold plain files only")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{manifest_path} is not valid JSON ({exc}); the bundle is corrupt") from None
        _check_version(manifest, src)
        try:
            jsonschema.validate(manifest, load_schema("manifest"))
        except jsonschema.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
            raise BundleError(f"{manifest_path} does not match the bundle schema at {where}: {exc.message}") from None
        bundle = cls(root, manifest, cleanup)
        if verify:
            problems = bundle.verify_files()
            if problems:
                raise BundleError(
                    f"bundle '{src}' failed its checksums: {'; '.join(problems)}; it was modified or is corrupt"
                )
        return bundle

    def verify_files(self) -> list[str]:
        """Problems found comparing every file with the sha256 and size in the manifest."""
        problems = []
        for name, info in self.manifest["files"].items():
            if name not in DATA_FILES:
                problems.append(f"unexpected file entry '{name}'")
                continue
            file = self.path / name
            if not file.is_file():
                problems.append(f"{name} is missing")
            elif file.stat().st_size != info["bytes"]:
                problems.append(f"{name} has {file.stat().st_size} bytes, manifest says {info['bytes']}")
            elif file_sha256(file) != info["sha256"]:
                problems.append(f"{name} sha256 differs from the manifest")
        return problems

    # -- contents -----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def sites(self) -> list[str]:
        return list(self.manifest["sites"])

    @property
    def predicate(self) -> Predicate | None:
        data = self.manifest.get("predicate")
        return Predicate.from_json(data) if data else None

    @cached_property
    def inputs(self) -> dict[str, torch.Tensor]:
        return self._read_tensors("inputs.safetensors")

    @cached_property
    def outputs(self) -> dict[str, torch.Tensor]:
        return self._read_tensors("outputs.safetensors")

    def activation(self, site: str) -> torch.Tensor:
        """The decoded activation of one recorded site (exact for ``full`` sketches)."""
        info = self.manifest["sites"].get(site)
        if info is None:
            from model_forensics.core.sites import unknown_site_message

            raise BundleError(unknown_site_message(site, self.sites) + " in this bundle")
        file = self.path / "activations.safetensors"
        _check_header(file)
        with safe_open(str(file), framework="pt") as fh:
            entries = {k: fh.get_tensor(k) for k in fh.keys() if k == site or k.startswith(site + "::")}
        dtype = getattr(torch, info["dtype"])
        return sketches.decode(site, entries, info["sketch"], tuple(info["shape"]), dtype)

    def activations(self) -> Iterator[tuple[str, torch.Tensor]]:
        for site in self.sites:
            yield site, self.activation(site)

    def cube(self) -> dict[str, Any]:
        return dict(json.loads((self.path / "cube.json").read_text()))

    def calls(self) -> list[dict[str, Any]]:
        lines = (self.path / "calls.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def size_bytes(self) -> int:
        return (
            sum(int(info["bytes"]) for info in self.manifest["files"].values()) + (self.path / MANIFEST).stat().st_size
        )

    def _read_tensors(self, name: str) -> dict[str, torch.Tensor]:
        file = self.path / name
        _check_header(file)
        with safe_open(str(file), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}


def _check_version(manifest: dict[str, Any], src: Path) -> None:
    if manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"'{src}' is not a model-forensics bundle (format is {manifest.get('format')!r})")
    version = str(manifest.get("format_version", ""))
    major = version.split(".")[0]
    if major != FORMAT_VERSION.split(".")[0]:
        raise BundleError(
            f"bundle '{src}' uses format version {version}, this model-forensics reads {FORMAT_VERSION}; "
            "upgrade model-forensics (pip install -U model-forensics) to read it"
        )


def _check_header(file: Path) -> None:
    with file.open("rb") as fh:
        raw = fh.read(8)
    if len(raw) < 8:
        raise BundleError(f"{file} is truncated; the bundle is corrupt")
    (length,) = struct.unpack("<Q", raw)
    if length > MAX_HEADER_BYTES or length > file.stat().st_size:
        raise BundleError(f"{file} declares a {length}-byte header; refusing to read (corrupt or hostile file)")


def _safe_extract(archive: Path, dest: Path) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise BundleError(f"'{archive}' is neither a bundle directory nor a valid .mfb.zip") from None
    with zf:
        total = 0
        allowed = {MANIFEST, *DATA_FILES}
        for info in zf.infolist():
            name = info.filename
            if name not in allowed or "/" in name or "\\" in name or name.startswith(".."):
                raise BundleError(
                    f"'{archive}' holds an unexpected entry '{name}' (possible path traversal); refusing it"
                )
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise BundleError(f"'{archive}' holds a link ({name}); bundles must hold plain files only")
            total += info.file_size
            if total > MAX_ZIP_BYTES:
                raise BundleError(f"'{archive}' unpacks to more than {MAX_ZIP_BYTES} bytes; refusing it")
        for info in zf.infolist():
            with zf.open(info) as src, (dest / info.filename).open("wb") as out:
                shutil.copyfileobj(src, out)
