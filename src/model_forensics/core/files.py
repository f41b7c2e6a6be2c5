"""Writing files the way every output of model-forensics is written: whole or not at all
(a temporary sibling, fsynced, renamed into place) and with the permissions the umask
gives a new file (tempfiles would otherwise be private, 0600)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def shared_mode(directory: bool = False) -> int:
    """The mode a new file (0o666) or directory (0o777) gets under this process's umask:
    what a bundle's files and archives are given, so a group can read them when the umask
    lets it (0644 / 0755 under umask 022)."""
    return (0o777 if directory else 0o666) & ~_umask()


def _umask() -> int:
    try:  # Linux ≥ 4.7 reports it without changing it (os.umask can only set it)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary sibling, fsynced and renamed:
    a failure or a kill leaves the old file (or none), never a half-written one."""
    target = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, shared_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(name, target)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return target
