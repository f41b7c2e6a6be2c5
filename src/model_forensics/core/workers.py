"""The environment of the worker processes the package starts itself: the ``analyze``/``batch``
spawn pool, the isolated replay, and the server's fork server (analysis jobs, replay worker).

They start with ``OMP_WAIT_POLICY=PASSIVE`` unless the user set the variable: idle OpenMP
threads then sleep instead of spinning, which on a machine whose cores are busy (several
workers of one analysis, other jobs) cut a 2-thread SmolLM2 pass from 21 s to 0.8 s
(``benchmarks/results/omp_wait.md``). OpenMP reads the variable once, when ``import torch``
loads it, so it has to be in a child's environment when the child starts; this process's
own runtime is never changed.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}

# Held while os.environ carries the defaults, so that two threads starting workers at once
# neither see the other's default as the user's setting nor remove it under the other.
_lock = threading.RLock()


def worker_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child started with an explicit ``env``: ``base`` (default
    ``os.environ``) with each of :data:`WORKER_ENV` added where ``base`` has none (the
    user's own setting wins)."""
    env = dict(os.environ if base is None else base)
    for name, value in WORKER_ENV.items():
        env.setdefault(name, value)
    return env


@contextmanager
def worker_environment() -> Iterator[None]:
    """Inside the block, processes started from this one (spawn, forkserver, subprocess)
    inherit :data:`WORKER_ENV` where the user set none; ``os.environ`` is restored on leaving.

    Example::

        with worker_environment():
            pool.submit(work, job)   # a spawn pool starts its workers on submit
    """
    with _lock:
        added = [name for name in WORKER_ENV if name not in os.environ]
        for name in added:
            os.environ[name] = WORKER_ENV[name]
        try:
            yield
        finally:
            for name in added:
                os.environ.pop(name, None)
