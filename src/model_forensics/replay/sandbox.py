"""The sandbox guard: during replay, nothing reaches the network or spawns a process.

A replay must depend only on the bundle. Inside :func:`sandboxed`, code that opens a
network channel, starts a process or calls native code through ctypes raises
:class:`SandboxViolation`, unless the block allows it. Calls recorded with ``record_call``
are answered from ``calls.jsonl`` by :func:`model_forensics.recorder.calls.serving` instead.

Two mechanisms, both process-wide while any guarded block is open (Python has no
per-thread sockets); nested blocks use the innermost block's permissions:

* One audit hook (PEP 578), added on the first entry. Audit hooks cannot be removed, so it
  returns at once while no block is open. It refuses the events in ``_EVENTS``: a new
  socket of any family but AF_UNIX, ``connect``/``bind``/``sendto``/``sendmsg`` to an
  address, name lookups (``getaddrinfo``, ``gethostbyname[_ex]``, ``gethostbyaddr``,
  ``getnameinfo``); ``subprocess.Popen``, ``os.system``, ``os.exec*``, ``os.spawn*``,
  ``os.posix_spawn[p]``, ``os.fork``, ``os.forkpty``; and ctypes ``dlopen``/``dlsym``/
  ``call_function`` (native code could do either of the others unseen). CPython raises
  these events in C, so calling a C method directly (``_socket.socket.connect(s, addr)``)
  is refused too.
* Patches for the process starts that raise no audit event: ``_posixsubprocess.fork_exec``
  (behind multiprocessing's ``spawn`` and ``forkserver`` start methods),
  ``multiprocessing.util.spawnv_passfds`` and ``multiprocessing.forkserver.
  connect_to_new_process`` (a fork server that already runs starts children on request).
  The originals are restored when the last block exits, even on errors.

Channels opened before the block (a connected socket, a running thread) keep working.
What the guard cannot stop (native code, ctypes pointers resolved before the block, file
access, hostile Python that switches it off) is listed in docs/security.md;
:mod:`model_forensics.replay.isolation` runs a replay in a network namespace for that.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from model_forensics.core.errors import SandboxViolation

Describe = Callable[[tuple[Any, ...]], str | None]


@dataclass(frozen=True)
class Permissions:
    """What code under replay may do."""

    allow_network: bool = False
    allow_subprocess: bool = False


@dataclass(frozen=True)
class _Rule:
    """One kind of escape: which permission allows it and what the refusal says."""

    action: str
    reason: str
    allow: str
    allowed: Callable[[Permissions], bool]

    def violation(self, detail: str) -> SandboxViolation:
        return SandboxViolation(
            f"replay tried to {self.action} ({detail}); {self.reason}. "
            "Record the call with recorder.record_call(...) so it is served from calls.jsonl, "
            f"or allow it with {self.allow}"
        )


_NETWORK = _Rule(
    "open a network connection",
    "replays run offline",
    "allow_network=True (--allow-network)",
    lambda p: p.allow_network,
)
_PROCESS = _Rule(
    "start a process",
    "replays may not spawn processes",
    "allow_subprocess=True (--allow-subprocess)",
    lambda p: p.allow_subprocess,
)
_NATIVE = _Rule(
    "call native code through ctypes",
    "the guard cannot see whether native code reaches the network or starts a process",
    "allow_network=True and allow_subprocess=True (--allow-network --allow-subprocess)",
    lambda p: p.allow_network and p.allow_subprocess,
)


def _new_socket(args: tuple[Any, ...]) -> str | None:
    """AF_UNIX sockets stay allowed (socketpair, asyncio's self-pipe); every other family is new network access."""
    family = args[1]
    if family == socket.AF_UNIX:
        return None
    if family == -1:  # no family given: AF_INET, or the family of a wrapped file descriptor
        return "a new socket of unstated family"
    try:
        return f"a new {socket.AddressFamily(family).name} socket"
    except ValueError:
        return f"a new socket of family {family}"


def _lookup(name: str) -> Describe:
    return lambda a: f"name lookup socket.{name}{a!r}"


def _to_address(name: str) -> Describe:
    """connect/bind/sendto/sendmsg (socket, address): sendmsg without an address uses a channel opened earlier."""
    return lambda a: None if a[1] is None else f"socket.{name} to {a[1]!r}"


# audit event -> (rule, describe(args) -> detail for the message, or None to let it through)
_EVENTS: dict[str, tuple[_Rule, Describe]] = {
    "socket.__new__": (_NETWORK, _new_socket),
    "socket.connect": (_NETWORK, _to_address("connect")),
    "socket.bind": (_NETWORK, _to_address("bind")),
    "socket.sendto": (_NETWORK, _to_address("sendto")),
    "socket.sendmsg": (_NETWORK, _to_address("sendmsg")),
    "socket.getaddrinfo": (_NETWORK, _lookup("getaddrinfo")),
    "socket.gethostbyname": (_NETWORK, _lookup("gethostbyname")),  # also gethostbyname_ex
    "socket.gethostbyaddr": (_NETWORK, _lookup("gethostbyaddr")),
    "socket.getnameinfo": (_NETWORK, _lookup("getnameinfo")),
    "subprocess.Popen": (_PROCESS, lambda a: f"subprocess.Popen {a[1]!r}"),
    "os.system": (_PROCESS, lambda a: f"os.system {os.fsdecode(a[0])!r}"),
    "os.exec": (_PROCESS, lambda a: f"os.exec {a[0]!r}"),
    "os.spawn": (_PROCESS, lambda a: f"os.spawn {a[1]!r}"),  # Windows; POSIX os.spawn* raise os.fork
    "os.posix_spawn": (_PROCESS, lambda a: f"os.posix_spawn {a[0]!r}"),
    "os.fork": (_PROCESS, lambda a: "os.fork"),  # also multiprocessing's fork start method
    "os.forkpty": (_PROCESS, lambda a: "os.forkpty"),
    "ctypes.dlopen": (_NATIVE, lambda a: f"ctypes.dlopen {a[0]!r}"),
    "ctypes.dlsym": (_NATIVE, lambda a: f"ctypes.dlsym {a[1]!r}"),
    "ctypes.dlsym/handle": (_NATIVE, lambda a: f"ctypes.dlsym {a[1]!r}"),
    "ctypes.call_function": (_NATIVE, lambda a: f"ctypes.call_function at {a[0]!r}"),
}

# Process starts that raise no audit event: (module, function, describe(args)).
_EVENTLESS_STARTS: tuple[tuple[str, str, Describe], ...] = (
    ("_posixsubprocess", "fork_exec", lambda a: f"_posixsubprocess.fork_exec {a[0]!r}"),
    ("subprocess", "_fork_exec", lambda a: f"_posixsubprocess.fork_exec {a[0]!r}"),  # subprocess's alias
    ("multiprocessing.util", "spawnv_passfds", lambda a: f"multiprocessing spawn {a[1]!r}"),
    ("multiprocessing.forkserver", "connect_to_new_process", lambda a: "multiprocessing forkserver"),
)


def _eventless_modules() -> dict[str, Any]:
    """The modules of :data:`_EVENTLESS_STARTS` (fixed standard-library names)."""
    import subprocess

    modules: dict[str, Any] = {"subprocess": subprocess}
    try:  # none of these exist on Windows
        import _posixsubprocess
        import multiprocessing.forkserver
        import multiprocessing.util
    except ImportError:
        return modules
    modules.update(
        {
            "_posixsubprocess": _posixsubprocess,
            "multiprocessing.util": multiprocessing.util,
            "multiprocessing.forkserver": multiprocessing.forkserver,
        }
    )
    return modules


def _refusal(rule: _Rule, describe: Describe, args: tuple[Any, ...]) -> SandboxViolation | None:
    """The violation to raise, or None when ``describe`` lets this call through."""
    try:
        detail = describe(args)
    except (IndexError, TypeError, ValueError):  # event arguments of another Python version
        detail = "arguments unknown"
    return None if detail is None else rule.violation(detail)


class _Guard:
    """Adds the audit hook once and installs the patches on first entry, removing them on last exit."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.stack: list[Permissions] = []
        self.saved: list[tuple[Any, str, Any]] = []
        self.hooked = False

    @property
    def current(self) -> Permissions | None:
        """The innermost block's permissions; None outside every block."""
        top = self.stack[-1:]  # a slice, not [-1]: another thread may close the last block meanwhile
        return top[0] if top else None

    def enter(self, permissions: Permissions) -> None:
        with self.lock:
            if not self.hooked:
                sys.addaudithook(self._audit)
                self.hooked = True
            if not self.stack:
                self._install()
            self.stack.append(permissions)

    def exit(self) -> None:
        with self.lock:
            self.stack.pop()
            if not self.stack:
                self._restore()

    def _audit(self, event: str, args: tuple[Any, ...]) -> None:
        """The audit hook: runs on every audited operation in the process, so it returns at once when idle."""
        if not self.stack or event not in _EVENTS:
            return
        permissions = self.current
        rule, describe = _EVENTS[event]
        if permissions is not None and not rule.allowed(permissions):
            violation = _refusal(rule, describe, args)
            if violation is not None:
                raise violation

    # -- patches ---------------------------------------------------------------------------
    def _install(self) -> None:
        modules = _eventless_modules()
        for module_name, name, describe in _EVENTLESS_STARTS:
            module = modules.get(module_name)
            if module is not None and callable(getattr(module, name, None)):
                self.saved.append((module, name, vars(module)[name]))
                setattr(module, name, self._guarded(getattr(module, name), describe))

    def _guarded(self, original: Callable[..., Any], describe: Describe) -> Callable[..., Any]:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            permissions = self.current
            if permissions is not None and not _PROCESS.allowed(permissions):
                violation = _refusal(_PROCESS, describe, args)
                if violation is not None:
                    raise violation
            return original(*args, **kwargs)

        return guarded

    def _restore(self) -> None:
        while self.saved:
            module, name, original = self.saved.pop()
            setattr(module, name, original)


_GUARD = _Guard()


@contextmanager
def sandboxed(allow_network: bool = False, allow_subprocess: bool = False) -> Iterator[Permissions]:
    """Within this block, network access, new processes and ctypes calls raise SandboxViolation.

    ``allow_network`` lets sockets, connections and name lookups through; ``allow_subprocess``
    lets processes start; ctypes needs both (native code could do either). Nested blocks use
    the innermost block's permissions.

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
