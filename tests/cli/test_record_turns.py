"""record --turns: a conversation recorded from the CLI, replayed turn by turn by `replay`
and `bundle verify --replay`; the conversation section is checked when the bundle is read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from model_forensics.core.bundle import Bundle
from model_forensics.core.conversation import ConversationRecord, check_conversation
from model_forensics.core.errors import BundleError
from model_forensics.models import zoo

NAME = "multiturn-false-fact"
pytestmark = pytest.mark.skipif(NAME not in zoo.names(), reason="the zoo's trained weights are not shipped")
MESSAGES = ["user: hello . bot:", "user: sky is purple . bot:", "user: what is sky ? bot:"]
runner = CliRunner()


def _app() -> Any:
    from model_forensics.cli import app

    return app


def _record(tmp: Path, turns: Path, *extra: str) -> Any:
    args = ["record", "-m", f"zoo:{NAME}", "--turns", str(turns), "--max-new-tokens", "2", "-o", str(tmp / "b")]
    return runner.invoke(_app(), [*args, "--predicate", "contains:purple", *extra])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("turns")
    (tmp / "turns.txt").write_text("\n".join(MESSAGES) + "\n")
    res = _record(tmp, tmp / "turns.txt")
    assert res.exit_code == 0, res.output
    return tmp / "b"


def test_record_turns_writes_a_conversation_bundle(bundle: Path) -> None:
    conversation = check_conversation(Bundle.open(bundle).manifest)
    assert conversation is not None
    assert [t.message for t in conversation.turns] == MESSAGES
    assert [t.reply for t in conversation.turns] == ["hi", "ok", "purple"]
    assert Bundle.open(bundle).manifest["predicate"]["holds"] is True


def test_jsonl_turns_record_the_same_conversation(bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "turns.jsonl").write_text("\n".join(json.dumps(m) for m in MESSAGES))
    assert _record(tmp_path, tmp_path / "turns.jsonl").exit_code == 0
    mine, theirs = (check_conversation(Bundle.open(p).manifest) for p in (tmp_path / "b", bundle))
    assert mine == theirs


def test_replay_and_verify_report_every_turn(bundle: Path) -> None:
    res = runner.invoke(_app(), ["replay", str(bundle), "--json"])
    assert res.exit_code == 0, res.output
    turns = json.loads(res.stdout)["turns"]
    assert turns["bit_identical"] is True and [t["reply"] for t in turns["turns"]] == ["hi", "ok", "purple"]
    fixed = runner.invoke(_app(), ["replay", str(bundle), "--json", "-i", "blocks.0.attn.head.1:zero"])
    changed = json.loads(fixed.stdout)["turns"]["turns"]
    assert changed[2]["reply"] != "purple" and not changed[2]["bit_identical"]
    res = runner.invoke(_app(), ["bundle", "verify", str(bundle), "--replay"])
    assert res.exit_code == 0, res.output
    assert "turn 2: bit-identical" in res.output and "all 3 turns replay bit-identically" in res.output


@pytest.mark.parametrize(
    ("extra", "content", "message"),
    [
        (["-p", "hello"], "a\n", "drop --prompt"),
        (["--benign", "x.txt"], "a\n", "drop --benign"),
        ([], "\n \n", "holds no prompts"),
        ([], '{"prompt": "user: hi . bot:", "k": 1}\n', "a turn is one message"),
    ],
)
def test_bad_turns_input_exits_2_in_one_line(tmp_path: Path, extra: list[str], content: str, message: str) -> None:
    turns = tmp_path / ("turns.jsonl" if content.startswith("{") else "turns.txt")
    turns.write_text(content)
    res = _record(tmp_path, turns, *extra)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    zero = runner.invoke(_app(), ["record", "-m", f"zoo:{NAME}", "--turns", str(turns), "-o", str(tmp_path / "c")])
    assert zero.exit_code == 2 and "--max-new-tokens" in zero.output


def _tampered(bundle: Path, tmp: Path, edit: Any) -> Path:
    """A copy of ``bundle`` whose conversation ``edit`` changed (the manifest only: the
    reader checks the conversation before any checksum)."""
    copy = tmp / "tampered"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest["extras"]["conversation"]["turns"])
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def _set(turn: int, key: str, value: Any) -> Any:
    return lambda turns: turns[turn].__setitem__(key, value)


def _shift(turn: int, by: int, start: bool = False) -> Any:
    """Move turn ``turn``'s message end (and its reply) by ``by`` tokens; ``start``: its start too."""

    def edit(turns: list[dict[str, Any]]) -> None:
        t = turns[turn]
        t["span"] = [t["span"][0] + by * start, t["span"][1] + by]
        t["reply_span"] = [t["reply_span"][0] + by, t["reply_span"][1] + by]

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_shift(1, -1, start=True), "does not follow turn 0"),  # overlaps turn 0's reply
        (_set(0, "span", [0, "7"]), "not an integer"),
        (_set(0, "span", [0, 7.0]), "not an integer"),
        (_set(0, "span", [-1, 7]), "negative position"),
        (_set(0, "reply_ids", [1]), "reply_ids 1"),
        (_shift(2, 3), "spans out of range"),  # past the recorded input
        (_set(1, "index", True), "not an integer"),
        (lambda turns: turns.pop(), "spans out of range"),  # the last message no longer ends the input
        (_set(0, "logits_sha256", "x"), "not a sha256"),
    ],
)
def test_a_hostile_conversation_is_refused_when_the_bundle_is_read(
    bundle: Path, tmp_path: Path, edit: Any, message: str
) -> None:
    with pytest.raises(BundleError, match=message):
        Bundle.open(_tampered(bundle, tmp_path, edit), verify=False)


def test_a_bundle_without_a_conversation_reads_as_before(bundle: Path) -> None:
    manifest = dict(Bundle.open(bundle).manifest)
    manifest["extras"] = {k: v for k, v in manifest["extras"].items() if k != "conversation"}
    assert check_conversation(manifest) is None
    record = check_conversation(Bundle.open(bundle).manifest)
    assert record is not None and ConversationRecord.from_json(record.to_json()) == record
