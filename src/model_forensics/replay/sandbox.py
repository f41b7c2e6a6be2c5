"""The sandbox guard: during replay, nothing reaches the network or spawns a process.

A replay must depend only on the bundle. Inside :func:`sandboxed`, opening a network
connection (``socket.socket.connect``/``connect_ex``, ``socket.create_connection``) or
starting a process (``subprocess.Popen`` and everything built on it, ``os.system``,
``os.exec*``, ``os.spawn*``, ``os.posix_spawn*``, ``os.fork``) raises
:class:`SandboxViolation`, unless allowed. Calls recorded with ``record_call`` are answered
from ``calls.jsonl`` by :func:`model_forensics.recorder.calls.serving` instead.

The guard patches those functions process-wide while any guarded block is open (Python
has no per-thread sockets); the originals are restored when the last block exits, even
on errors. Nested blocks use the innermost block's permissions.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from model_forensics.core.errors import SandboxViolation

_PROCESS_FUNCTIONS = (
    "system",
    "execl",
    "execle",
    "execlp",
    "execlpe",
    "execv",
    "execve",
    "execvp",
    "execvpe",
    "spawnl",
    "spawnle",
    "spawnlp",
    "spawnlpe",
    "spawnv",
    "spawnve",
    "spawnvp",
    "spawnvpe",
    "posix_spawn",
    "posix_spawnp",
    "fork",
    "forkpty",
)


@dataclass(frozen=True)
class Permissions:
    """What code under replay may do."""

    allow_network: bool = False
    allow_subprocess: bool = False


class _Guard:
    """Installs the patches on first entry and removes them on last exit."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.stack: list[Permissions] = []
        self.saved: list[tuple[Any, str, Any, bool]] = []

    @property
    def current(self) -> Permissions:
        return self.stack[-1] if self.stack else Permissions(True, True)

    def enter(self, permissions: Permissions) -> None:
        with self.lock:
            if not self.stack:
                self._install()
            self.stack.append(permissions)

    def exit(self) -> None:
        with self.lock:
            self.stack.pop()
            if not self.stack:
                self._restore()

    # -- patches ---------------------------------------------------------------------------
    def _patch(self, owner: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return
        own = name in vars(owner)
        self.saved.append((owner, name, vars(owner).get(name), own))
        setattr(owner, name, make(original))

    def _install(self) -> None:
        def network(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
            def make(original: Callable[..., Any]) -> Callable[..., Any]:
                def guarded(*args: Any, **kwargs: Any) -> Any:
                    if not self.current.allow_network:
                        address = (
                            args[1] if what != "create_connection" and len(args) > 1 else (args[0] if args else "?")
                        )
                        raise SandboxViolation(
                            f"replay tried to open a network connection ({what} to {address!r}); replays run offline. "
                            "Record the call with recorder.record_call(...) so it is served from calls.jsonl, "
                            "or allow it with allow_network=True (--allow-network)"
                        )
                    return original(*args, **kwargs)

                return guarded

            return make

        def process(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
            def make(original: Callable[..., Any]) -> Callable[..., Any]:
                def guarded(*args: Any, **kwargs: Any) -> Any:
                    if not self.current.allow_subprocess:
                        command = args[1] if what == "subprocess.Popen" and len(args) > 1 else (args[0] if args else "")
                        raise SandboxViolation(
                            f"replay tried to start a process ({what} {command!r}); replays may not spawn processes. "
                            "Record the call with recorder.record_call(...) so it is served from calls.jsonl, "
                            "or allow it with allow_subprocess=True (--allow-subprocess)"
                        )
                    return original(*args, **kwargs)

                return guarded

            return make

        self._patch(socket.socket, "connect", network("connect"))
        self._patch(socket.socket, "connect_ex", network("connect"))
        self._patch(socket, "create_connection", network("create_connection"))
        # Every Popen (subprocess.run, check_output, os.popen …) starts its child here.
        self._patch(subprocess.Popen, "_execute_child", process("subprocess.Popen"))
        for name in _PROCESS_FUNCTIONS:
            self._patch(os, name, process(f"os.{name}"))

    def _restore(self) -> None:
        while self.saved:
            owner, name, original, own = self.saved.pop()
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)


_GUARD = _Guard()


@contextmanager
def sandboxed(allow_network: bool = False, allow_subprocess: bool = False) -> Iterator[Permissions]:
    """Within this block, network connections and new processes raise SandboxViolation.

    Example::

        with sandboxed():
            socket.create_connection(("example.com", 80))   # raises SandboxViolation
    """
    permissions = Permissions(allow_network, allow_subprocess)
    _GUARD.enter(permissions)
    try:
        yield permissions
    finally:
        _GUARD.exit()
