"""Provenance: where a recording came from (git commit, package versions, torch settings)."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

_PACKAGES = ("model-forensics", "torch", "transformers", "safetensors", "numpy", "tokenizers", "gguf")


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The current git commit of ``cwd`` (or of the process's directory), None outside git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def package_versions(names: tuple[str, ...] = _PACKAGES) -> dict[str, str]:
    """Installed versions of the packages that decide what a model computes."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def torch_settings() -> dict[str, Any]:
    """The torch settings that decide bit-identity: threads, determinism, backends."""
    return {
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "default_dtype": str(torch.get_default_dtype()).removeprefix("torch."),
    }


def collect_provenance() -> dict[str, Any]:
    """Everything a reader needs to judge whether a replay can be bit-identical."""
    return {
        "commit_hash": git_commit(),
        "package_versions": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch": torch_settings(),
    }
