"""Isolated runs: in a fresh network namespace even native code cannot connect, and models still run.

The children here run without the Python sandbox guard, so only the namespace stands
between them and a TCP server the test starts on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence

import pytest

from model_forensics import ForensicsError, SandboxViolation
from model_forensics.replay import isolation
from model_forensics.replay.isolation import isolated_command, isolation_problem, namespace_prefix, run_isolated

# Connect to HOST PORT twice: through libc's socket(2)/connect(2) via ctypes and through the
# socket module. Prints {"libc": errno, "socket": errno}, 0 meaning connected.
CONNECT = """
import ctypes, json, socket, struct, sys
host, port = sys.argv[1], int(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
sockaddr_in = struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(host) + bytes(8)
native = 0 if libc.connect(fd, sockaddr_in, len(sockaddr_in)) == 0 else ctypes.get_errno()
libc.close(fd)
try:
    socket.create_connection((host, port), timeout=5).close()
    plain = 0
except OSError as error:
    plain = error.errno
print(json.dumps({"libc": native, "socket": plain}))
"""

# A tiny random GPT-2, one forward pass; prints the sha256 of the logits (1, 16, 50).
FORWARD = """
import hashlib, torch
from transformers import GPT2Config, GPT2LMHeadModel
torch.manual_seed(0)
torch.set_num_threads(1)
model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=64)).eval()
with torch.no_grad():
    logits = model(torch.arange(16).reshape(1, 16) * 3 % 50).logits
print(hashlib.sha256(logits.numpy().tobytes()).hexdigest())
"""

# Replay a bundle with the library (sandbox guard on, as always in a replay); exit 0 when bit-identical.
REPLAY = """
import sys
from model_forensics import SandboxReplayer
print(SandboxReplayer().load_bundle(sys.argv[1]).verify().summary())
"""

# A libc connect resolved before the guard opens, called inside it: the Python guard cannot see it.
EARLY_POINTER = """
import ctypes, socket, struct, sys
from model_forensics.replay import sandboxed
host, port = sys.argv[1], int(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
new_socket, connect = libc.socket, libc.connect
sockaddr_in = struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(host) + bytes(8)
with sandboxed():
    rc = connect(new_socket(socket.AF_INET, socket.SOCK_STREAM, 0), sockaddr_in, len(sockaddr_in))
print(0 if rc == 0 else ctypes.get_errno())
"""

QUIET = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


@pytest.fixture(scope="module")
def prefix() -> list[str]:
    problem = isolation_problem()
    if problem is not None:
        pytest.skip(problem)
    return namespace_prefix()


@pytest.fixture()
def server() -> Iterator[socket.socket]:
    """A TCP server on 127.0.0.1; connections wait in its backlog until accepted."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        yield listener
    finally:
        listener.close()


def python(code: str, *args: str, prefix: Sequence[str] = ()) -> subprocess.Popen[str]:
    """Start ``python -c code *args``, in the namespace when ``prefix`` is the unshare prefix."""
    return subprocess.Popen(
        [*prefix, sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=QUIET,
    )


def output(child: subprocess.Popen[str]) -> str:
    """The child's stdout, stripped, once it has exited with code 0."""
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err[-2000:]
    return out.strip()


def pending_connections(listener: socket.socket) -> int:
    """Accept and close every connection waiting in the backlog; how many there were."""
    listener.settimeout(0.2)
    count = 0
    try:
        while True:
            listener.accept()[0].close()
            count += 1
    except TimeoutError:
        return count


def test_native_and_python_connects_fail_in_the_namespace(prefix, server):
    host, port = server.getsockname()
    outside = json.loads(output(python(CONNECT, host, str(port))))
    assert outside == {"libc": 0, "socket": 0}
    assert pending_connections(server) == 2
    inside = json.loads(output(python(CONNECT, host, str(port), prefix=prefix)))
    assert inside["libc"] != 0 and inside["socket"] != 0, inside  # ENETUNREACH: the namespace has no usable interface
    assert pending_connections(server) == 0


def test_a_pointer_resolved_before_the_guard_gets_past_it_but_not_past_the_namespace(prefix, server):
    host, port = server.getsockname()
    inside, outside = python(EARLY_POINTER, host, str(port), prefix=prefix), python(EARLY_POINTER, host, str(port))
    assert output(outside) == "0"  # the documented limit of the Python guard
    assert output(inside) != "0"


def test_a_model_runs_bit_identically_in_the_namespace(prefix):
    inside, outside = python(FORWARD, prefix=prefix), python(FORWARD)
    digest = output(inside)
    assert len(digest) == 64
    assert digest == output(outside)


def test_a_bundle_replays_in_the_namespace(prefix, pristine):
    summary = output(python(REPLAY, str(pristine["forward"]), prefix=prefix))
    assert summary.startswith("bit-identical:"), summary


def test_isolated_command_runs_the_cli_module(prefix):
    assert isolated_command(["replay", "incident"]) == [
        *prefix,
        sys.executable,
        "-m",
        "model_forensics.cli",
        "replay",
        "incident",
    ]


def test_run_isolated_returns_the_exit_code_and_stays_offline(prefix, monkeypatch):
    check = "import os, socket, sys; sys.exit(41 if [n for _, n in socket.if_nameindex()] == ['lo'] and os.environ['HF_HUB_OFFLINE'] == '1' else 1)"
    monkeypatch.setattr(isolation, "isolated_command", lambda argv: [*prefix, sys.executable, "-c", check])
    assert run_isolated(["replay", "incident"]) == 41


def test_run_isolated_stops_a_run_past_its_timeout(prefix, monkeypatch):
    monkeypatch.setattr(
        isolation, "isolated_command", lambda argv: [*prefix, sys.executable, "-c", "import time; time.sleep(60)"]
    )
    with pytest.raises(ForensicsError, match="took longer than 0.5 s and was stopped; pass a larger timeout"):
        run_isolated(["replay", "incident"], timeout=0.5)


def test_without_unshare_isolation_says_what_to_do_instead(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(isolation.shutil, "which", lambda name: None)
    problem = isolation_problem()
    assert problem is not None and "\n" not in problem
    assert "unshare" in problem and "docker run --rm --network none" in problem
    with pytest.raises(SandboxViolation, match="unshare command .* not installed"):
        run_isolated(["replay", "incident"])
