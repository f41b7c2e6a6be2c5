"""The bundle fuzzer: mutate a good bundle the way an attacker or a bad disk would, then
read it with every reader the package has. The only allowed outcomes are a bundle that
verifies (and then, if anything changed, a different content digest) or a
BundleError / ForensicsError. Shared by tests/reliability/test_fuzz.py (a few hundred
cases, Hypothesis) and benchmarks/reliability.py (≥ 10,000 seeded cases).

Every mutator takes a ``random.Random`` (Hypothesis supplies one with ``st.randoms()``,
so failures shrink and replay) and a private copy of a bundle directory, changes it in
place and returns a one-line description.
"""

from __future__ import annotations

import json
import random
import shutil
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hostile import rehash

from model_forensics.core.bundle import DATA_FILES, Bundle, canonical_json, pack_bundle
from model_forensics.core.errors import ForensicsError

TENSOR_FILES = ("inputs.safetensors", "outputs.safetensors", "activations.safetensors")
Mutator = Callable[[random.Random, Path], str]


@dataclass
class Outcome:
    """What reading one mutated bundle gave."""

    kind: str  # "verified" | "rejected" | "crash" | "undetected"
    detail: str = ""


# -- random JSON --------------------------------------------------------------------------------
def random_json(rng: random.Random, depth: int = 0) -> Any:
    """A JSON value drawn to hit edges: huge and negative ints, long and control-character
    strings, floats near overflow, empty and nested containers, bools where ints go."""
    choice = rng.randrange(12 if depth < 4 else 8)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, -1, 1, 2**31, 2**63, -(2**63) - 1, 10**30, rng.randrange(-1000, 1000)])
    if choice == 3:
        return rng.choice([0.5, -0.0, 1e308, -1e308, 1e-320, rng.uniform(-1e6, 1e6)])
    if choice == 4:
        return rng.choice(["", "x" * rng.randrange(1, 2000), "\x1b[31m\x00", "../../etc/passwd", "float32", "full"])
    if choice == 5:
        return "".join(chr(rng.randrange(0, 0x3000)) for _ in range(rng.randrange(1, 40)))
    if choice == 6:
        return rng.choice(["custom_generate", "trust_remote_code", "zoo:gpt2-injection", "eager", "regex"])
    if choice == 7:
        return [rng.randrange(0, 10**6) for _ in range(rng.randrange(0, 9))]
    if choice in (8, 9):
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    keys = ["shape", "dtype", "sketch", "args", "kind", "holds", "text", "prompt", "input_ids", rng.choice("abcxyz")]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(0, 4))}


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path (keys and list indices) into a JSON value."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:20]):
            out += _paths(v, (*prefix, i))
    return out


def _parent(value: Any, path: tuple[Any, ...]) -> Any:
    for key in path[:-1]:
        value = value[key]
    return value


