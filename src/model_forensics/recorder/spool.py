"""ActivationSpool: a recording's captured steps, in RAM up to a budget, on disk beyond it.

Each site gets one step per forward call (the prompt, then every decoding step), kept in
order. While the bytes held in RAM stay within ``budget_bytes`` a step is kept as a clone;
past the budget its exact bytes are appended to the spool file (``steps.bin`` in a private
temporary directory ``mf-spool-{pid}-*``) as soon as the hook sees them, and only (offset,
dtype, shape) stays in memory. So the memory a recording holds does not grow with the
number of sites.

:meth:`ActivationSpool.load` reads one site back and joins its steps along the token axis
(attention patterns: queries stacked, keys zero-padded to the longest step), byte for byte
the tensor an all-in-RAM recording holds. :class:`SketchedSites` hands the sites to the
bundle writer one at a time, sketch-encoded. The directory is removed when the spool is
closed, garbage-collected, or the interpreter exits; spool directories left by killed
processes (their pid is gone) are removed when the next spool directory is made beside them.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from model_forensics.core import sketches
from model_forensics.core.bundle import process_alive

SPOOL_FILE = "steps.bin"
_SPOOL_NAME = re.compile(r"^mf-spool-(?P<pid>\d+)-[^/]+$")


@dataclass(frozen=True)
class _OnDisk:
    """One step spilled to the spool file: ``nbytes`` bytes at ``offset``."""

    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


Step = torch.Tensor | _OnDisk


class ActivationSpool:
    """Captured steps per site, held in RAM up to ``budget_bytes`` and spilled beyond it.

    Args:
        budget_bytes: most bytes of clones held in RAM (0: every step goes to disk).
        directory: where the spool's temporary directory is made (None: the system temp
            dir; choose a disk, not a tmpfs, or the spill stays in RAM).
    """

    def __init__(self, budget_bytes: int, directory: str | Path | None = None):
        self.budget_bytes = budget_bytes
        self.directory = directory
        self.held_bytes = 0
        self.spilled_bytes = 0
        self._steps: dict[str, list[Step]] = {}
        self._fd: int | None = None
        self._path: Path | None = None
        self._end = 0
        self._cleanup: weakref.finalize | None = None

    # -- writing ---------------------------------------------------------------------------
    def add(self, site: str, tensor: torch.Tensor) -> None:
        """Keep one step of ``site`` (a clone in RAM, or its bytes on disk past the budget)."""
        nbytes = tensor.numel() * tensor.element_size()
        steps = self._steps.setdefault(site, [])
        if self.held_bytes + nbytes <= self.budget_bytes:
            steps.append(tensor.detach().clone())
            self.held_bytes += nbytes
            return
        data = sketches.tensor_bytes(tensor.detach().cpu())
        offset = self._append(data)
        steps.append(_OnDisk(offset, nbytes, tensor.dtype, tuple(tensor.shape)))
        self.spilled_bytes += nbytes

    def forget(self, site: str) -> None:
        """Drop every step kept for ``site`` (its bytes on disk stay until the spool closes)."""
        for step in self._steps.pop(site, []):
            if isinstance(step, torch.Tensor):
                self.held_bytes -= step.numel() * step.element_size()

    def close(self) -> None:
        """Forget everything and remove the spool directory."""
        self._steps.clear()
        self.held_bytes = self.spilled_bytes = 0
        if self._cleanup is not None:
            self._cleanup()
        self._fd, self._path, self._cleanup, self._end = None, None, None, 0

    def _append(self, data: object) -> int:
        if self._fd is None:
            folder = Path(tempfile.mkdtemp(prefix=f"mf-spool-{os.getpid()}-", dir=self.directory))
            remove_stale_spools(folder.parent)
            self._path = folder / SPOOL_FILE
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            self._cleanup = weakref.finalize(self, _remove, self._fd, folder)
        offset = self._end
        view = memoryview(data).cast("B")  # type: ignore[arg-type]
        position = offset
        while view.nbytes:
            done = os.pwrite(self._fd, view, position)
            view, position = view[done:], position + done
        self._end = position
        return offset

    # -- reading ---------------------------------------------------------------------------
    def sites(self) -> list[str]:
        """The sites with kept steps, in the order they were first seen."""
        return list(self._steps)

    def __contains__(self, site: object) -> bool:
        return site in self._steps

    def shape(self, site: str) -> tuple[int, ...]:
        """The shape :meth:`load` returns for ``site``, without loading it."""
        return joined_shape(site, [_shape(s) for s in self._steps[site]])

    def dtype(self, site: str) -> torch.dtype:
        step = self._steps[site][0]
        return step.dtype

    def load(self, site: str) -> torch.Tensor:
        """``site``'s steps joined along the token axis (a step held in RAM is returned
        as it is, not copied)."""
        return join_steps(site, [self._read(s) for s in self._steps[site]])

    def _read(self, step: Step) -> torch.Tensor:
        if isinstance(step, torch.Tensor):
            return step
        assert self._fd is not None
        buffer = torch.empty(step.nbytes, dtype=torch.uint8)
        view, position = memoryview(buffer.numpy()), step.offset  # type: ignore[arg-type]
        while view.nbytes:
            done = os.preadv(self._fd, [view], position)
            if done == 0:
                raise OSError(f"the spool file {self._path} is shorter than recorded; was it removed?")
            view, position = view[done:], position + done
        return buffer.view(step.dtype).reshape(step.shape)


def remove_stale_spools(parent: Path) -> list[Path]:
    """Remove the spool directories in ``parent`` whose process is gone (a recording that
    was killed); returns them."""
    removed: list[Path] = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _SPOOL_NAME.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not process_alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _remove(fd: int, folder: Path) -> None:
    os.close(fd)
    shutil.rmtree(folder, ignore_errors=True)


def _shape(step: Step) -> tuple[int, ...]:
    return tuple(step.shape)


def join_steps(site: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """One site's steps as one tensor: (B, T, …) steps concatenated along T; attention
    patterns (B, H, Tq, Tk) with growing Tk padded with zero keys and stacked along Tq."""
    if len(parts) == 1:
        return parts[0]
    if site.endswith("attn.pattern"):
        tk = max(p.shape[-1] for p in parts)
        parts = [torch.nn.functional.pad(p, (0, tk - p.shape[-1])) for p in parts]
        return torch.cat(parts, dim=2)
    return torch.cat(parts, dim=1)


def joined_shape(site: str, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The shape :func:`join_steps` gives for steps of these shapes."""
    if len(shapes) == 1:
        return shapes[0]
    first = list(shapes[0])
    if site.endswith("attn.pattern"):
        first[2], first[3] = sum(s[2] for s in shapes), max(s[3] for s in shapes)
    else:
        first[1] = sum(s[1] for s in shapes)
    return tuple(first)


