"""Incident bundles, format 1.3: a directory (or the same files zipped, ``*.mfb.zip``).

::

    manifest.json            format + version, model reference, inputs, outputs, predicate,
                             sites (shape, dtype, sketch, digest of the exact tensor and of
                             the stored sketch), determinism, provenance, the digest + size
                             of every data file (all five mandatory), and (1.3) ``hash``,
                             the algorithm of those digests (blake3; absent: sha256)
    inputs.safetensors       what the model was called with (input_ids, attention_mask, …)
    outputs.safetensors      logits at the positions the predicate reads, generated ids
    activations.safetensors  one entry (or a few ``site::part`` entries) per site
    cube.json                ActivityCube
    calls.jsonl              recorded external calls, in order
    signature.json           optional: an ed25519 signature of the content digest

No pickle anywhere. Everything read is hostile until checked: JSON is parsed strictly and
checked against the schema's allowlists (:mod:`model_forensics.core.manifest`),
safetensors headers are checked (dtypes, shapes, offsets, sizes) before a tensor is
touched, zips are inflated under caps on size and ratio, and every problem is a
:class:`BundleError`. The bundle's *content digest* is the sha256 of its canonical
manifest, which holds the sha256 of every data file; two people compare one string.

Writes go to a temporary sibling directory that replaces the target atomically
(``renameat2(RENAME_EXCHANGE)`` where the OS has it), so a kill at any instant leaves
the old or the new bundle under the name. Only a bundle is ever replaced. What is written
gets the permissions the user's umask gives a new file or directory (0644 / 0755 under
umask 022), not the private 0600 / 0700 of a temporary.

An archive is the bundle's files at the top level of a zip, nothing else (no folder
entries, no ``DIR/`` prefix, as ``zip -r x.mfb.zip DIR`` would write): :func:`pack_bundle`
writes exactly that and re-opens what it wrote; :func:`unpack_bundle` turns one back into
a directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import json
import math
import mmap
import os
import re
import shutil
import stat
import struct
import tempfile
import weakref
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache, cached_property, partial
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import jsonschema
import numpy as np
import torch
from safetensors.torch import save_file as _safetensors_save_file

from model_forensics.core import conversation, digests, keys, sketches
from model_forensics.core.config import BundleConfig
from model_forensics.core.digests import file_digest
from model_forensics.core.errors import BundleError, SandboxViolation
from model_forensics.core.files import shared_mode
from model_forensics.core.manifest import (
    DTYPE_ITEMSIZE,
    FORMAT_NAME,
    FORMAT_VERSION,
    _show,
    check_manifest,
    load_schema,
    parse_json,
    validate_format,
)
from model_forensics.core.predicates import Predicate

MANIFEST = "manifest.json"
SIGNATURE = "signature.json"
DATA_FILES = ("inputs.safetensors", "outputs.safetensors", "activations.safetensors", "cube.json", "calls.jsonl")
BUNDLE_FILES = frozenset({MANIFEST, SIGNATURE, *DATA_FILES})
MAX_HEADER_BYTES = 64 * 1024 * 1024
DIGEST_PREFIX = "sha256:"
_ST_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.(tmp|old)$")

__all__ = [
    "BUNDLE_FILES",
    "DATA_FILES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST",
    "Bundle",
    "BundleContents",
    "canonical_json",
    "content_digest",
    "file_sha256",
    "load_schema",
    "pack_bundle",
    "shared_mode",
    "unpack_bundle",
    "write_bundle",
]


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (see :func:`model_forensics.core.digests.file_digest`)."""
    return file_digest(path, "sha256")


def canonical_json(value: Any) -> bytes:
    """The canonical bytes of a JSON value: sorted keys, no whitespace, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def content_digest(manifest: dict[str, Any]) -> str:
    """A bundle's content digest: ``sha256:`` + sha256 of its canonical manifest, which holds
    the sha256 of every data file."""
    return DIGEST_PREFIX + hashlib.sha256(canonical_json(manifest)).hexdigest()


def stored_sha256(entries: dict[str, torch.Tensor], by_entry: bool = False, algorithm: str = "sha256") -> str:
    """The digest of one site's stored sketch entries: per entry (sorted by name) its name,
    dtype and shape, then its exact bytes (format 1.1) or, ``by_entry`` (format 1.2 on), the
    32-byte digest of those bytes (see :func:`entries_sha256`), under ``algorithm``."""
    if by_entry:
        return entries_sha256(
            [
                (n, t.dtype, list(t.shape), digests.digest(sketches.tensor_bytes(t), algorithm))
                for n, t in entries.items()
            ],
            algorithm,
        )
    digest = digests.hasher(algorithm)
    for name in sorted(entries):
        t = entries[name].detach().contiguous()
        digest.update(_entry_prefix(name, str(t.dtype).removeprefix("torch."), list(t.shape)))
        digest.update(sketches.tensor_bytes(t))
    return digest.hexdigest()


def _entry_prefix(name: str, dtype: str, shape: list[int]) -> bytes:
    return f"{name}:{dtype}:{shape};".encode()


def site_entries(site: str, keys: Any) -> list[str]:
    """The safetensors entries that hold ``site``: ``site`` itself or ``site::part``."""
    return [k for k in keys if k == site or k.startswith(site + "::")]


def entries_by_site(sites: Any, keys: Any) -> dict[str, list[str]]:
    """:func:`site_entries` for every site at once, in one pass over ``keys`` (an entry
    ``a::b::c`` may belong to the sites ``a``, ``a::b`` and ``a::b::c``)."""
    wanted = set(sites)
    out: dict[str, list[str]] = {site: [] for site in sites}
    for key in keys:
        parts = key.split("::")
        for n in range(1, len(parts) + 1):
            owner = "::".join(parts[:n])
            if owner in wanted:
                out[owner].append(key)
    return out


@dataclass
class BundleContents:
    """Everything that goes into a bundle, before it is written. ``activations`` holds the
    sketch-encoded entries in memory, or is a :class:`SiteSource` that loads them one site
    at a time (a recorder's spool)."""

    manifest: dict[str, Any]
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    activations: dict[str, torch.Tensor] | SiteSource
    cube: dict[str, Any] | None = None
    calls: list[dict[str, Any]] | None = None


# -- writing ---------------------------------------------------------------------------------
def write_bundle(
    path: str | Path, contents: BundleContents, overwrite: bool = False, sign_key: str | Path | None = None
) -> Path:
    """Write a bundle atomically and return its path.

    ``contents.manifest`` gets its ``files`` table and each site's ``stored_sha256`` filled
    in here; ``contents.activations`` must already be sketch-encoded (see
    :mod:`model_forensics.core.sketches`). With ``overwrite``, an existing *bundle* at
    ``path`` is replaced in one atomic step; anything else there is refused. With
    ``sign_key`` (an ed25519 private key file) the bundle appears already signed.

    Raises:
        BundleError: the target exists (and ``overwrite`` is False), is not a bundle, is not
            writable, the key is unreadable, or the disk filled up (nothing is left
            half-written).
    """
    target = Path(path)
    clean_stale_temporaries(target)  # first: a killed replace may have left the old bundle aside
    check_writable_target(target, overwrite)
    key = keys.load_private_key(sign_key) if sign_key is not None else None
    with _staged(target, overwrite, make_parent=True) as tmp:
        manifest = _write_files(tmp, contents)
        if key is not None:
            record = keys.signature_record(content_digest(manifest), key)
            with (tmp / SIGNATURE).open("w") as fh:
                json.dump(record, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
    return target


@contextlib.contextmanager
def _staged(target: Path, overwrite: bool, make_parent: bool = False) -> Iterator[Path]:
    """A private temporary directory beside ``target`` to write a bundle into; on a clean
    exit it replaces ``target`` atomically, on any error it is removed (nothing is left
    half-written)."""
    parent = target.parent
    try:
        if make_parent:
            parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=parent))
    except OSError as exc:
        raise BundleError(_os_message(exc, f"cannot write bundle under '{parent}'")) from None
    try:
        tmp.chmod(shared_mode(directory=True))  # mkdtemp's 0700 would make the bundle private
        yield tmp
        _replace(tmp, target, overwrite)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BundleError(_os_message(exc, f"cannot write bundle '{target}'") + "; nothing was written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_writable_target(target: Path, overwrite: bool) -> None:
    """Refuse a bundle target that exists (without ``overwrite``), or that is anything but a
    bundle directory (with it): a user's directory or file is never replaced.

    Raises:
        BundleError: saying which, and what to do.
    """
    if not target.name or target.name in (".", ".."):
        raise BundleError(f"'{target}' cannot be a bundle path; name a new directory, e.g. --out incident/")
    if is_bundle_dir(target.parent):
        raise BundleError(
            f"'{target}' is inside the bundle '{target.parent}', which may hold only bundle files; "
            "choose a path outside it"
        )
    if not (target.exists() or target.is_symlink()):
        return
    if not overwrite:
        raise BundleError(f"bundle '{target}' already exists; choose another path or pass overwrite=True (--overwrite)")
    if not is_bundle_dir(target):
        raise BundleError(
            f"'{target}' exists and is not a model-forensics bundle; --overwrite only replaces bundles, "
            "so choose another path (nothing was changed)"
        )


def is_bundle_dir(path: Path) -> bool:
    """A real directory (not a link) holding only bundle files, with a manifest of our format."""
    try:
        if path.is_symlink() or not path.is_dir():
            return False
        names = {entry.name for entry in path.iterdir()}
        manifest = path / MANIFEST
        if not names <= BUNDLE_FILES or MANIFEST not in names or not stat.S_ISREG(manifest.lstat().st_mode):
            return False
        if manifest.stat().st_size > 64 * 1024 * 1024:
            return False
        data = json.loads(manifest.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT_NAME


def clean_stale_temporaries(target: Path) -> list[Path]:
    """Remove temporary siblings of ``target`` left by writes that were killed (their
    process is gone), after putting back an old bundle that a killed replace had set aside
    (see :func:`recover_interrupted_replace`). Returns what was removed."""
    recover_interrupted_replace(target)
    removed: list[Path] = []
    for entry in _stale_temporaries(target):
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)
        except OSError:
            continue  # another process is cleaning it, or we may not: the next write retries
        removed.append(entry)
    return removed


def recover_interrupted_replace(target: Path) -> Path | None:
    """If a replace without an atomic exchange was killed between its two renames, the
    name ``target`` is free and the old bundle waits in a ``.{name}.{pid}.*.old`` sibling of
    a dead process: move it back. Returns the restored path, or None (nothing to recover)."""
    if target.exists() or target.is_symlink():
        return None
    for entry in _stale_temporaries(target):
        kept = entry / "bundle"
        if entry.name.endswith(".old") and is_bundle_dir(kept):
            try:
                _rename_new(kept, target)
            except OSError:
                return None  # the name was taken meanwhile (a concurrent write or recovery)
            with contextlib.suppress(OSError):
                entry.rmdir()
            return target
    return None


def _stale_temporaries(target: Path) -> list[Path]:
    """Siblings of ``target`` named like its temporaries whose writing process is gone."""
    parent = target.parent if str(target.parent) else Path(".")
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return []
    stale = []
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match and match["name"] == target.name and not process_alive(int(match["pid"])):
            stale.append(entry)
    return stale


def process_alive(pid: int) -> bool:
    """True unless no process ``pid`` runs (this process counts as alive: a concurrent
    write in it); what decides whether a temporary named after its writer is stale."""
    if pid == os.getpid():
        return True  # a concurrent write in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _replace(tmp: Path, target: Path, overwrite: bool) -> None:
    """Move the finished bundle ``tmp`` to ``target``: swapped atomically with the bundle
    there (``overwrite``), or renamed onto a free name (never onto anything that appeared
    meanwhile)."""
    _fsync_dir(tmp)
    if overwrite and (target.exists() or target.is_symlink()):
        shutil.rmtree(_swap_in(tmp, target), ignore_errors=True)
    else:
        _rename_new(tmp, target)
    _fsync_dir(target.parent)


def _swap_in(tmp: Path, target: Path) -> Path:
    """Put ``tmp`` at ``target`` and return where the old bundle went. What was replaced is
    checked once more (it may have changed since :func:`check_writable_target`) and put
    back unless it is a bundle."""
    if _exchange(tmp, target):
        if not is_bundle_dir(tmp):
            _exchange(tmp, target)
            raise BundleError(_changed_meanwhile(target))
        return tmp
    # No atomic exchange on this OS/filesystem: two renames, the old bundle kept aside
    # under a temp name until the new one is in place (recover_interrupted_replace undoes
    # a kill between them).
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".old", dir=target.parent))
    os.replace(target, old / "bundle")
    if not is_bundle_dir(old / "bundle"):
        os.replace(old / "bundle", target)
        old.rmdir()
        raise BundleError(_changed_meanwhile(target))
    os.replace(tmp, target)
    return old


