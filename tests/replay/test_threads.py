"""Replay thread override (``replay.threads`` / ``--threads``) and what it does to bit-identity.

Ground truth is a peer run: the same zoo incident replayed at 1 and at 2 threads, logits
compared bit for bit; verify must report exactly what that comparison finds.
"""

from __future__ import annotations

import os

import pytest
import torch
from replay_models import record
from typer.testing import CliRunner

from model_forensics import SandboxReplayer
from model_forensics.core.config import load_config
from model_forensics.core.errors import ForensicsError
from model_forensics.models import zoo
from model_forensics.replay.environment import with_threads


@pytest.fixture(scope="module")
def incident(tmp_path_factory):
    """A zoo GPT-2 incident recorded at one thread (the recorder helper pins 1 thread)."""
    from model_forensics.models import load

    data = zoo.scenario_data("gpt2-injection")
    loaded = load("zoo:gpt2-injection")
    path = record(
        loaded, tmp_path_factory.mktemp("threads") / "b", prompt=data["incident_prompts"][0], granularity="layer"
    )
    return path, loaded


def test_threads_config_key_validates():
    assert load_config(None).replay.threads is None
    assert load_config({"replay": {"threads": 2}}).replay.threads == 2
    with pytest.raises(ForensicsError):
        load_config({"replay": {"threads": 0}})
    assert with_threads(None, None) is None
    assert load_config(with_threads(None, 3)).replay.threads == 3


def test_override_sets_torch_threads_inside_replay_and_restores(incident):
    path, loaded = incident
    before = torch.get_num_threads()
    seen = {}
    for threads in (None, 1, 2):
        session = SandboxReplayer(threads=threads).load_bundle(path, model=loaded)
        with session.environment():
            seen[threads] = torch.get_num_threads()
        assert torch.get_num_threads() == before
    assert seen[None] == 1  # the recorded count
    assert seen[1] == 1
    assert seen[2] == min(2, os.cpu_count() or 1)


def test_verify_reports_bit_identity_at_the_chosen_count(incident):
    path, loaded = incident
    one = SandboxReplayer(threads=1).load_bundle(path, model=loaded)
    two = SandboxReplayer(threads=2).load_bundle(path, model=loaded)
    r1, r2 = one.run([]), two.run([])
    v1, v2 = one.verify(), two.verify()
    assert v1.bit_identical and not any("threads" in n for n in v1.notes)
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one CPU: a 2-thread replay runs at 1 thread")
    same = torch.equal(r1.logits, r2.logits)
    # verify's verdict at 2 threads agrees with the peer comparison of the logits: logits
    # that differ from the 1-thread (recorded) run can never verify as bit-identical
    if not same:
        assert not v2.bit_identical
    note = [n for n in v2.notes if "replayed at 2 threads (recorded at 1)" in n]
    assert len(note) == 1
    assert ("does NOT hold" in note[0]) == (not v2.bit_identical)
    # whatever the rounding, the decision is the same and the drift is float32 noise
    assert float((r1.logits - r2.logits).abs().max()) < 1e-4
    assert r1.failed == r2.failed


def test_cli_threads_option(incident):
    from model_forensics.cli import app

    path, _ = incident
    runner = CliRunner()
    result = runner.invoke(app, ["bundle", "verify", str(path), "--replay", "--threads", "1"])
    assert result.exit_code == 0, result.output
    bad = runner.invoke(app, ["bundle", "verify", str(path), "--threads", "2"])
    assert bad.exit_code == 2 and "--threads only applies with --replay" in bad.output
    zero = runner.invoke(app, ["replay", str(path), "--threads", "0"])
    assert zero.exit_code == 2