class SpooledSites(Mapping[str, torch.Tensor]):
    """A read-only mapping site → joined tensor that loads each site when it is asked for."""

    def __init__(self, spool: ActivationSpool, sites: list[str]):
        self.spool, self._sites = spool, sites

    def __getitem__(self, site: str) -> torch.Tensor:
        if site not in self._sites:
            raise KeyError(site)
        return self.spool.load(site)

    def __iter__(self) -> Iterator[str]:
        return iter(self._sites)

    def __len__(self) -> int:
        return len(self._sites)


class SketchedSites:
    """The bundle writer's :class:`~model_forensics.core.bundle.SiteSource` over a spool:
    each site is loaded and sketch-encoded when the writer asks for it, handed over with its
    exact tensor (which the writer hashes, for sketches that do not store it exactly), and freed after."""

    def __init__(self, spool: ActivationSpool, sites: list[str], sketch: str, compression_ratio: float):
        self.spool, self._sites = spool, sites
        self.sketch, self.compression_ratio = sketch, compression_ratio

    def sites(self) -> list[str]:
        return list(self._sites)

    def specs(self, site: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        shape, dtype = self.spool.shape(site), self.spool.dtype(site)
        return sketches.encoded_specs(site, shape, dtype, self.sketch, self.compression_ratio)

    def load(self, site: str) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """``site``'s sketch entries, and its exact tensor for the writer to hash (None for
        ``full``: its entry is that tensor, and its entry digest the site's sha256)."""
        tensor = self.spool.load(site)
        entries = sketches.encode(site, tensor, self.sketch, self.compression_ratio)
        return entries, None if self.sketch == "full" else tensor

    def nbytes(self, site: str) -> int:
        shape = self.spool.shape(site)
        return sketches.encoded_nbytes(shape, self.spool.dtype(site), self.sketch, self.compression_ratio)


def budget_bytes(megabytes: float) -> int:
    return int(megabytes * 1024 * 1024)