def _changed_meanwhile(target: Path) -> str:
    return (
        f"'{target}' stopped being a bundle while the new one was written; it was left as it is, "
        "nothing was written (choose another path)"
    )


_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    return _rename_at(a, b, _RENAME_EXCHANGE)


def _rename_new(a: Path, b: Path) -> None:
    """Rename ``a`` to ``b`` unless ``b`` exists (atomically with renameat2 RENAME_NOREPLACE;
    elsewhere checked just before a plain rename). Raises FileExistsError if it does."""
    if _rename_at(a, b, _RENAME_NOREPLACE):
        return
    if b.exists() or b.is_symlink():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(b))
    os.rename(a, b)


def _rename_at(a: Path, b: Path, flags: int) -> bool:
    """renameat2(a, b, flags); False where the OS or filesystem lacks it."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


_RENAMEAT2: list[Any] = []


def _renameat2() -> Any:
    if not _RENAMEAT2:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
        except (OSError, AttributeError):
            fn = None
        except SandboxViolation:
            return None  # first write inside a replay's sandbox: two renames now, look up again later
        _RENAMEAT2.append(fn)
    return _RENAMEAT2[0]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _os_message(exc: OSError, what: str) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{what}: the disk is full; free some space (or choose another --out) and record again"
    if exc.errno == errno.EFBIG:
        return f"{what}: a file grew over this process's size limit (ulimit -f)"
    if exc.errno == errno.EEXIST:
        return f"{what}: something appeared at that path while the bundle was written; choose another path"
    return f"{what}: {exc.strerror or exc}"


def _write_files(tmp: Path, contents: BundleContents) -> dict[str, Any]:
    """Write and fsync every file into ``tmp``; returns the manifest as written.

    Each byte is hashed once, from memory, while it is written (format 1.2 on), under the
    manifest's ``hash`` (format 1.3; sha256 when absent): every safetensors entry gets its
    own digest as it is written, and the file digests (``<hash>-entries``), each
    site's ``stored_sha256`` and the exact digest of each ``full`` site are derived from
    those entry digests. Activations are written one site at
    a time from a :class:`SiteSource` (a recorder's spool), so the writer holds one site in
    memory. Nothing is read back. The bytes are those safetensors' ``save_file`` writes
    (tests/core/test_bundle_io_identity.py compares them).

    The disk waits overlap instead of adding up: inputs and outputs are written (and
    fsynced) in background threads while the activations are written, and each later file
    is fsynced in the background as soon as it is written. Every fsync has returned before
    this returns, so the staging directory is as durable as when each file was fsynced in
    turn before the next was written.
    """
    manifest = dict(contents.manifest)
    algorithm = digests.algorithm_of(manifest)
    if algorithm not in digests.ALGORITHMS:
        raise BundleError(f"hash {algorithm!r} is not a digest algorithm; use one of {', '.join(digests.ALGORITHMS)}")
    source = contents.activations
    if not isinstance(source, SiteSource):
        source = TensorSites(list(manifest["sites"]), source)
    with ThreadPoolExecutor(max_workers=len(DATA_FILES) + 1, thread_name_prefix="bundle-fsync") as background:
        inputs = background.submit(_save_tensors, contents.inputs, tmp / "inputs.safetensors", algorithm)
        outputs = background.submit(_save_tensors, contents.outputs, tmp / "outputs.safetensors", algorithm)
        syncs = []
        written = _save_sites(source, tmp / "activations.safetensors", algorithm)
        syncs.append(background.submit(_fsync_file, tmp / "activations.safetensors"))
        files = {"activations.safetensors": written.describe()}
        cube = json.dumps(contents.cube or {}, allow_nan=False).encode()
        files["cube.json"] = _write_bytes(tmp / "cube.json", cube, algorithm, sync=False)
        syncs.append(background.submit(_fsync_file, tmp / "cube.json"))
        calls = "".join(json.dumps(c, sort_keys=True, allow_nan=False) + "\n" for c in contents.calls or [])
        files["calls.jsonl"] = _write_bytes(tmp / "calls.jsonl", calls.encode(), algorithm, sync=False)
        syncs.append(background.submit(_fsync_file, tmp / "calls.jsonl"))
        files["inputs.safetensors"], files["outputs.safetensors"] = inputs.result(), outputs.result()
        owners = entries_by_site(manifest["sites"], written.entries)
        manifest["sites"] = {
            site: _site_digests(site, info, owners[site], written) for site, info in manifest["sites"].items()
        }
        manifest["files"] = {name: files[name] for name in DATA_FILES}
        validate_format(manifest, "the manifest of the bundle being written")
        text = json.dumps(manifest, indent=1, allow_nan=False)
        _write_bytes(tmp / MANIFEST, text.encode(), algorithm, sync=False)
        syncs.append(background.submit(_fsync_file, tmp / MANIFEST))
        for sync in syncs:
            sync.result()  # raises the OSError of a failed fsync (a full disk)
    return dict(json.loads(text))


def _site_digests(site: str, info: dict[str, Any], names: list[str], written: _Written) -> dict[str, Any]:
    """A site's table entry with ``stored_sha256`` derived from the digests of its entries
    ``names``, and its exact ``sha256`` when left to the writer: the digest of the exact
    tensor the source handed over, or a ``full`` site's entry digest."""
    out = {
        **info,
        "stored_sha256": entries_sha256([(n, *written.specs[n], written.entries[n]) for n in names], written.algorithm),
    }
    if info.get("sha256") is None:
        exact = written.exact.get(site)
        if exact is None and info["sketch"] == "full" and site in written.entries:
            exact = written.entries[site]
        out["sha256"] = exact.hex() if exact is not None else None
    return out


@cache
def _hash_threads() -> int:
    """Threads of a pool that hashes files already on disk (verification; a file safetensors
    wrote): asked of the OS once per process."""
    return max(2, min(4, os.cpu_count() or 2))


def _write_bytes(file: Path, data: bytes, algorithm: str, sync: bool = True) -> dict[str, Any]:
    """Write, fsync (unless the caller does, ``sync=False``) and describe (digest under
    ``algorithm`` + size) one small file."""
    with file.open("wb") as fh:
        fh.write(data)
        fh.flush()
        if sync:
            os.fsync(fh.fileno())
    described: dict[str, Any] = {"sha256": digests.hexdigest(data, algorithm), "bytes": len(data)}
    if algorithm != digests.LEGACY:  # a 1.2 table entry has no "digest" (it means sha256)
        described["digest"] = algorithm
    return described


def _fsync_file(file: Path) -> None:
    """fsync a file written and closed by this process (Linux reports a writeback error
    that nobody has seen to the next fsync of the file, whichever descriptor it uses)."""
    with file.open("rb") as fh:
        os.fsync(fh.fileno())


# -- sources of activations ----------------------------------------------------------------------
Spec = tuple[torch.dtype, tuple[int, ...]]


@runtime_checkable
class SiteSource(Protocol):
    """Sketch-encoded activations, one site at a time: what :func:`write_bundle` streams
    into ``activations.safetensors`` without holding every site in memory.

    ``specs(site)`` gives the entries ``load(site)`` will return (name → dtype, shape),
    before anything is loaded; ``load(site)`` loads and encodes that site now and returns
    its entries and its exact tensor when the writer is to hash that for the manifest's
    ``sha256`` (None: the manifest has it, or it is a ``full`` site, whose entry digest is
    that sha256). The writer calls ``load`` once per site, in site order, from the thread that writes.
    """

    def sites(self) -> list[str]: ...

    def specs(self, site: str) -> dict[str, Spec]: ...

    def load(self, site: str) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]: ...