# -- mutators -----------------------------------------------------------------------------------
def mutate_manifest(rng: random.Random, bundle: Path) -> str:
    """Replace, delete or add one value anywhere in the manifest (a structured edit)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    path = rng.choice(_paths(manifest)[1:])
    parent, key = _parent(manifest, path), path[-1]
    op = rng.randrange(4)
    if op == 0:
        parent[key] = random_json(rng)
        what = f"set {'.'.join(map(str, path))}"
    elif op == 1 and isinstance(parent, dict):
        del parent[key]
        what = f"deleted {'.'.join(map(str, path))}"
    elif op == 2 and isinstance(parent[key], dict):
        parent[key][rng.choice(["custom_generate", "trust_remote_code", "zz", "__class__"])] = random_json(rng)
        what = f"added a key under {'.'.join(map(str, path))}"
    else:
        parent[key] = type(parent[key])() if isinstance(parent[key], dict | list | str) else not parent[key]
        what = f"emptied/negated {'.'.join(map(str, path))}"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return what


def mutate_manifest_text(rng: random.Random, bundle: Path) -> str:
    """Byte-level edits of manifest.json: duplicate keys, NaN, deep nesting, huge numbers, cuts."""
    text = (bundle / "manifest.json").read_text()
    op = rng.randrange(6)
    if op == 0:
        at = text.index("{") + 1
        text = text[:at] + '"name": "dup", ' + text[at:]
        return _write(bundle, text, "duplicated the key 'name'")
    if op == 1:
        return _write(bundle, text.replace('"holds": true', '"holds": NaN', 1).replace("0.1", "Infinity", 1), "NaN")
    if op == 2:
        depth = rng.choice([70, 500, 5000, 100_000])
        at = text.rindex("}")
        return _write(bundle, text[:at] + ', "deep": ' + "[" * depth + "]" * depth + text[at:], f"nested {depth}")
    if op == 3:
        at = text.rindex("}")
        return _write(bundle, text[:at] + ', "n": 1' + "0" * rng.choice([50, 5000]) + text[at:], "a huge number")
    if op == 4:
        cut = rng.randrange(len(text))
        return _write(bundle, text[:cut], f"truncated at {cut}")
    raw = bytearray(text.encode())
    for _ in range(rng.randrange(1, 5)):
        raw[rng.randrange(len(raw))] = rng.randrange(256)
    (bundle / "manifest.json").write_bytes(bytes(raw))
    return "flipped manifest bytes"


def _write(bundle: Path, text: str, what: str) -> str:
    (bundle / "manifest.json").write_text(text)
    return what


def mutate_calls(rng: random.Random, bundle: Path) -> str:
    """Hostile calls.jsonl lines (not UTF-8, not objects, deep, NaN), rehashed so they reach the parser."""
    lines = [json.dumps({"order": i, "name": "tool", "args": [i], "result": "ok"}).encode() for i in range(3)]
    bad = rng.choice(
        [
            bytes(rng.randrange(256) for _ in range(rng.randrange(1, 30))),
            json.dumps(random_json(rng)).encode(),
            b"[" * 3000 + b"]" * 3000,
            b'{"a": NaN}',
            b'{"a": 1, "a": 2}',
            b"\xef\xbb\xbf{}",
        ]
    )
    lines.insert(rng.randrange(len(lines) + 1), bad)
    (bundle / "calls.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    rehash(bundle)
    return f"calls.jsonl line {bad[:20]!r}"


def mutate_safetensors_header(rng: random.Random, bundle: Path) -> str:
    """Edit one safetensors header (dtype, shape, offsets, entries, declared length), rehashed."""
    file = bundle / rng.choice(TENSOR_FILES)
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    names = [k for k in header if k != "__metadata__"]
    op = rng.randrange(7)
    if names and op == 0:
        header[rng.choice(names)]["dtype"] = rng.choice(["F128", "I8", "U64", "BOOL", "F16", 3, None])
    elif names and op == 1:
        header[rng.choice(names)]["shape"] = [rng.choice([0, 1, 7, -1, 10**6, 2**40]) for _ in range(rng.randrange(4))]
    elif names and op == 2:
        header[rng.choice(names)]["data_offsets"] = [rng.randrange(-5, len(data) + 9), rng.randrange(-5, 10**12)]
    elif op == 3:
        header[rng.choice(["extra", "blocks.0.mlp", "__metadata__"])] = random_json(rng)
    elif names and op == 4:
        del header[rng.choice(names)]
    text = json.dumps(header).encode()
    declared = len(text) if op != 5 else rng.choice([0, 7, len(text) - 1, len(text) + 1, 2**63])
    if op == 6:
        data = data[: rng.randrange(len(data) + 1)]
    file.write_bytes(declared.to_bytes(8, "little") + text + data)
    rehash(bundle)
    return f"{file.name} header op {op}"


def flip_bytes(rng: random.Random, bundle: Path) -> str:
    """Flip or truncate bytes of one file; rehash half of the time (so the damage reaches the parsers)."""
    name = rng.choice([*DATA_FILES, "manifest.json"])
    file = bundle / name
    raw = bytearray(file.read_bytes())
    if raw and rng.random() < 0.7:
        for _ in range(rng.randrange(1, 8)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        what = f"flipped bits in {name}"
    else:
        raw = raw[: rng.randrange(len(raw) + 1)]
        what = f"truncated {name} to {len(raw)} bytes"
    file.write_bytes(bytes(raw))
    if name != "manifest.json" and rng.random() < 0.5:
        rehash(bundle)
        what += " (rehashed)"
    return what


def mutate_zip(rng: random.Random, bundle: Path) -> str:
    """Pack the bundle, then damage the archive's structure (headers, sizes, names, flags, cuts)."""
    archive = pack_bundle(bundle, bundle.parent / f"{bundle.name}.mfb.zip")
    shutil.rmtree(bundle)
    raw = bytearray(archive.read_bytes())
    op = rng.randrange(5)
    if op == 0:
        for _ in range(rng.randrange(1, 10)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
    elif op == 1:
        raw = raw[: rng.randrange(len(raw))]
    else:
        sig = b"PK\x01\x02" if op != 4 else b"PK\x03\x04"
        starts = [i for i in range(len(raw) - 4) if raw[i : i + 4] == sig]
        at = rng.choice(starts)
        field = rng.choice([8, 10, 20, 24, 28, 30] if op != 4 else [6, 8, 18, 22, 26])
        raw[at + field : at + field + 4] = rng.randrange(2**32).to_bytes(4, "little")
    archive.write_bytes(bytes(raw))
    archive.rename(bundle)  # the probe opens `bundle`, now a file
    return f"zip op {op}"


MUTATORS: dict[str, Mutator] = {
    "manifest values": mutate_manifest,
    "manifest text": mutate_manifest_text,
    "calls.jsonl": mutate_calls,
    "safetensors headers": mutate_safetensors_header,
    "byte flips / truncation": flip_bytes,
    "zip structure": mutate_zip,
}


# -- probing ------------------------------------------------------------------------------------------
def fingerprint(bundle: Path) -> tuple[bytes, tuple[bytes, ...]] | None:
    """What a bundle *means*: its canonical manifest and the bytes of every data file (None
    when the manifest is not JSON at all)."""
    try:
        manifest = json.loads((bundle / "manifest.json").read_text())
        files = tuple((bundle / name).read_bytes() if (bundle / name).is_file() else b"" for name in DATA_FILES)
        return canonical_json(manifest), files
    except (ValueError, OSError, RecursionError):
        return None


def probe(path: Path, original_digest: str, original: tuple[bytes, tuple[bytes, ...]] | None) -> Outcome:
    """Open ``path`` (a directory or an archive) and use every reader. A bundle that opens
    cleanly although what it means differs from ``original`` must show another digest."""
    try:
        bundle = Bundle.open(path)
        problems = bundle.verify_contents()
        digest = bundle.digest
        bundle.predicate  # noqa: B018
        bundle.cube()
        bundle.calls()
        bundle.inputs  # noqa: B018
        bundle.outputs  # noqa: B018
        changed = fingerprint(bundle.path) != original
    except ForensicsError as exc:
        text = str(exc)
        if "\n" in text:
            return Outcome("crash", f"multi-line error: {text[:200]!r}")
        return Outcome("rejected", text[:200])
    except Exception:
        return Outcome("crash", traceback.format_exc(limit=6))
    if problems:
        return Outcome("rejected", problems[0][:200])
    if changed and digest == original_digest:
        return Outcome("undetected", "verified with the original digest although its contents changed")
    return Outcome("verified", "digest changed" if changed else "")


def run_case(mutator: Mutator, rng: random.Random, pristine: Path, work: Path) -> tuple[str, Outcome]:
    """Copy ``pristine`` to ``work``, mutate, probe; returns (description, outcome)."""
    if work.is_dir():
        shutil.rmtree(work)
    elif work.exists():
        work.unlink()
    shutil.copytree(pristine, work)
    what = mutator(rng, work)
    return what, probe(work, Bundle.open(pristine).digest, fingerprint(pristine))
