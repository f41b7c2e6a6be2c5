"""Provenance: where a recording came from (git commit, package versions, torch settings).

What cannot change within a process is computed once per process and reused (every bundle
a process writes would otherwise run git and read package metadata again, ~5–10 ms):

- package versions: the code a process runs is the code it imported; a package upgraded on
  disk meanwhile does not change it (the first reading is, if anything, the truer one);
- the git commit: remembered per repository *state* — the repository's ``HEAD`` (its text)
  and the file identity (inode, size, mtime) of the branch's ref and of ``packed-refs``.
  A commit, checkout, reset or fetch into the branch rewrites one of them (git replaces
  ref files by renaming a new file over them), so git runs again exactly when HEAD may have
  moved. Outside a plain ``.git`` directory (worktrees, ``GIT_DIR``) git runs every time;
- torch settings (threads, determinism) are read afresh: the process may change them.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

_PACKAGES = ("model-forensics", "torch", "transformers", "safetensors", "numpy", "tokenizers", "gguf")
_commits: dict[tuple[Any, ...], str | None] = {}  # repository state (see _git_state) → commit
_versions: dict[tuple[str, ...], dict[str, str]] = {}  # package names → versions, read once per process


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The current git commit of ``cwd`` (or of the process's directory), None outside git.
    Remembered while the repository's HEAD and refs are unchanged (see the module notes)."""
    state = _git_state(Path(cwd) if cwd is not None else Path.cwd())
    if state is not None and state in _commits:
        return _commits[state]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip() or None if out.returncode == 0 else None
    if state is not None:
        _commits[state] = commit
    return commit


def _git_state(cwd: Path) -> tuple[Any, ...] | None:
    """What ``git rev-parse HEAD`` in ``cwd`` depends on: the nearest ``.git`` directory,
    its HEAD's text, and the identity of the ref HEAD names and of ``packed-refs``; None
    when that cannot be told from files alone (no ``.git`` directory, a worktree's
    ``.git`` file, ``GIT_DIR`` set)."""
    if any(name in os.environ for name in ("GIT_DIR", "GIT_WORK_TREE", "GIT_CEILING_DIRECTORIES")):
        return None
    try:
        where = cwd.resolve()
        git = next((d / ".git" for d in (where, *where.parents) if (d / ".git").exists()), None)
        if git is None or not git.is_dir():
            return None
        head = (git / "HEAD").read_text()
        ref = head.removeprefix("ref:").strip() if head.startswith("ref:") else None
        files = [git / "packed-refs", *([git / ref] if ref else [])]
        stats = tuple(_identity(f) for f in files)
    except OSError:
        return None
    return (str(git), head, stats)


def _identity(file: Path) -> tuple[int, int, int, int] | None:
    try:
        st = file.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def package_versions(names: tuple[str, ...] = _PACKAGES) -> dict[str, str]:
    """Installed versions of the packages that decide what a model computes (read once per
    process: the imported code does not change)."""
    if names not in _versions:
        versions = {}
        for name in names:
            try:
                versions[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
        _versions[names] = versions
    return dict(_versions[names])


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
