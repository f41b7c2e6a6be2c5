"""Isolated replays: the CLI in a fresh Linux network namespace, where nothing can connect out.

The sandbox guard (:mod:`model_forensics.replay.sandbox`) is Python: native code, ctypes
pointers resolved before the replay and hostile Python all get past it. A network
namespace is enforced by the kernel. ``unshare --net`` gives the child a namespace of its
own whose only interface is a loopback that is down, so every ``connect(2)``/``sendto(2)``
to an IP address fails (ENETUNREACH), whoever calls it. As root the namespace is made
directly; otherwise inside a user namespace (``--user --map-root-user``), which needs
unprivileged user namespaces. ``unshare`` then execs Python itself, so signals, exit codes
and timeouts behave as for any child. (No PID namespace: its first process ignores
SIGTERM, so a replay in one could not be stopped the ordinary way.)

Files are not isolated: the child reads and writes what the user may, and Unix sockets
bound to paths (``/var/run/docker.sock``) stay reachable. For that, run the replay in a
container with no network and a read-only file system (docs/security.md).

Example::

    problem = isolation_problem()
    if problem is None:
        exit_code = run_isolated(["replay", "incident/"])
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from model_forensics.core.errors import ForensicsError, SandboxViolation
from model_forensics.core.workers import worker_env

CONTAINER_HINT = (
    "run untrusted replays in a container without a network instead "
    "(docker run --rm --network none ..., see docs/security.md)"
)
# The child reports how it sees the network: only a loopback interface means a fresh namespace.
_PROBE = "import socket, sys; sys.exit(0 if [n for _, n in socket.if_nameindex()] == ['lo'] else 3)"


def _unshare() -> list[str]:
    """``unshare --net``; unprivileged users make the namespace inside a user namespace."""
    return ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--net"]


def _probe(prefix: list[str]) -> str | None:
    """None when ``prefix`` starts a child in a fresh network namespace, else why not (one line)."""
    try:
        done = subprocess.run(
            [*prefix, sys.executable, "-S", "-c", _PROBE], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{' '.join(prefix)} could not run ({error})"
    if done.returncode == 3:
        return f"{' '.join(prefix)} started a child that still sees the host's network interfaces"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return f"{' '.join(prefix)} failed: {last}"
    return None


def _find_prefix() -> tuple[list[str] | None, str | None]:
    """The unshare prefix, or None and why isolation is unavailable."""
    if not sys.platform.startswith("linux"):
        return None, f"isolated replays need Linux network namespaces, not {sys.platform}; {CONTAINER_HINT}"
    if shutil.which("unshare") is None:
        return None, f"the unshare command (util-linux) is not installed; install util-linux or {CONTAINER_HINT}"
    prefix = _unshare()
    reason = _probe(prefix)
    if reason is not None:
        return None, f"network namespaces are not available here ({reason}); {CONTAINER_HINT}"
    return prefix, None


def isolation_problem() -> str | None:
    """None when an isolated run is possible here, else one line saying why not and what to do.

    Runs a short probe child (tens of milliseconds) in the namespace it would use.
    """
    return _find_prefix()[1]


def namespace_prefix() -> list[str]:
    """The ``unshare`` command line that runs a program in fresh namespaces.

    ``["unshare", "--net"]`` as root, ``["unshare", "--user", "--map-root-user", "--net"]``
    otherwise. Raises SandboxViolation with :func:`isolation_problem`'s message when
    isolation is unavailable.
    """
    prefix, problem = _find_prefix()
    if prefix is None:
        raise SandboxViolation(problem)
    return prefix


def isolated_command(argv: list[str]) -> list[str]:
    """The command line that runs ``python -m model_forensics.cli *argv`` with no network.

    ``argv`` is the CLI's arguments, e.g. ``["replay", "incident/"]``. Raises
    SandboxViolation when isolation is unavailable.
    """
    return [*namespace_prefix(), sys.executable, "-m", "model_forensics.cli", *argv]


def run_isolated(argv: list[str], timeout: float | None = None) -> int:
    """Run the CLI with ``argv`` in a fresh network namespace; returns its exit code.

    Standard output and error pass through. The child is told to stay offline
    (``HF_HUB_OFFLINE=1``) so that models resolve from the local cache instead of
    failing on the network, and starts in the worker environment
    (:func:`~model_forensics.core.workers.worker_env`: ``OMP_WAIT_POLICY=PASSIVE`` unless set). Raises SandboxViolation when isolation is unavailable and
    ForensicsError when the run takes longer than ``timeout`` seconds (it is killed).
    """
    command = isolated_command(argv)
    env = worker_env({**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        return subprocess.run(command, env=env, timeout=timeout, check=False).returncode
    except subprocess.TimeoutExpired:
        raise ForensicsError(
            f"the isolated run of {' '.join(argv)!r} took longer than {timeout:g} s and was stopped; "
            "pass a larger timeout"
        ) from None