class TensorSites:
    """A :class:`SiteSource` over entries already in memory (``{entry name: tensor}``);
    entries that belong to none of ``sites`` are written too, as one last group."""

    def __init__(self, sites: list[str], activations: dict[str, torch.Tensor]):
        self._groups = entries_by_site(sites, activations)
        owned = {name for names in self._groups.values() for name in names}
        rest = [name for name in activations if name not in owned]
        if rest:
            self._groups["\0rest"] = rest  # no site has a NUL in its name
        self._tensors = activations

    def sites(self) -> list[str]:
        return list(self._groups)

    def specs(self, site: str) -> dict[str, Spec]:
        return {n: (self._tensors[n].dtype, tuple(self._tensors[n].shape)) for n in self._groups[site]}

    def load(self, site: str) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        return {n: self._tensors[n] for n in self._groups[site]}, None


# -- digests (format 1.2 on: each byte hashed once) ----------------------------------------------
FILE_DIGESTS = {
    "sha256": ("sha256", False),
    "sha256-entries": ("sha256", True),
    "blake3": ("blake3", False),
    "blake3-entries": ("blake3", True),
}
"""A files-table ``digest`` → (its algorithm, whether it is over entry digests)."""


def entries_scheme(algorithm: str) -> str:
    """The files-table ``digest`` of a safetensors file hashed entry by entry: ``sha256-entries``
    (format 1.2) or ``blake3-entries`` (1.3)."""
    return f"{algorithm}-entries"


def entries_digest(header: bytes, entries: list[bytes], algorithm: str = "sha256") -> str:
    """A safetensors file's ``<algorithm>-entries`` digest: the algorithm over the 32-byte
    digest of its header (length + JSON + padding), then the 32-byte digest of each entry's
    bytes in file order. The entries tile the data area (the reader checks it), so every
    byte of the file is covered once."""
    digest = digests.hasher(algorithm, header)
    for entry in entries:
        digest.update(entry)
    return digest.hexdigest()


def entries_sha256(entries: list[tuple[str, torch.dtype | str, Any, bytes]], algorithm: str = "sha256") -> str:
    """A site's ``stored_sha256`` (format 1.2 on): per entry, sorted by name, the text
    ``name:dtype:[shape];`` then the entry's 32-byte digest, all under ``algorithm``."""
    digest = digests.hasher(algorithm)
    for name, dtype, shape, entry in sorted(entries, key=lambda e: e[0]):
        digest.update(_entry_prefix(name, str(dtype).removeprefix("torch."), list(shape)))
        digest.update(entry)
    return digest.hexdigest()


@dataclass
class _Written:
    """What one safetensors file was written with: its size, the digest (under
    ``algorithm``) of its header and of every entry (raw 32 bytes, in file order), every
    entry's dtype and shape, and the digest of the exact tensor of each site whose source
    handed one over."""

    size: int
    header: bytes
    entries: dict[str, bytes]
    specs: dict[str, Spec]
    algorithm: str
    exact: dict[str, bytes] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return entries_digest(self.header, list(self.entries.values()), self.algorithm)

    def describe(self) -> dict[str, Any]:
        return {"sha256": self.digest, "bytes": self.size, "digest": entries_scheme(self.algorithm)}


# -- safetensors files ---------------------------------------------------------------------------
# safetensors orders entries by dtype (this rank, descending), then by name, and pads its
# JSON header with spaces to a multiple of 8 bytes.
_ST_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ST_RANK = {
    code: rank for rank, code in enumerate(("BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64"))
}
_PLAIN_NAME = re.compile(r"^[\x20-\x7e]*$")
WRITEBACK_BYTES = 16 * 1024 * 1024
"""The activations writer starts the disk (``fdatasync`` in a thread) every this many bytes
written, so writing back overlaps encoding and hashing; 0 leaves it all to the closing fsync."""


def safetensors_layout(specs: dict[str, Spec]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The bytes before the data of the safetensors file ``save_file`` writes for entries
    of these dtypes and shapes (8-byte header length + JSON header), and each entry's byte
    range in the data area, in file order.

    Raises:
        ValueError: an entry this layout does not cover (a dtype bundles never use, a name
            outside printable ASCII or holding a quote or backslash); use ``save_file``.
    """
    for name, (dtype, _shape) in specs.items():
        if dtype not in _ST_CODES or not _PLAIN_NAME.match(name) or '"' in name or "\\" in name:
            raise ValueError(f"entry {name!r} ({dtype}) is not covered by the fast layout")
        if name == "__metadata__":
            raise ValueError("an entry named __metadata__ is not covered by the fast layout")
    ordered = sorted(specs, key=lambda n: (-_ST_RANK[_ST_CODES[specs[n][0]]], n))
    header: dict[str, Any] = {}
    spans: dict[str, tuple[int, int]] = {}
    offset = 0
    for name in ordered:
        dtype, shape = specs[name]
        end = offset + math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_CODES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        spans[name] = (offset, end)
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, spans


def _save_tensors(entries: dict[str, torch.Tensor], file: Path, algorithm: str) -> dict[str, Any]:
    """Write ``entries`` with :func:`save_file`, fsynced, umask permissions; its I/O errors
    (a full disk) raised as the OSError they are. Returns the file's table entry."""
    described = _os_errors(file, lambda: save_file(entries, str(file), algorithm=algorithm))
    if described is None:  # written by another writer: hash what it wrote
        return _hash_written(file, algorithm).describe()
    return dict(described)


def _save_sites(source: SiteSource, file: Path, algorithm: str) -> _Written:
    """Write every site of ``source`` into the safetensors file ``file``, one site in
    memory at a time; returns what was written."""

    def write() -> _Written:
        by_site = {site: source.specs(site) for site in source.sites()}
        specs = {name: spec for entries in by_site.values() for name, spec in entries.items()}
        try:
            prefix, spans = safetensors_layout(specs)
        except ValueError:  # names the fast layout does not cover: safetensors writes them
            tensors: dict[str, torch.Tensor] = {}
            exact: dict[str, bytes] = {}
            for site in source.sites():
                entries, tensor = source.load(site)
                if tensor is not None:
                    exact[site] = digests.digest(sketches.tensor_bytes(tensor), algorithm)
                tensors.update(entries)
            _safetensors_save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(file))
            return dataclasses.replace(_hash_written(file, algorithm), exact=exact)
        sites = ((site, partial(source.load, site)) for site in by_site)
        return _write_entries(file, prefix, spans, specs, sites, algorithm, sync=False)

    return _os_errors(file, write)


