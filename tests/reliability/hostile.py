"""Helpers that damage bundles the way an attacker or a failing disk would."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def edit_manifest(bundle: Path, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Apply ``change`` to a bundle's manifest in place and write it back."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def rehash(bundle: Path) -> None:
    """Recompute the manifest's files table after a data file changed: a self-consistent
    tamper that only the content digest (or a signature) can reveal. A manifest that is not
    JSON (or has no table) is left as it is."""
    import hashlib

    try:
        manifest = json.loads((bundle / "manifest.json").read_text())
    except (ValueError, OSError, RecursionError):
        return
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        return
    for name in ("inputs.safetensors", "outputs.safetensors", "activations.safetensors", "cube.json", "calls.jsonl"):
        if (bundle / name).is_file():
            data = (bundle / name).read_bytes()
            files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def safetensors_parts(file: Path) -> tuple[dict[str, Any], bytes]:
    """A safetensors file split into its header (parsed) and its data area."""
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_safetensors(file: Path, header: Any, data: bytes, declared: int | None = None) -> None:
    """Write a (possibly hostile) safetensors file from a header value and a data area."""
    text = json.dumps(header).encode()
    length = len(text) if declared is None else declared
    file.write_bytes(length.to_bytes(8, "little") + text + data)
