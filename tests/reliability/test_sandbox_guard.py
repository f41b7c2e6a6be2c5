"""The sandbox guard holds against the ways around it a security probe found.

Each test shows one way out refused inside ``sandboxed()``, working outside it, and
working inside it when the matching ``allow_*`` flag is set.
"""

from __future__ import annotations

import _ctypes
import _posixsubprocess
import _socket
import contextlib
import ctypes
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.util
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

from model_forensics import SandboxReplayer, SandboxViolation
from model_forensics.replay import sandboxed

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the probes use Linux libc and fork_exec")

LIBC = "libc.so.6"


def network(detail: str = "") -> str:
    """The refusal message for a network operation; ``detail`` is a regex for what was tried."""
    return rf"open a network connection \({detail}.*allow_network=True \(--allow-network\)"


def process(detail: str = "") -> str:
    return rf"start a process \({detail}.*allow_subprocess=True \(--allow-subprocess\)"


def native(detail: str = "") -> str:
    return rf"native code through ctypes \({detail}.*allow_network=True and allow_subprocess=True"


@contextlib.contextmanager
def tcp_server() -> Iterator[tuple[str, int]]:
    """A TCP server listening on 127.0.0.1 (connections wait in the backlog); closed on exit."""
    server = socket.socket()
    server.settimeout(5)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    try:
        yield server.getsockname()
    finally:
        server.close()


@contextlib.contextmanager
def udp_receiver() -> Iterator[socket.socket]:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.settimeout(5)
    receiver.bind(("127.0.0.1", 0))
    try:
        yield receiver
    finally:
        receiver.close()


def fork_exec_true() -> int:
    """Start /bin/true through _posixsubprocess.fork_exec as multiprocessing does (CPython 3.11 signature); its exit code."""
    errpipe_read, errpipe_write = os.pipe()
    try:
        pid = _posixsubprocess.fork_exec(
            ["true"], [b"/bin/true"], True, (), None, None, -1, -1, -1, -1, -1, -1,
            errpipe_read, errpipe_write, False, False, -1, None, None, None, -1, None, subprocess._USE_VFORK,
        )  # fmt: skip
    finally:
        os.close(errpipe_read)
        os.close(errpipe_write)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def start_process(method: str) -> int:
    """Start a multiprocessing child with ``method`` and wait for it; its exit code."""
    process = multiprocessing.get_context(method).Process(target=os.getpid)
    process.start()
    process.join(timeout=60)
    return process.exitcode


def test_udp_datagrams_are_refused():
    with udp_receiver() as receiver:
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # opened before the block
        address = receiver.getsockname()
        try:
            with sandboxed():
                with pytest.raises(SandboxViolation, match=network(r"socket.sendto to \('127.0.0.1'")):
                    sender.sendto(b"inside", address)
                with pytest.raises(SandboxViolation, match=network(r"socket.sendmsg to \('127.0.0.1'")):
                    sender.sendmsg([b"inside"], [], 0, address)
            sender.sendto(b"outside", address)
            assert receiver.recv(64) == b"outside"
            with sandboxed(allow_network=True):
                sender.sendmsg([b"allowed"], [], 0, address)
            assert receiver.recv(64) == b"allowed"
        finally:
            sender.close()


LOOKUPS: dict[str, Callable[[], object]] = {
    "getaddrinfo": lambda: socket.getaddrinfo("localhost", 80),
    "gethostbyname": lambda: socket.gethostbyname("localhost"),
    "gethostbyname_ex": lambda: socket.gethostbyname_ex("localhost"),
    "gethostbyaddr": lambda: socket.gethostbyaddr("127.0.0.1"),
    "getnameinfo": lambda: socket.getnameinfo(("127.0.0.1", 80), socket.NI_NUMERICHOST | socket.NI_NUMERICSERV),
}


@pytest.mark.parametrize("name", list(LOOKUPS))
def test_name_lookups_are_refused(name):
    lookup = LOOKUPS[name]
    with (
        sandboxed(),
        pytest.raises(SandboxViolation, match=network(f"name lookup socket.{name.removesuffix('_ex')}")),
    ):
        lookup()
    with contextlib.suppress(OSError):  # a host without a 127.0.0.1 entry may not resolve it; that is not the guard
        lookup()
    with sandboxed(allow_network=True), contextlib.suppress(OSError):
        lookup()


def test_the_c_socket_type_cannot_connect_around_the_guard():
    with tcp_server() as address:
        client = socket.socket()  # opened before the block, so only the connect itself is refused
        try:
            with sandboxed():
                with pytest.raises(
                    SandboxViolation, match=network(rf"socket.connect to \('127.0.0.1', {address[1]}\)")
                ):
                    _socket.socket.connect(client, address)
                with pytest.raises(SandboxViolation, match=network()):
                    _socket.socket.connect_ex(client, address)
            _socket.socket.connect(client, address)
            assert client.getpeername() == address
        finally:
            client.close()