def _os_errors(file: Path, write: Any) -> Any:
    """``write()``, with safetensors' I/O errors (``SafetensorError "... (os error 28)"``)
    raised as the OSError they are; the file gets umask permissions."""
    try:
        result = write()
    except OSError:
        raise
    except Exception as exc:
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(file)) from None
    if file.exists():
        file.chmod(shared_mode())  # safetensors creates its files 0600, whatever the umask
    return result


def _hash_written(file: Path, algorithm: str) -> _Written:
    """Hash a safetensors file written by someone else (fsynced here), entry by entry."""
    with file.open("rb") as fh:
        os.fsync(fh.fileno())
    mapped = _MappedFile(file)
    with ThreadPoolExecutor(max_workers=_hash_threads(), thread_name_prefix="bundle-hash") as pool:
        header, entries = mapped.entry_digests(pool, algorithm)
        return _Written(
            mapped.layout.size,
            header.result(),
            entries(),
            {n: (getattr(torch, d), tuple(s)) for n, (d, s, _b, _e) in mapped.layout.entries.items()},
            algorithm,
        )


Load = Callable[[], tuple[dict[str, torch.Tensor], torch.Tensor | None]]
"""What loads and encodes one site for :func:`_write_entries`: its entries, and its exact
tensor to hash (None: none to hash)."""


def _write_entries(
    file: Path,
    prefix: bytes,
    spans: dict[str, tuple[int, int]],
    specs: dict[str, Spec],
    sites: Iterator[tuple[str, Load]],
    algorithm: str,
    sync: bool = True,
) -> _Written:
    """Write a safetensors file whose header is ``prefix``, site by site in order (each
    ``sites`` item: the site and what loads it). Each site is loaded, encoded, hashed (its
    entries and its exact tensor) and written by the calling thread,
    while its bytes are in the cache, then freed; only the disk works in the background.
    (A pool of encoding threads was slower on 2 cores, in wall and CPU time: a site's many
    short torch calls hand the GIL back and forth between the threads; so was one hashing
    thread beside the writer, measured side by side: see the CHANGELOG, 0.2.0.) fsynced
    unless the caller does it (``sync=False``)."""
    start = len(prefix)
    entry_sums: dict[str, bytes] = {}
    exact: dict[str, bytes] = {}  # site → digest of its exact tensor
    unsynced = 0  # bytes written since the last writeback was started
    flushes: list[Future[None]] = []
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="bundle-writeback") as writeback,
        file.open("wb") as fh,
    ):
        _pwrite(fh.fileno(), prefix, 0)
        header = digests.digest(prefix, algorithm)
        for site, load in sites:
            entries, tensor = load()
            for name, t in entries.items():
                chunk = _checked_bytes(name, t, specs, spans)
                entry_sums[name] = digests.digest(chunk, algorithm)
                _pwrite(fh.fileno(), chunk, start + spans[name][0])
                unsynced += chunk.nbytes
            if tensor is not None:
                exact[site] = digests.digest(sketches.tensor_bytes(tensor), algorithm)
            del entries, tensor
            if WRITEBACK_BYTES and unsynced >= WRITEBACK_BYTES and (not flushes or flushes[-1].done()):
                # start the disk on what is written while the next sites are encoded and hashed,
                # so the closing fsync waits for the last piece only (one flush at a time)
                flushes.append(writeback.submit(os.fdatasync, fh.fileno()))
                unsynced = 0
        missing = set(spans) - set(entry_sums)
        if missing:
            raise ValueError(f"the site source gave no data for the entries {sorted(missing)[:4]}")
        for flush in flushes:
            flush.result()  # a failed writeback (a full disk) is the OSError it is
        size = start + (max(end for _b, end in spans.values()) if spans else 0)
        fh.truncate(size)
        if sync:
            os.fsync(fh.fileno())
        return _Written(size, header, {n: entry_sums[n] for n in spans}, specs, algorithm, exact)


def _checked_bytes(name: str, tensor: torch.Tensor, specs: dict[str, Spec], spans: dict[str, Any]) -> Any:
    """The bytes of one entry, after checking it is the dtype and shape the header promised."""
    if name not in spans:
        raise ValueError(f"the site source gave an entry {name!r} that its specs did not announce")
    if (tensor.dtype, tuple(tensor.shape)) != specs[name]:
        raise ValueError(
            f"entry {name!r} is {tensor.dtype} {list(tensor.shape)}, its specs said {specs[name][0]} {list(specs[name][1])}"
        )
    return sketches.tensor_bytes(tensor)


_BATCH_BYTES = 4 * 1024 * 1024  # a verifying hash task takes consecutive entries up to this many bytes
_READ_BYTES = 8 * 1024 * 1024  # entries up to this size are read into a buffer to be hashed


