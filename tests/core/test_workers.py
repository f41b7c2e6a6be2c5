"""Worker processes the package starts (spawn pool, isolated replay, fork server) see
OMP_WAIT_POLICY=PASSIVE unless the user set the variable; this process's environment is
left as it was."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from model_forensics.core.workers import worker_env, worker_environment


def test_worker_env_adds_passive_and_keeps_the_users_setting() -> None:
    assert worker_env({"HOME": "/h"}) == {"HOME": "/h", "OMP_WAIT_POLICY": "PASSIVE"}
    assert worker_env({"OMP_WAIT_POLICY": "ACTIVE"})["OMP_WAIT_POLICY"] == "ACTIVE"


def test_worker_environment_is_undone_on_leaving(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    with pytest.raises(RuntimeError), worker_environment():
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
        raise RuntimeError("boom")
    assert "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    with worker_environment():
        assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


@pytest.mark.parametrize("user", [None, "ACTIVE"])
def test_analysis_pool_workers_start_passive_unless_set(user: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    from model_forensics.rca import pipeline

    if user is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", user)
    # The real spawn pool of analyze/batch; each "job" asks the worker for its variable.
    monkeypatch.setattr(pipeline, "_work", os.getenv)
    seen: list[str | None] = []
    pipeline._run(["OMP_WAIT_POLICY"] * 2, workers=2, ray=None, finished=lambda job, value: seen.append(value))
    assert seen == [user or "PASSIVE"] * 2
    assert os.environ.get("OMP_WAIT_POLICY") == user


@pytest.mark.parametrize("user", [None, "ACTIVE"])
def test_isolated_replay_starts_passive_unless_set(user: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    from model_forensics.replay import isolation

    problem = isolation.isolation_problem()
    if problem is not None:
        pytest.skip(problem)
    prefix = isolation.namespace_prefix()
    check = "import os, sys; sys.exit(40 + ['PASSIVE', 'ACTIVE'].index(os.environ['OMP_WAIT_POLICY']))"
    monkeypatch.setattr(isolation, "isolated_command", lambda argv: [*prefix, sys.executable, "-c", check])
    if user is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", user)
    assert isolation.run_isolated(["replay", "incident"]) == (40 if user is None else 41)


# The fork server is one per process, so each case runs in a fresh interpreter.
FORK_SERVER = """
import os
from model_forensics.server import jobs
jobs.PRELOAD = []  # what is tested is the fork server's environment, not its imports
context = jobs.process_context()
with context.Pool(1) as pool:
    print(pool.apply(os.getenv, ("OMP_WAIT_POLICY",)), os.getenv("OMP_WAIT_POLICY"))
"""


@pytest.mark.parametrize("user", [None, "ACTIVE"])
def test_server_children_start_passive_unless_set(user: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if user is not None:
        env["OMP_WAIT_POLICY"] = user
    done = subprocess.run([sys.executable, "-c", FORK_SERVER], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    child, parent = done.stdout.split()
    assert child == (user or "PASSIVE")
    assert parent == str(user)  # the server's own environment is left as it was
