"""The sandbox: recorded calls are served from the log; network and processes are blocked."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from replay_models import PROMPT

from model_forensics import RecorderHooks, ReplayDivergence, SandboxReplayer, SandboxViolation
from model_forensics.recorder.session import encode_prompt
from model_forensics.replay import sandboxed


@pytest.fixture(scope="module")
def tool_bundle(lms, tmp_path_factory):
    """An incident whose run called an external tool once (logged to calls.jsonl)."""
    loaded = lms["llama"]
    recorder = RecorderHooks(sketch="full")
    calls = {"n": 0}

    @recorder.record_call("lookup")
    def lookup(user: int) -> dict:
        calls["n"] += 1
        return {"user": user, "name": "alice"}

    with recorder.install_hooks(loaded.model, loaded.tokenizer), torch.no_grad():
        assert lookup(42) == {"user": 42, "name": "alice"}
        loaded.model(**encode_prompt(loaded, PROMPT))
        path = recorder.create_bundle(tmp_path_factory.mktemp("tool") / "incident")
    return path, lookup, calls


def test_recorded_calls_are_served_in_order_without_running(tool_bundle, lms):
    path, lookup, calls = tool_bundle
    session = SandboxReplayer().load_bundle(path, model=lms["llama"])
    before = calls["n"]
    with session.environment() as server:
        assert lookup(42) == {"user": 42, "name": "alice"}
        assert server.position == 1
    assert calls["n"] == before  # the real function never ran
    with session.environment(), pytest.raises(ReplayDivergence, match="'lookup' with args .*43"):
        lookup(43)


def test_network_and_processes_are_blocked_during_replay(tool_bundle, lms):
    session = SandboxReplayer().load_bundle(tool_bundle[0], model=lms["llama"])
    with session.environment():
        with pytest.raises(SandboxViolation, match="network connection.*allow_network=True"):
            socket.create_connection(("127.0.0.1", 9), timeout=1)
        with pytest.raises(SandboxViolation, match="network"):
            socket.socket().connect(("127.0.0.1", 9))
        with pytest.raises(SandboxViolation, match="start a process"):
            subprocess.run([sys.executable, "-c", "pass"], check=False)
        with pytest.raises(SandboxViolation, match="os.system"):
            os.system("true")


def test_a_model_that_phones_home_fails_its_replay(tool_bundle, lms):
    session = SandboxReplayer().load_bundle(tool_bundle[0], model=lms["llama"])
    model = lms["llama"].model

    def phone_home(module, args, output):
        socket.create_connection(("127.0.0.1", 9), timeout=1)

    handle = model.model.layers[0].register_forward_hook(phone_home)
    try:
        with pytest.raises(SandboxViolation):
            session.run()
    finally:
        handle.remove()


def test_allow_flags_and_restoration():
    original = socket.socket.connect
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        with sandboxed(allow_network=True, allow_subprocess=True):
            socket.create_connection(server.getsockname(), timeout=5).close()
            assert subprocess.run([sys.executable, "-c", "pass"], check=False).returncode == 0
            with sandboxed(), pytest.raises(SandboxViolation):  # the innermost block decides
                socket.create_connection(server.getsockname(), timeout=5)
    finally:
        server.close()
    assert socket.socket.connect is original
    assert "connect" not in vars(socket.socket)
    assert subprocess.run([sys.executable, "-c", "pass"], check=False).returncode == 0


def test_replayer_config_allows_network(tool_bundle, lms):
    session = SandboxReplayer(allow_network=True).load_bundle(tool_bundle[0], model=lms["llama"])
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        with session.environment():
            socket.create_connection(server.getsockname(), timeout=5).close()
            with pytest.raises(SandboxViolation):
                os.system("true")
    finally:
        server.close()