def _pwrite(fd: int, data: Any, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def save_file(tensors: dict[str, torch.Tensor], filename: str, algorithm: str = "sha256") -> dict[str, Any] | None:
    """``safetensors.torch.save_file`` at disk speed: the same bytes, written straight from
    the tensors' memory (no copies), each entry hashed (under ``algorithm``) as it is
    written, then fsynced. Returns the file's table entry
    (``<algorithm>-entries`` digest and size), or None when safetensors itself wrote the
    file (names outside the fast layout)."""
    file = Path(filename)
    specs = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    try:
        prefix, spans = safetensors_layout(specs)
    except ValueError:
        _safetensors_save_file(tensors, filename)
        return None
    sites = iter([("", lambda: (tensors, None))])
    return _write_entries(file, prefix, spans, specs, sites, algorithm).describe()


def pack_bundle(path: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Zip a bundle directory into ``out`` (``*.mfb.zip``) atomically, in the layout the
    reader accepts (the bundle's files at the top level, stored, no folder entries), then
    open the archive written to check it holds the same bundle (same content digest).

    Raises:
        BundleError: the bundle does not verify, ``out`` is not a ``.mfb.zip`` name, exists
            (without ``overwrite``) or is a directory, or cannot be written.
    """
    with Bundle.open(path) as bundle:
        return _pack(bundle, path, Path(out), overwrite)


def _pack(bundle: Bundle, path: str | Path, target: Path, overwrite: bool) -> Path:
    """:func:`pack_bundle` of the opened ``bundle`` (closed by the caller)."""
    if bundle.source.is_file():
        raise BundleError(f"'{path}' is already an archive; pack a bundle directory")
    if not target.name.endswith(".mfb.zip"):
        raise BundleError(f"'{target}' must end in .mfb.zip (the name the reader opens as an archive)")
    if target.is_dir() or target.is_symlink():
        raise BundleError(f"'{target}' is a directory or a link; name a new .mfb.zip file")
    if target.exists() and not overwrite:
        raise BundleError(f"'{target}' already exists; choose another path or pass overwrite=True (--overwrite)")
    clean_stale_temporaries(target)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise BundleError(_os_message(exc, f"cannot write '{target}'")) from None
    tmp = Path(name)
    try:
        os.fchmod(fd, shared_mode())  # mkstemp's 0600 would make the archive private
        with os.fdopen(fd, "wb") as fh:
            with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED) as zf:
                for file in (MANIFEST, *DATA_FILES, SIGNATURE):
                    if (bundle.path / file).is_file():
                        zf.write(bundle.path / file, arcname=file)
            fh.flush()
            os.fsync(fh.fileno())
        with Bundle.open(tmp) as packed:
            same = packed.digest == bundle.digest
        if not same:
            raise BundleError(f"the archive written for '{path}' does not hold the same bundle; nothing was written")
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BundleError(_os_message(exc, f"cannot write '{target}'")) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return target


def unpack_bundle(archive: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Turn a ``.mfb.zip`` back into a bundle directory at ``out``, atomically; the archive
    is checked (layout, caps, checksums) before anything is written.

    Raises:
        BundleError: the archive is not a valid bundle, or ``out`` cannot take a bundle
            (see :func:`check_writable_target`).
    """
    with Bundle.open(archive) as bundle:
        return _unpack(bundle, archive, Path(out), overwrite)


def _unpack(bundle: Bundle, archive: str | Path, target: Path, overwrite: bool) -> Path:
    """:func:`unpack_bundle` of the opened archive ``bundle`` (closed by the caller)."""
    if not bundle.source.is_file():
        raise BundleError(f"'{archive}' is a bundle directory already; unpack a .mfb.zip file")
    clean_stale_temporaries(target)
    check_writable_target(target, overwrite)
    with _staged(target, overwrite) as tmp:
        for file in sorted(BUNDLE_FILES):
            if (bundle.path / file).is_file():
                shutil.copyfile(bundle.path / file, tmp / file)
                with (tmp / file).open("rb") as fh:
                    os.fsync(fh.fileno())
    return target


# -- reading ---------------------------------------------------------------------------------
class Bundle:
    """A bundle opened for reading. Use :meth:`open`; checksums are verified on open.

    An open bundle holds its data files open (mapped) and, for an archive, an unpacked
    copy; :meth:`close` (or ``with Bundle.open(path) as bundle:``) releases them now rather
    than when the object is collected. Tensors read before closing stay valid.
    """

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        cleanup: tempfile.TemporaryDirectory[str] | None = None,
        limits: BundleConfig | None = None,
        source: Path | None = None,
    ):
        self.path = path
        self.manifest = manifest
        self.limits = limits or BundleConfig()
        self.source = source or path
        self._cleanup = cleanup
        self._maps: dict[str, _MappedFile] = {}
        self._owners: dict[str, list[str]] | None = None
        self._digests: dict[str, tuple[str, str | None]] = {}
        self._entry_sums: dict[str, dict[str, bytes]] = {}  # file → entry → digest (format 1.2 on)
        self._closed = False

    @classmethod
    def open(cls, path: str | Path, verify: bool = True, limits: BundleConfig | None = None) -> Bundle:
        """Open a bundle directory or ``*.mfb.zip``.

        Args:
            path: the bundle.
            verify: check every data file's size and sha256 against the manifest.
            limits: the reader's bounds (default: :class:`BundleConfig` defaults).
        Raises:
            BundleError: missing, not a bundle, unknown major version, a manifest that breaks
                the schema's allowlists or the bounds, links, special files, unexpected
                entries, a hostile archive, or (with ``verify``) a checksum mismatch.
        """
        limits = limits or BundleConfig()
        src = Path(path)
        if not (src.exists() or src.is_symlink()) and recover_interrupted_replace(src) is None:
            raise BundleError(f"bundle '{src}' does not exist; pass a bundle directory or a .mfb.zip file")
        cleanup = None
        if src.is_symlink():
            raise BundleError(f"'{src}' is a link; open the bundle it points to directly")
        if src.is_file():
            cleanup = tempfile.TemporaryDirectory(prefix="mfb-")
            try:
                _safe_extract(src, Path(cleanup.name), limits)
            except BaseException:
                cleanup.cleanup()
                raise
            root = Path(cleanup.name)
        elif src.is_dir():
            root = src
        else:
            raise BundleError(f"'{src}' is neither a bundle directory nor a .mfb.zip file")
        try:
            _check_entries(root, src)
            manifest = check_manifest(
                parse_json(_read_capped(root / MANIFEST, limits.max_manifest_mb, src), MANIFEST, limits), limits
            )
            conversation.check_conversation(manifest)  # extras.conversation: typed, on the input's token axis
        except BaseException:
            if cleanup is not None:
                cleanup.cleanup()
            raise
        bundle = cls(root, manifest, cleanup, limits, src)
        if verify:
            problems = bundle.verify_files()
            if problems:
                raise BundleError(
                    f"bundle '{src}' failed its checksums: {'; '.join(problems)}; it was modified or is corrupt"
                )
        return bundle

    def close(self) -> None:
        """Release the open data files and maps, and remove the unpacked copy of an archive.
        Idempotent. The manifest stays readable; reading a file afterwards is a
        :class:`BundleError`. Tensors read before stay valid: a map is unmapped (and its
        file closed) when the last tensor that views it is freed, at once if none does."""
        if self._closed:
            return
        self._closed = True
        for cached in ("inputs", "outputs"):
            self.__dict__.pop(cached, None)  # the bundle's own views of the maps
        for mapped in self._maps.values():
            mapped.close()
        self._maps.clear()
        if self._cleanup is not None:
            self._cleanup.cleanup()

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise BundleError(f"bundle '{self.source}' was closed; open it again (Bundle.open) to read its files")

    def verify_files(self) -> list[str]:
        """Problems found comparing every data file with the digest and size in the manifest
        (every data file must be listed and present)."""
        self._check_open()
        with ThreadPoolExecutor(max_workers=_hash_threads(), thread_name_prefix="bundle-verify") as pool:
            return self._verify_files(pool)

    def _verify_files(self, pool: ThreadPoolExecutor) -> list[str]:
        return self._start_verify_files(pool)()

    def _start_verify_files(self, pool: ThreadPoolExecutor) -> Callable[[], list[str]]:
        """Start hashing every data file in ``pool``; returns what waits for the problems."""
        table = self.manifest["files"]
        found: dict[str, str | Callable[[], str]] = {}  # a problem, or the digest being computed
        for name in DATA_FILES:
            info = table.get(name)
            file = self.path / name
            if info is None:
                found[name] = f"{name} is not in the manifest's files table"
            elif not file.is_file():
                found[name] = f"{name} is missing"
            elif file.stat().st_size != info["bytes"]:
                found[name] = f"{name} has {file.stat().st_size} bytes, manifest says {info['bytes']}"
            else:
                algorithm, by_entry = FILE_DIGESTS[info.get("digest", "sha256")]
                if by_entry:
                    found[name] = self._entries_digest(name, pool, algorithm)
                else:
                    found[name] = pool.submit(file_digest, file, algorithm).result

        def problems() -> list[str]:
            out = []
            for name, result in found.items():
                if isinstance(result, str):
                    out.append(result)
                elif (digest := result()) != table[name]["sha256"]:
                    algorithm = FILE_DIGESTS[table[name].get("digest", "sha256")][0]
                    out.append(digest if digest.startswith(name) else f"{name} {algorithm} differs from the manifest")
            return out

        return problems

    def _entries_digest(self, name: str, pool: ThreadPoolExecutor, algorithm: str) -> Callable[[], str]:
        """Start hashing ``name`` entry by entry (format 1.2 on) and return what waits for its
        ``<algorithm>-entries`` digest (or a problem, prefixed with the file's name); the
        entry digests are kept for the site checks."""
        try:
            header, entries = self._mapped(name).entry_digests(pool, algorithm)
        except BundleError as exc:
            problem = f"{name}: {exc}"
            return lambda: problem

        def digest() -> str:
            sums = entries()
            self._entry_sums[name] = sums
            return entries_digest(header.result(), list(sums.values()), algorithm)

        return digest

    @cached_property
    def digest(self) -> str:
        """The content digest: ``sha256:`` + the sha256 of the canonical manifest (which holds
        the sha256 of every data file). Equal digests mean equal bundles, byte for byte in
        every data file and value for value in the manifest. Computed once per opened
        bundle: treat ``manifest`` as read-only."""
        return content_digest(self.manifest)

    # -- contents -----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def sites(self) -> list[str]:
        return list(self.manifest["sites"])

    @property
    def hash(self) -> str:
        """The algorithm of the bundle's content digests: ``blake3`` or ``sha256`` (format
        1.3 names it; older bundles are sha256). Compare a replayed tensor with a recorded
        digest by :func:`model_forensics.core.digests.tensor_digest` under it."""
        return digests.algorithm_of(self.manifest)

    @property
    def partial(self) -> dict[str, str]:
        """Sites whose recorder hook failed during recording, with the error (format 1.1)."""
        return dict(self.manifest.get("partial") or {})

    @property
    def predicate(self) -> Predicate | None:
        data = self.manifest.get("predicate")
        return Predicate.from_json(data, regex_timeout_s=self.limits.regex_timeout_s) if data else None

    @cached_property
    def inputs(self) -> dict[str, torch.Tensor]:
        return self._read_tensors("inputs.safetensors")

    @cached_property
    def outputs(self) -> dict[str, torch.Tensor]:
        return self._read_tensors("outputs.safetensors")

    def activation(self, site: str) -> torch.Tensor:
        """The decoded activation of one recorded site (exact for ``full`` sketches).

        Raises:
            BundleError: the site is unknown, or its stored entries do not decode to the
                declared shape and dtype.
        """
        info = self.manifest["sites"].get(site)
        if info is None:
            from model_forensics.core.sites import unknown_site_message

            raise BundleError(unknown_site_message(site, self.sites) + " in this bundle")
        entries = self._site_entries(site)
        return _decode(site, entries, info)

    def stored_entries(self, site: str) -> dict[str, torch.Tensor]:
        """The raw stored sketch entries of one site (as written, before decoding)."""
        if site not in self.manifest["sites"]:
            raise BundleError(f"site {_show(site)} is not in this bundle")
        return self._site_entries(site)

    def activations(self) -> Iterator[tuple[str, torch.Tensor]]:
        for site in self.sites:
            yield site, self.activation(site)

    def cube(self) -> dict[str, Any]:
        self._check_open()
        value = parse_json(
            _read_capped(self.path / "cube.json", self.limits.max_manifest_mb, self.source), "cube.json", self.limits
        )
        if not isinstance(value, dict):
            raise BundleError("cube.json must hold a JSON object; the bundle is corrupt")
        return value

    def calls(self) -> list[dict[str, Any]]:
        self._check_open()
        raw = _read_capped(self.path / "calls.jsonl", self.limits.max_calls_mb, self.source)
        calls = []
        for number, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            call = parse_json(line, f"calls.jsonl line {number}", self.limits, max_bytes=len(raw))
            if not isinstance(call, dict):
                raise BundleError(f"calls.jsonl line {number} is not a JSON object; the bundle is corrupt")
            calls.append(call)
        return calls

    def size_bytes(self) -> int:
        self._check_open()
        return (
            sum(int(info["bytes"]) for info in self.manifest["files"].values()) + (self.path / MANIFEST).stat().st_size
        )

    # -- full verification -----------------------------------------------------------------
    def verify_contents(self) -> list[str]:
        """Parse and check every file, not just its hash: inputs and outputs match their
        tables, every site's stored sketch matches its ``stored_sha256`` and decodes to its
        declared shape and dtype (``full`` sites: to their exact digest), the cube matches its
        schema, every call is a JSON object, and the recorded verdict agrees with the
        recorded output. Returns the problems found (empty: the bundle is consistent).

        One pass over the bytes: the files are mapped afresh, and every file's digest and
        every site's digests are computed side by side in threads. Meanwhile the checks that
        need no digest (tables, cube, calls, verdict) run here; what they find is reported
        only if every file matches the manifest (otherwise the checksum problems alone are)."""
        self._check_open()
        self._maps.clear()
        self._owners = None
        self._entry_sums = {}
        activations = self.manifest["files"].get("activations.safetensors", {})
        by_entry = activations.get("digest") == entries_scheme(self.hash)  # site digests follow from entry digests
        with ThreadPoolExecutor(max_workers=_hash_threads(), thread_name_prefix="bundle-verify") as pool:
            sites = {} if by_entry or self._sites_by_entry else self._hash_sites(pool)
            hashed = self._start_verify_files(pool)
            tables = [
                _checked_now(partial(self._check_table, name, table))
                for name, table in (("inputs.safetensors", "input"), ("outputs.safetensors", "output"))
            ]
            rest = [_checked_now(check) for check in (self._check_cube, self._check_calls, self._check_verdict)]
            problems = hashed()
            if problems or (self._sites_by_entry and not by_entry):
                self._digests = {}  # _check_site hashes each site itself
            elif by_entry:
                self._digests = self._sites_from_entries()
            else:
                self._digests = {site: future.result() for site, future in sites.items()}
        if problems:
            return problems
        for found in tables:
            problems += found()
        for site in self.sites:
            problems += _guard(lambda s=site: self._check_site(s))
        for found in rest:
            problems += found()
        return problems

    def _check_table(self, name: str, table: str) -> list[str]:
        stored = self._read_tensors(name)
        declared = self.manifest[table]["tensors"]
        problems = []
        if set(stored) != set(declared):
            problems.append(f"{name} holds {sorted(stored)[:8]}, the manifest declares {sorted(declared)[:8]}")
        for key in set(stored) & set(declared):
            t, info = stored[key], declared[key]
            if list(t.shape) != info["shape"] or str(t.dtype).removeprefix("torch.") != info["dtype"]:
                problems.append(
                    f"{name}: {_show(key)} is {list(t.shape)} {t.dtype}, the manifest says {info['shape']} {info['dtype']}"
                )
        return problems

    def _hash_sites(self, pool: ThreadPoolExecutor) -> dict[str, Future[tuple[str, str | None]]]:
        """Each site's digests (see :meth:`_MappedFile.site_digests`), hashing in ``pool``;
        none when the activations file cannot be mapped (its check reports why)."""
        try:
            mapped, owners = self._mapped("activations.safetensors"), self._site_names()
        except BundleError:
            return {}
        table = self.manifest["sites"]
        return {
            site: pool.submit(mapped.site_digests, site, owners[site], table[site]["sketch"] == "full", self.hash)
            for site in self.sites
        }

    @property
    def _sites_by_entry(self) -> bool:
        """Whether ``stored_sha256`` is over entry digests (format 1.2 on) or bytes (1.0, 1.1)."""
        major, _, minor = str(self.manifest["format_version"]).partition(".")
        return (int(major), int(minor or 0)) >= (1, 2)

    def _sites_from_entries(self) -> dict[str, tuple[str, str | None]]:
        """Each site's digests (``stored_sha256``, exact digest of a ``full`` site) derived
        from the entry digests that verification computed (format 1.2 on): no byte is hashed
        twice."""
        sums = self._entry_sums.get("activations.safetensors", {})
        layout, table = self._mapped("activations.safetensors").layout.entries, self.manifest["sites"]
        out: dict[str, tuple[str, str | None]] = {}
        for site, names in self._site_names().items():
            stored = entries_sha256([(n, layout[n][0], layout[n][1], sums[n]) for n in names], self.hash)
            full = table[site]["sketch"] == "full" and site in names
            out[site] = (stored, sums[site].hex() if full else None)
        return out

    def _check_site(self, site: str) -> list[str]:
        info = self.manifest["sites"][site]
        entries = self._site_entries(site)
        algorithm = self.hash
        stored, exact = self._digests.get(site) or (stored_sha256(entries, self._sites_by_entry, algorithm), None)
        if "stored_sha256" in info and stored != info["stored_sha256"]:
            return [f"site {_show(site)}: stored sketch {algorithm} differs from the manifest"]
        _check_decodable(site, entries, info, self._mapped("activations.safetensors").int64_ranges)
        if info["sketch"] == "full" and (exact or digests.tensor_digest(entries[site], algorithm)) != info["sha256"]:
            return [f"site {_show(site)}: tensor {algorithm} differs from the manifest"]
        return []

    def _check_cube(self) -> list[str]:
        cube = self.cube()
        if not cube:
            return []
        schema = load_schema("cube")
        errors = list(jsonschema.validators.validator_for(schema)(schema).iter_errors(_without_number_lists(cube)))
        if errors:
            where = ".".join(str(p) for p in errors[0].absolute_path) or "(top level)"
            return [f"cube.json does not match the ActivityCube schema at {where}"]
        return []

    def _check_calls(self) -> list[str]:
        self.calls()  # raises on a line that is not a UTF-8 JSON object
        return []

    def _check_verdict(self) -> list[str]:
        """The recorded ``holds`` and ``prediction`` must follow from the recorded output."""
        problems = []
        pred, out = self.predicate, self.manifest["output"]
        logits = self.outputs.get("logits")
        last = None
        if logits is not None and logits.numel():
            last = logits[0, -1] if logits.dim() == 3 else logits.reshape(logits.shape[0], -1)[0]
            if out.get("prediction") is not None and int(last.argmax()) != out["prediction"]:
                problems.append(
                    f"output.prediction is {out['prediction']} but the recorded logits' argmax is {int(last.argmax())}"
                )
        holds = (self.manifest.get("predicate") or {}).get("holds")
        if pred is None or holds is None:
            return problems
        if pred.needs_text and out.get("text") is None:
            return problems
        if not pred.needs_text and last is None:
            return problems
        if not pred.needs_text and last is not None and max(pred.indices()) >= last.numel():
            return [*problems, f"predicate {pred.describe()} reads an index beyond the {last.numel()} recorded logits"]
        actual = pred.evaluate(text=out.get("text"), logits=last)
        if actual != holds:
            problems.append(
                f"predicate.holds is {holds} but {pred.describe()} evaluates to {actual} on the recorded output"
            )
        return problems

    # -- internals -------------------------------------------------------------------------
    def _mapped(self, name: str) -> _MappedFile:
        """The checked, mapped safetensors file ``name`` (checked and mapped once)."""
        self._check_open()
        if name not in self._maps:
            self._maps[name] = _MappedFile(self.path / name)
        return self._maps[name]

    def _site_names(self) -> dict[str, list[str]]:
        mapped = self._mapped("activations.safetensors")
        if self._owners is None:
            self._owners = entries_by_site(self.sites, mapped.layout.entries)
        return self._owners

    def _site_entries(self, site: str) -> dict[str, torch.Tensor]:
        names = self._site_names().get(site)
        if names is None:
            names = site_entries(site, self._mapped("activations.safetensors").layout.entries)
        return self._mapped("activations.safetensors").tensors(names)

    def _read_tensors(self, name: str) -> dict[str, torch.Tensor]:
        mapped = self._mapped(name)
        return mapped.tensors(list(mapped.layout.entries))


def _without_number_lists(cube: dict[str, Any]) -> dict[str, Any]:
    """The cube with every ``core_metrics`` list that holds only numbers emptied: the schema
    accepts such a list exactly when it accepts an empty one, and jsonschema spends most of
    its time on them (one check per token per metric per layer). Lists that hold anything
    else stay, so the schema's message names the bad value."""
    layers = cube.get("layers")
    if not isinstance(layers, list):
        return cube
    slim = []
    for layer in layers:
        metrics = layer.get("core_metrics") if isinstance(layer, dict) else None
        if isinstance(metrics, dict):
            metrics = {k: [] if _numbers(v) else v for k, v in metrics.items()}
            layer = {**layer, "core_metrics": metrics}
        slim.append(layer)
    return {**cube, "layers": slim}


def _numbers(value: Any) -> bool:
    return isinstance(value, list) and all(type(v) is float or type(v) is int for v in value)


def _guard(check: Any) -> list[str]:
    try:
        return list(check())
    except BundleError as exc:
        return [str(exc)]


def _checked_now(check: Callable[[], list[str]]) -> Callable[[], list[str]]:
    """Run ``check`` now (its BundleError a problem, see :func:`_guard`) and return what
    gives its problems later; anything else it raised is raised then, not now."""
    try:
        found = _guard(check)
    except Exception as exc:  # a bug, not a problem of the bundle: raised when asked for
        error = exc

        def again() -> list[str]:
            raise error

        return again
    return lambda: found


def _read_capped(file: Path, cap_mb: float, src: Path) -> bytes:
    cap = int(cap_mb * 1024 * 1024)
    try:
        info = file.lstat()
        if not stat.S_ISREG(info.st_mode):
            raise BundleError(f"{file.name} in '{src}' is not a plain file; bundles hold plain files only")
        if info.st_size > cap:
            raise BundleError(f"{file.name} in '{src}' is {info.st_size} bytes, over the {cap}-byte limit; refusing it")
        with file.open("rb") as fh:
            return fh.read(cap + 1)[: cap + 1]
    except FileNotFoundError:
        raise BundleError(f"'{src}' is not a complete bundle: it has no {file.name}") from None
    except OSError as exc:
        raise BundleError(f"cannot read {file.name} in '{src}': {exc.strerror}") from None


def _check_entries(root: Path, src: Path) -> None:
    if not (root / MANIFEST).exists():
        raise BundleError(f"'{src}' is not a bundle: it has no {MANIFEST}; record one with `model-forensics record`")
    for entry in root.iterdir():
        if entry.is_symlink():
            raise BundleError(
                f"bundle '{src}' contains a link ({_show(entry.name)}); bundles must hold plain files only"
            )
        if entry.name not in BUNDLE_FILES:
            raise BundleError(
                f"bundle '{src}' holds an unexpected entry {_show(entry.name)}; a bundle holds only "
                f"{', '.join(sorted(BUNDLE_FILES))}; move other files out of it"
            )
        if not stat.S_ISREG(entry.lstat().st_mode):
            raise BundleError(f"bundle '{src}': {_show(entry.name)} is not a plain file; refusing it")


@dataclass(frozen=True)
class _Layout:
    """A checked safetensors file: entry → (dtype name, shape, begin, end) within the data
    area, which starts at byte ``data_start`` of a ``size``-byte file."""

    entries: dict[str, tuple[str, list[int], int, int]]
    data_start: int
    size: int


def _check_header(file: Path) -> _Layout:
    """Parse and check a safetensors header before any tensor is read from the file.

    Returns:
        its layout (entry names, dtypes, shapes and byte ranges).
    Raises:
        BundleError: truncated, an oversized or malformed header, an unknown dtype, a shape
            whose size disagrees with its byte range, ranges that overlap, leave gaps or
            run past the end of the file.
    """
    try:
        size = file.lstat().st_size
        if not stat.S_ISREG(file.lstat().st_mode):
            raise BundleError(f"{file.name} is not a plain file; refusing it")
        with file.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise BundleError(f"{file.name} is truncated; the bundle is corrupt")
            (length,) = struct.unpack("<Q", raw)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise BundleError(
                    f"{file.name} declares a {length}-byte header; refusing to read (corrupt or hostile file)"
                )
            header_bytes = fh.read(length)
    except FileNotFoundError:
        raise BundleError(f"{file.name} is missing; the bundle is incomplete") from None
    except OSError as exc:
        raise BundleError(f"cannot read {file.name}: {exc.strerror}") from None
    limits = BundleConfig(max_string_chars=1_000_000, max_json_depth=8, max_json_containers=10_000_000)
    header = parse_json(header_bytes.rstrip(b" "), f"{file.name} header", limits, max_bytes=MAX_HEADER_BYTES)
    if not isinstance(header, dict):
        raise BundleError(f"{file.name} header is not a JSON object; the file is corrupt or hostile")
    data_len = size - 8 - length
    spans = []
    out: dict[str, tuple[str, list[int], int, int]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise BundleError(f"{file.name} header: __metadata__ must map strings to strings")
            continue
        dtype, shape, span = _header_entry(file.name, name, entry)
        begin, end = span
        if not 0 <= begin <= end <= data_len:
            raise BundleError(
                f"{file.name}: entry {_show(name)} spans bytes {begin}–{end}, beyond the {data_len}-byte data area"
            )
        if math.prod(shape) * DTYPE_ITEMSIZE[dtype] != end - begin:
            raise BundleError(
                f"{file.name}: entry {_show(name)} declares shape {shape[:8]} {dtype}, which does not fill its "
                f"{end - begin}-byte range; the file is corrupt or hostile"
            )
        spans.append((begin, end))
        out[name] = (dtype, shape, begin, end)
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise BundleError(f"{file.name}: entries overlap or leave gaps in the data area; the file is corrupt")
        position = end
    if position != data_len:
        raise BundleError(f"{file.name}: {data_len - position} bytes after the last entry; the file is corrupt")
    return _Layout(out, 8 + length, size)


class _MappedFile:
    """A checked safetensors file mapped copy-on-write: tensors are views of the map (no
    copy; writing to one changes only this process's pages, never the file). The file
    stays open while the map lives: entries are hashed from it with ``pread`` (see
    :meth:`entry_digests`)."""

    def __init__(self, file: Path):
        self.name = file.name
        self.layout = _check_header(file)
        try:
            with file.open("rb") as fh:
                self.map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if self.layout.size else None
                self._fd = os.dup(fh.fileno())
        except (OSError, ValueError) as exc:
            raise BundleError(f"cannot read {file.name}: {exc}") from None
        self._release = weakref.finalize(self, os.close, self._fd)
        self.int64_ranges: dict[str, tuple[int, int]] = {}  # filled while hashing (see _hash_entries)
        if (len(self.map) if self.map is not None else 0) != self.layout.size:
            raise BundleError(f"{file.name} changed while it was read; open the bundle again")

    def close(self) -> None:
        """Close the file now. The map is not closed here: tensors read from it view its
        pages without the map knowing (``torch.frombuffer`` keeps a reference to it, not a
        buffer export), so it is unmapped when the last reference goes."""
        self._release()

    def span(self, name: str) -> memoryview:
        _dtype, _shape, begin, end = self.layout.entries[name]
        start = self.layout.data_start
        return memoryview(self.map)[start + begin : start + end] if self.map is not None else memoryview(b"")

    def tensor(self, name: str) -> torch.Tensor:
        dtype_name, shape, begin, end = self.layout.entries[name]
        dtype = getattr(torch, dtype_name)
        offset = self.layout.data_start + begin
        if end == begin or self.map is None:
            return torch.empty(shape, dtype=dtype)
        itemsize = DTYPE_ITEMSIZE[dtype_name]
        if offset % itemsize:  # only a hand-made file misaligns an entry: copy it
            return torch.frombuffer(bytearray(self.span(name)), dtype=dtype).reshape(shape)
        return torch.frombuffer(self.map, dtype=dtype, count=(end - begin) // itemsize, offset=offset).reshape(shape)

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {name: self.tensor(name) for name in names}

    def entry_digests(
        self, pool: ThreadPoolExecutor, algorithm: str
    ) -> tuple[Future[bytes], Callable[[], dict[str, bytes]]]:
        """Start hashing (under ``algorithm``) the header bytes and every entry's bytes in
        ``pool``: entries in file order, batched into tasks of about ``_BATCH_BYTES`` (see
        :meth:`_hash_entries`). Returns the header's future and what waits for the entry
        digests (raw 32 bytes each, in the header's order)."""
        head = memoryview(self.map)[: self.layout.data_start] if self.map is not None else memoryview(b"")
        header = pool.submit(digests.digest, head, algorithm)
        entries = self.layout.entries
        batches: list[tuple[list[str], Future[list[bytes]]]] = []
        batch: list[str] = []
        size = 0
        for name in sorted(entries, key=lambda n: entries[n][2]):
            batch.append(name)
            size += entries[name][3] - entries[name][2]
            if size >= _BATCH_BYTES:
                batches.append((batch, pool.submit(self._hash_entries, batch, algorithm)))
                batch, size = [], 0
        if batch:
            batches.append((batch, pool.submit(self._hash_entries, batch, algorithm)))

        def entry_sums() -> dict[str, bytes]:
            sums = {n: d for names, future in batches for n, d in zip(names, future.result(), strict=True)}
            return {name: sums[name] for name in entries}

        return header, entry_sums

    def _hash_entries(self, names: list[str], algorithm: str) -> list[bytes]:
        """The digest of each entry, read with ``pread`` into one buffer (a few MiB at most,
        reused) and hashed there: faster than hashing the map, whose pages the CPU walks one
        by one, where the kernel copies from the page cache through its own large pages.
        An entry over ``_READ_BYTES`` is hashed from the map. A file cut short since it was
        opened hashes what is left, so its digest differs from the manifest's. The range
        (min, max) of each int64 entry read is kept in ``int64_ranges`` while its bytes are in
        the cache (top-k indices are range-checked from it, not read again)."""
        spans = [self.layout.entries[name][2:] for name in names]
        largest = max((end - begin for begin, end in spans), default=0)
        view = memoryview(bytearray(min(largest, _READ_BYTES)))
        out = []
        for name, (begin, end) in zip(names, spans, strict=True):
            if end - begin > len(view):
                out.append(digests.digest(self.span(name), algorithm))
                continue
            piece, got = view[: end - begin], 0
            while got < piece.nbytes and (
                done := os.preadv(self._fd, [piece[got:]], self.layout.data_start + begin + got)
            ):
                got += done
            out.append(digests.digest(piece[:got], algorithm))
            if self.layout.entries[name][0] == "int64" and got == piece.nbytes and got:
                values = np.frombuffer(piece, dtype=np.int64)
                self.int64_ranges[name] = (int(values.min()), int(values.max()))
        return out

    def site_digests(self, site: str, names: list[str], full: bool, algorithm: str) -> tuple[str, str | None]:
        """(``stored_sha256`` of the site's entries over their bytes (formats 1.0, 1.1), digest
        of its exact tensor when the site is stored ``full``), hashed straight from the map."""
        digest = digests.hasher(algorithm)
        for name in sorted(names):
            dtype, shape, _begin, _end = self.layout.entries[name]
            digest.update(_entry_prefix(name, dtype, shape))
            digest.update(self.span(name))
        exact = digests.hexdigest(self.span(site), algorithm) if full and site in names else None
        return digest.hexdigest(), exact


def _header_entry(file: str, name: str, entry: Any) -> tuple[str, list[int], tuple[int, int]]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise BundleError(f"{file}: header entry {_show(name)} is malformed")
    dtype = _ST_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    shape, span = entry["shape"], entry["data_offsets"]
    if dtype is None:
        raise BundleError(f"{file}: entry {_show(name)} has dtype {_show(entry['dtype'])}, not one bundles use")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_is_count(d) for d in shape):
        raise BundleError(f"{file}: entry {_show(name)} has a malformed shape")
    if not isinstance(span, list) or len(span) != 2 or not all(_is_count(d) for d in span):
        raise BundleError(f"{file}: entry {_show(name)} has malformed data offsets")
    return dtype, shape, (span[0], span[1])


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**62


def _decode(site: str, entries: dict[str, torch.Tensor], info: dict[str, Any]) -> torch.Tensor:
    """Decode one site, checking the stored parts against the declared shape first."""
    _check_decodable(site, entries, info)
    return sketches.decode(site, entries, info["sketch"], tuple(info["shape"]), getattr(torch, info["dtype"]))


def _check_decodable(
    site: str, entries: dict[str, torch.Tensor], info: dict[str, Any], ranges: dict[str, tuple[int, int]] | None = None
) -> None:
    """Check that one site's stored parts decode to its declared shape and dtype: the
    entries each sketch needs, no others, with their dtypes and shapes, and top-k indices
    inside the shape (from ``ranges``, the (min, max) of int64 entries seen while hashing,
    where it has them). :func:`sketches.decode` of entries that pass cannot fail and gives a
    tensor of exactly that shape and dtype, so verification checks without decoding.

    Raises:
        BundleError: saying what does not match.
    """
    shape, dtype, sketch = tuple(info["shape"]), getattr(torch, info["dtype"]), info["sketch"]
    numel = math.prod(shape)
    bad = f"site {_show(site)}: the stored {sketch} sketch does not match the declared shape {list(shape)[:8]}"
    if sketch in ("full", "fp16"):
        t = entries.get(site)
        want = dtype if sketch == "full" else torch.float16
        if t is None or tuple(t.shape) != shape or t.dtype != want or len(entries) != 1:
            raise BundleError(bad)
    elif sketch == "int8":
        q, scale = entries.get(site), entries.get(f"{site}::scale")
        if q is None or scale is None or tuple(q.shape) != shape or q.dtype != torch.int8 or len(entries) != 2:
            raise BundleError(bad)
        if scale.dtype != torch.float32 or tuple(scale.shape) != (*shape[:-1], 1):
            raise BundleError(bad)
    else:
        idx, values = entries.get(f"{site}::indices"), entries.get(f"{site}::values")
        if idx is None or values is None or idx.dtype != torch.int64 or idx.dim() != 1 or len(entries) != 2:
            raise BundleError(bad)
        if values.shape != idx.shape or values.dtype != dtype:
            raise BundleError(bad)
        if idx.numel():
            known = (ranges or {}).get(f"{site}::indices")
            low, high = known if known is not None else map(int, torch.aminmax(idx))  # one pass
            if low < 0 or high >= numel:
                raise BundleError(
                    f"site {_show(site)}: top-k indices fall outside the declared shape {list(shape)[:8]}"
                )


def _safe_extract(archive: Path, dest: Path, limits: BundleConfig) -> None:
    """Inflate a ``.mfb.zip`` into ``dest``, refusing anything a bundle archive never holds.

    Checked before inflating: every entry's name (no paths, no duplicates, only bundle
    files), type (no links, directories, encryption, compression other than stored or
    deflate) and declared size (total ≤ max_unpacked_mb, ratio ≤ max_compression_ratio).
    Checked while inflating: the bytes actually produced, against the same caps and the
    declared size; CRCs are checked by zipfile at the end of each entry.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error, NotImplementedError, KeyError) as exc:
        raise BundleError(
            f"'{archive}' is neither a bundle directory nor a valid .mfb.zip ({type(exc).__name__})"
        ) from None
    cap = int(limits.max_unpacked_mb * 1024 * 1024)
    with zf:
        infos = zf.infolist()
        _check_archive(archive, infos, cap, limits.max_compression_ratio)
        produced = 0
        for info in infos:
            try:
                produced += _inflate(zf, info, dest / info.filename, cap - produced, limits.max_compression_ratio)
            except BundleError:
                raise
            except (
                zipfile.BadZipFile,
                OSError,
                ValueError,
                EOFError,
                struct.error,
                NotImplementedError,
                RuntimeError,
            ) as exc:
                raise BundleError(
                    f"'{archive}': entry {_show(info.filename)} is corrupt ({type(exc).__name__}: {_clip(exc)})"
                ) from None


def _clip(exc: BaseException, n: int = 120) -> str:
    text = str(exc).encode("ascii", "backslashreplace").decode()
    return text if len(text) <= n else text[: n - 1] + "…"


def _check_archive(archive: Path, infos: list[zipfile.ZipInfo], cap: int, ratio: float) -> None:
    seen: set[str] = set()
    declared = 0
    for info in infos:
        name = info.filename
        if name not in BUNDLE_FILES:
            raise BundleError(
                f"'{archive}' holds an unexpected entry {_show(name)} (possible path traversal, a folder or another file); "
                f"a bundle archive holds only {', '.join(sorted(BUNDLE_FILES))} at its top level"
            )
        if name in seen:
            raise BundleError(f"'{archive}' holds the entry {_show(name)} twice; refusing it")
        seen.add(name)
        mode = (info.external_attr >> 16) & 0o170000
        if mode and mode != stat.S_IFREG:
            raise BundleError(f"'{archive}': {_show(name)} is not a plain file (a link or device); refusing it")
        if info.flag_bits & 0x1:
            raise BundleError(f"'{archive}': {_show(name)} is encrypted; bundles are never encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise BundleError(
                f"'{archive}': {_show(name)} uses compression method {info.compress_type}; only stored and deflate are read"
            )
        declared += info.file_size
        if declared > cap:
            raise BundleError(f"'{archive}' declares more than {cap} unpacked bytes (max_unpacked_mb); refusing it")
        if info.file_size > ratio * max(info.compress_size, 1):
            raise BundleError(
                f"'{archive}': {_show(name)} would inflate {info.file_size / max(info.compress_size, 1):.0f}× "
                f"(max_compression_ratio={ratio:g}); refusing a likely zip bomb"
            )


def _inflate(zf: zipfile.ZipFile, info: zipfile.ZipInfo, out: Path, budget: int, ratio: float) -> int:
    limit = min(budget, info.file_size, int(ratio * max(info.compress_size, 1)))
    written = 0
    with zf.open(info) as src, out.open("xb") as dst:
        while chunk := src.read(1 << 20):
            written += len(chunk)
            if written > limit:
                raise BundleError(
                    f"'{zf.filename}': {_show(info.filename)} inflates past its declared size or the caps; refusing it"
                )
            dst.write(chunk)
    if written != info.file_size:
        raise BundleError(f"'{zf.filename}': {_show(info.filename)} is shorter than its declared size; it is corrupt")
    return written