def test_new_network_sockets_are_refused_but_unix_socket_pairs_are_not():
    with sandboxed():
        for family in (socket.AF_INET, socket.AF_INET6):
            with pytest.raises(SandboxViolation, match=network(f"a new {family.name} socket")):
                socket.socket(family, socket.SOCK_DGRAM)
        with pytest.raises(SandboxViolation, match=network(r"a new socket of unstated family")):
            _socket.socket()
        left, right = socket.socketpair()  # AF_UNIX: in-process plumbing (asyncio, multiprocessing pipes)
        left.sendall(b"x")
        assert right.recv(1) == b"x"
        left.close(), right.close()
    with sandboxed(allow_network=True):
        socket.socket(socket.AF_INET6).close()
    socket.socket().close()


def test_bind_is_refused():
    unbound = socket.socket()
    try:
        with sandboxed(), pytest.raises(SandboxViolation, match=network(r"socket.bind to ")):
            unbound.bind(("127.0.0.1", 0))
        unbound.bind(("127.0.0.1", 0))
    finally:
        unbound.close()


def test_ctypes_cannot_load_or_look_up_native_code():
    libc = ctypes.CDLL(LIBC)  # loaded before the block: its functions are looked up on first use
    handle = _ctypes.dlopen(LIBC)
    address = _ctypes.dlsym(handle, "getpid")
    with sandboxed():
        with pytest.raises(SandboxViolation, match=native(r"ctypes.dlopen None")):
            ctypes.CDLL(None)
        with pytest.raises(SandboxViolation, match=f"ctypes.dlopen '{LIBC}'"):
            ctypes.CDLL(LIBC).system  # noqa: B018
        with pytest.raises(SandboxViolation, match=native(r"ctypes.dlsym 'system'")):
            libc.system  # noqa: B018
        with pytest.raises(SandboxViolation, match="ctypes.dlsym 'connect'"):
            _ctypes.dlsym(handle, "connect")
        with pytest.raises(SandboxViolation, match=native(r"ctypes.call_function")):
            _ctypes.call_function(address, ())
    with sandboxed(allow_network=True), pytest.raises(SandboxViolation, match=native()):  # one flag is not enough
        ctypes.CDLL(None)
    assert ctypes.CDLL(None).getpid() == os.getpid()
    with sandboxed(allow_network=True, allow_subprocess=True):
        assert ctypes.CDLL(LIBC).getpid() == os.getpid()
        assert _ctypes.call_function(address, ()) == os.getpid()


def test_multiprocessing_spawn_is_refused():
    with sandboxed(), pytest.raises(SandboxViolation, match=process(r"multiprocessing spawn")):
        start_process("spawn")
    assert start_process("spawn") == 0
    with sandboxed(allow_subprocess=True):
        assert start_process("spawn") == 0


def test_multiprocessing_forkserver_is_refused_even_when_it_already_runs():
    with sandboxed(allow_network=True), pytest.raises(SandboxViolation, match=process()):
        start_process("forkserver")  # the server itself would be started by spawnv_passfds
    assert start_process("forkserver") == 0  # now the fork server runs
    with sandboxed(allow_network=True), pytest.raises(SandboxViolation, match=process(r"multiprocessing forkserver")):
        start_process("forkserver")  # a request over its Unix socket: no audit event, the patch refuses it
    with sandboxed(), pytest.raises(SandboxViolation, match=process(r"multiprocessing forkserver")):
        start_process("forkserver")
    with sandboxed(allow_network=True, allow_subprocess=True):
        assert start_process("forkserver") == 0


def test_fork_exec_called_directly_is_refused():
    with sandboxed(), pytest.raises(SandboxViolation, match=process(r"_posixsubprocess.fork_exec")):
        fork_exec_true()
    assert fork_exec_true() == 0
    with sandboxed(allow_subprocess=True):
        assert fork_exec_true() == 0


def test_the_guard_holds_in_other_threads():
    errors: list[BaseException] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo("localhost", 80)
        except BaseException as error:
            errors.append(error)

    with sandboxed():
        thread = threading.Thread(target=lookup)
        thread.start()
        thread.join(timeout=10)
    assert len(errors) == 1 and isinstance(errors[0], SandboxViolation)


def test_everything_works_again_after_the_block():
    originals = (
        _posixsubprocess.fork_exec,
        multiprocessing.util.spawnv_passfds,
        multiprocessing.forkserver.connect_to_new_process,
    )
    with tcp_server() as address:
        with sandboxed(), pytest.raises(SandboxViolation):
            socket.create_connection(address, timeout=5)
        with pytest.raises(ZeroDivisionError), sandboxed():  # an error inside the block restores too
            1 / 0  # noqa: B018
        socket.create_connection(address, timeout=5).close()
    assert socket.getaddrinfo("localhost", 80)
    assert ctypes.CDLL(None).getpid() == os.getpid()
    assert subprocess.run([sys.executable, "-c", "pass"], check=False).returncode == 0
    assert os.system("true") == 0
    after = (
        _posixsubprocess.fork_exec,
        multiprocessing.util.spawnv_passfds,
        multiprocessing.forkserver.connect_to_new_process,
    )
    assert after == originals
    assert fork_exec_true() == 0


def test_a_replay_loads_and_verifies_under_the_full_guard(pristine):
    with sandboxed():  # model loading (transformers, safetensors) and the replay itself, with ctypes refused
        report = SandboxReplayer().load_bundle(pristine["generate"]).verify()
    assert report.bit_identical, report.summary()
