"""Provenance is read once per process (package versions) and once per repository state (the
git commit): a second bundle costs no git run, and a new commit is still seen at once."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_forensics import Bundle, RecorderHooks
from model_forensics.core import provenance

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command")
_RUN = subprocess.run  # the tests' own git commands, not counted below


def _git(repo: Path, *args: str) -> str:
    done = _RUN(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "commit", "-q", "--allow-empty", "-m", "first")
    return tmp_path


@pytest.fixture()
def git_runs(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    runs: list[list[str]] = []

    def counting(args, *rest, **kwargs):  # type: ignore[no-untyped-def]
        runs.append(list(args))
        return _RUN(args, *rest, **kwargs)

    monkeypatch.setattr(provenance.subprocess, "run", counting)
    return runs


def test_the_commit_is_remembered_until_head_moves(repo: Path, git_runs: list[list[str]]) -> None:
    first = _git(repo, "rev-parse", "HEAD")
    assert provenance.git_commit(repo) == first
    assert provenance.git_commit(repo) == first
    assert len(git_runs) == 1  # the second call ran no git
    _git(repo, "commit", "-q", "--allow-empty", "-m", "second")
    second = _git(repo, "rev-parse", "HEAD")
    assert provenance.git_commit(repo) == second  # a new commit is seen at once
    _git(repo, "checkout", "-q", "--detach", first)
    assert provenance.git_commit(repo) == first  # and so is a checkout
    assert len(git_runs) == 3


def test_a_fresh_process_reads_the_commit_itself(repo: Path) -> None:
    provenance.git_commit(repo)  # remembered here, and nowhere else
    _git(repo, "commit", "-q", "--allow-empty", "-m", "second")
    code = "import sys; from model_forensics.core.provenance import git_commit; print(git_commit(sys.argv[1]))"
    done = _RUN([sys.executable, "-c", code, str(repo)], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == _git(repo, "rev-parse", "HEAD")


def test_two_bundles_of_one_recorder_carry_the_same_provenance(
    tiny, tmp_path: Path, repo: Path, git_runs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(repo)  # a plain .git directory (a worktree's .git file runs git every time)
    loaded = tiny["gpt2"]
    with RecorderHooks(granularity="layer").install_hooks(loaded.model) as rec, torch.no_grad():
        loaded.model(input_ids=torch.tensor([[1, 2, 3]]))
        first = Bundle.open(rec.create_bundle(tmp_path / "a"))
        runs = len(git_runs)
        second = Bundle.open(rec.create_bundle(tmp_path / "b"))
    assert second.manifest["provenance"] == first.manifest["provenance"]
    assert second.cube()["provenance"] == first.cube()["provenance"]
    assert len(git_runs) == runs  # the second bundle ran no git
