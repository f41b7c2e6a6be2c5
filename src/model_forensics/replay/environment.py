"""The replay environment: where every replayed forward pass runs, and where it is counted.

::

    env = ReplayEnvironment(bundle, adapter, config)
    with env.active() as server:         # server: the recorded external calls
        model(**inputs)                  # deterministic, sandboxed, no autograd
    env.counter.passes, env.counter.rows  # 1, inputs["input_ids"].shape[0]

Entering it applies the recording's determinism settings (seed, threads, deterministic
algorithms; ``replay.threads`` overrides the recorded thread count, which may cost
bit-identity, see :func:`~model_forensics.replay.verification.verify`; the caller's settings are restored on exit, also on errors), serves recorded
external calls from ``calls.jsonl`` in order, blocks network and process access unless
the config allows them, and turns autograd off (``torch.enable_grad()`` inside turns it
back on). One hook on the model's root module counts every forward call made inside it,
however it was made (``model(...)``, each step of ``generate()``, a recorder, user code):
``passes`` (calls) and ``rows`` (the batch size of each call, summed). Code that runs part
of a model by calling its blocks directly (a sweep's prefix-shared tail) counts that
partial pass itself, as one call, through :meth:`PassCounter.count`; nothing else adds to
the counter. Nested entries apply the settings again but count only through the outermost
entry's hook, so no call is counted twice.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model_forensics.core.bundle import Bundle
from model_forensics.core.config import ForensicsConfig, ReplayConfig, load_config
from model_forensics.models.adapters import Adapter
from model_forensics.models.hooks import hooks
from model_forensics.recorder.calls import CallServer, serving
from model_forensics.replay.sandbox import sandboxed


def clamp_threads(num_threads: int) -> int:
    """A requested thread count, clamped to 1 … this machine's CPU count."""
    return max(1, min(int(num_threads), os.cpu_count() or 1))


def with_threads(config: str | Path | ForensicsConfig | None, threads: int | None) -> Any:
    """``config`` with ``replay.threads`` set to ``threads`` (unchanged when None)."""
    if threads is None:
        return config
    settings = load_config(config)
    replay = settings.replay.model_copy(update={"threads": int(threads)})
    return settings.model_copy(update={"replay": replay})


@contextmanager
def deterministic(seed: int, num_threads: int | None, enabled: bool) -> Iterator[None]:
    """Apply a replay's determinism settings; restore the caller's on exit (even on errors)."""
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    rng = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        if num_threads:
            torch.set_num_threads(clamp_threads(num_threads))
        if enabled:
            torch.use_deterministic_algorithms(True, warn_only=True)
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.set_rng_state(rng)


@dataclass
class PassCounter:
    """Forward passes run in a replay environment.

    Attributes:
        passes: forward calls (a prefix-shared partial pass counts as one).
        rows: model rows, the batch size of every call summed (N runs of a sweep batch
            that took S calls add N · S).
    """

    passes: int = 0
    rows: int = 0

    def count(self, rows: int = 1) -> None:
        """Count one forward call of ``rows`` batch rows."""
        self.passes += 1
        self.rows += rows


class ReplayEnvironment:
    """Determinism, sandbox, recorded calls and pass counting for one bundle's replays.

    Args:
        bundle: the incident bundle (its ``determinism`` settings and ``calls.jsonl``).
        adapter: the replayed model's adapter (its root module carries the counting hook).
        config: the ``replay`` options (seed fallback, deterministic, allow_network,
            allow_subprocess); read on every entry.
    """

    def __init__(self, bundle: Bundle, adapter: Adapter, config: ReplayConfig):
        self.bundle = bundle
        self.adapter = adapter
        self.config = config
        self.counter = PassCounter()
        self._depth = 0  # entries currently open; only the outermost one counts

    @property
    def recorded_threads(self) -> int | None:
        """The thread count the incident was recorded with (None: not recorded)."""
        det = self.bundle.manifest.get("determinism") or {}
        threads = (det.get("torch") or {}).get("num_threads")
        return int(threads) if threads else None

    @property
    def threads(self) -> int | None:
        """The thread count replays run at: ``replay.threads`` when set, else the recorded one."""
        return self.config.threads or self.recorded_threads

    @property
    def effective_threads(self) -> int:
        """The count torch actually runs at inside :meth:`active` (clamped to the CPUs)."""
        threads = self.threads
        return clamp_threads(threads) if threads else torch.get_num_threads()

    @contextmanager
    def active(self) -> Iterator[CallServer]:
        """Run the block inside the environment; yields the server of recorded calls."""
        det = self.bundle.manifest.get("determinism") or {}
        seed = det.get("seed")
        threads = self.threads
        with ExitStack() as stack:
            stack.enter_context(
                deterministic(self.config.seed if seed is None else int(seed), threads, self.config.deterministic)
            )
            stack.enter_context(sandboxed(self.config.allow_network, self.config.allow_subprocess))
            server = stack.enter_context(serving(self.bundle.calls()))
            stack.enter_context(torch.no_grad())
            if self._depth == 0:
                stack.enter_context(hooks(self.adapter, before={"": self._count}))
            self._depth += 1
            try:
                yield server
            finally:
                self._depth -= 1

    def _count(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        for key in ("inputs_embeds", "pixel_values"):  # embeddings, or an image model's batch
            if ids is None:
                ids = kwargs.get(key)
        self.counter.count(int(ids.shape[0]) if isinstance(ids, torch.Tensor) and ids.dim() else 1)
