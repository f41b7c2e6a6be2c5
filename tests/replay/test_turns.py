"""Conversation bundles: recorded turn by turn, replayed turn by turn bit for bit (also in
another process), and a fix aimed at one turn's positions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from model_forensics import SandboxReplayer
from model_forensics.core.bundle import Bundle
from model_forensics.core.errors import BundleError, ForensicsError
from model_forensics.core.predicates import contains
from model_forensics.models import zoo
from model_forensics.recorder.conversation import ConversationRecord, conversation_of, record_conversation
from model_forensics.recorder.hooks import RecorderHooks
from model_forensics.recorder.session import record_prompt
from model_forensics.replay.interventions import Intervention
from model_forensics.replay.turns import at_turn, replay_turns, source_turns, turn_effects, turns_needed

NAME = "multiturn-false-fact"
pytestmark = pytest.mark.skipif(NAME not in zoo.names(), reason="the zoo's trained weights are not shipped")
MESSAGES = ["user: hello . bot:", "user: sky is purple . bot:", "user: what is sky ? bot:"]
MOVER, COPIER = "blocks.0.attn.head.1", "blocks.1.attn.head.2"


@pytest.fixture(scope="module")
def loaded():  # type: ignore[no-untyped-def]
    return zoo.load(NAME)


@pytest.fixture(scope="module")
def incident(loaded, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    recorder = RecorderHooks(granularity="all", sketch="full")

    def look_up(k: int, reply: str, rec: RecorderHooks) -> None:
        rec.record_call("memory.lookup")(lambda turn, text: {"turn": turn, "seen": text})(k, reply)

    path = tmp_path_factory.mktemp("conversation") / "incident"
    return record_conversation(
        loaded, MESSAGES, path, recorder=recorder, max_new_tokens=2, predicate=contains("purple"), between=look_up
    )


def test_bundle_holds_every_turn_with_its_span_reply_and_calls(incident: Path) -> None:
    bundle = Bundle.open(incident)
    conversation = conversation_of(bundle.manifest)
    assert [t.reply for t in conversation.turns] == ["hi", "ok", "purple"]
    assert conversation.turns[0].span[0] == 0
    for before, after in zip(conversation.turns, conversation.turns[1:], strict=False):
        assert after.span[0] == before.reply_span[1]  # turns follow one another on the token axis
    assert bundle.inputs["input_ids"].shape[1] == conversation.turns[-1].span[1]  # the last turn's context
    assert [t.calls for t in conversation.turns] == [(0,), (1,), ()]
    assert [c["args"]["args"][0] for c in bundle.calls()] == [0, 1]
    assert ConversationRecord.from_json(json.loads(json.dumps(conversation.to_json()))) == conversation
    assert bundle.manifest["predicate"]["holds"] is True


def test_turns_replay_bit_identically(incident: Path) -> None:
    session = SandboxReplayer().load_bundle(incident)
    report = replay_turns(session)
    assert report.bit_identical, report.summary()
    assert len(replay_turns(session, upto=1).turns) == 2
    assert session.verify().bit_identical


def test_turn_by_turn_replay_is_bit_identical_in_another_process(incident: Path) -> None:
    script = (
        "import json, sys\n"
        "from model_forensics import SandboxReplayer\n"
        "from model_forensics.replay.turns import replay_turns\n"
        "report = replay_turns(SandboxReplayer().load_bundle(sys.argv[1]))\n"
        "print(json.dumps({'digests': report.digests, 'bit_identical': report.bit_identical}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(incident)], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    elsewhere = json.loads(out.stdout.strip().splitlines()[-1])
    recorded = [t.logits_sha256 for t in conversation_of(Bundle.open(incident).manifest).turns]
    assert elsewhere == {"digests": recorded, "bit_identical": True}


CLEAN = "prompt:user: hello . bot: hi <eos> user: sky is blue . bot: ok <eos> user: what is sky ? bot:"


def test_a_fix_at_one_turn_changes_only_that_turn_and_later_ones(incident: Path) -> None:
    session = SandboxReplayer().load_bundle(incident)
    turns = conversation_of(session.manifest).turns
    heads = [Intervention(MOVER, "zero"), Intervention(COPIER, "zero")]
    fixed = replay_turns(session, interventions=at_turn(heads, turns[2]))
    assert fixed.turns[0].bit_identical and fixed.turns[1].bit_identical  # before the fix's positions
    assert fixed.turns[2].reply == "blue" and fixed.turns[2].failed is False
    everywhere = replay_turns(session, interventions=heads)
    assert everywhere.turns[2].reply == "blue"
    assert at_turn(heads, turns[2])[0].positions == turns[2].positions


def test_the_planted_turn_and_the_turn_the_heads_act_in_are_found(incident: Path) -> None:
    session = SandboxReplayer().load_bundle(incident)
    assert turns_needed(source_turns(session, CLEAN)) == [1]  # the turn that planted the fact
    effects = turn_effects(session, [Intervention(MOVER, "zero"), Intervention(COPIER, "zero")])
    assert turns_needed(effects) == [2]  # the heads act at the question
    assert effects[0].failed is True


def test_single_prompt_bundle_and_bad_turn_are_refused(loaded, incident: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    single = record_prompt(loaded, MESSAGES[-1], tmp_path / "single", max_new_tokens=1)
    with pytest.raises(BundleError, match="holds one prompt, not a conversation"):
        replay_turns(SandboxReplayer().load_bundle(single))
    with pytest.raises(ForensicsError, match="turn 5 does not exist"):
        replay_turns(SandboxReplayer().load_bundle(incident), upto=5)
    with pytest.raises(ForensicsError, match="at least one message"):
        record_conversation(loaded, [], tmp_path / "empty")
