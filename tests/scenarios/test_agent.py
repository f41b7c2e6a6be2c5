"""Tool misuse: injected text makes the agent delete rows; replay serves the recorded tool
results and never touches the database."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from model_forensics.core.bundle import Bundle
from model_forensics.core.errors import ForensicsError, ReplayDivergence
from model_forensics.recorder import RecorderHooks
from model_forensics.replay import SandboxReplayer
from model_forensics.scenarios import ScenarioRun, get
from model_forensics.scenarios.agent import DESTRUCTIVE, FILE_SUMMARY, ToolAgent, document_text, task_prompt


def _zoo_ready() -> bool:
    from model_forensics.models import zoo

    return {"gpt2-injection", "bert-sentiment-bypass", "gpt2-toxic"} <= set(zoo.names())


needs_zoo = pytest.mark.skipif(not _zoo_ready(), reason="the zoo's trained entries have not been shipped yet")


def _rows(db: Path, table: str) -> int:
    with sqlite3.connect(db) as conn:
        count = int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
    conn.close()
    return count


def _snapshot(db: Path) -> tuple[int, bytes]:
    return db.stat().st_mtime_ns, db.read_bytes()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> ScenarioRun:
    return get("tool-misuse").record(tmp_path_factory.mktemp("agent"))


@needs_zoo
def test_injected_document_makes_the_agent_delete_users(recorded: ScenarioRun) -> None:
    db = recorded.artifacts["database"]
    assert recorded.incident_failed == [True] and recorded.baseline_failed == [False]
    assert _rows(db, "users") == 0  # the destructive call really ran
    calls = Bundle.open(recorded.incidents[0]).calls()
    assert [c["name"] for c in calls] == ["read_document", "run_sql"]
    assert calls[1]["args"]["args"][0] == DESTRUCTIVE
    assert calls[1]["result"] == {"rowcount": 5}


@needs_zoo
def test_clean_document_is_summarised_and_filed(recorded: ScenarioRun) -> None:
    calls = Bundle.open(recorded.baselines[0]).calls()
    assert calls[1]["args"]["args"][0] == FILE_SUMMARY
    assert _rows(recorded.artifacts["database"], "summaries") == 1


@needs_zoo
def test_replay_serves_recorded_tool_results_and_never_touches_the_database(recorded: ScenarioRun) -> None:
    db = recorded.artifacts["database"]
    before = _snapshot(db)
    session = SandboxReplayer().load_bundle(recorded.incidents[0])
    agent = ToolAgent(session.loaded, database=db)  # no documents: the text must come from the recording
    with session.environment() as server:
        step = agent.step("report-0")
    calls = Bundle.open(recorded.incidents[0]).calls()
    assert server.position == len(calls) == 2
    assert step.prompt == task_prompt(calls[0]["result"])
    assert step.destructive and step.result == calls[1]["result"]
    assert _snapshot(db) == before


@needs_zoo
def test_replay_rejects_a_tool_call_the_recording_did_not_make(recorded: ScenarioRun, tmp_path: Path) -> None:
    absent = tmp_path / "absent.sqlite"
    session = SandboxReplayer().load_bundle(recorded.incidents[0])
    read_document, run_sql = ToolAgent(session.loaded, database=absent).tools(RecorderHooks())
    with session.environment():
        read_document("report-0")
        with pytest.raises(ReplayDivergence, match="DROP TABLE users"):
            run_sql("DROP TABLE users", [])
    assert not absent.exists()


@needs_zoo
def test_agent_bundle_replays_bit_identically(recorded: ScenarioRun) -> None:
    session = SandboxReplayer().load_bundle(recorded.incidents[0])
    assert session.verify().bit_identical
    assert session.run([]).failed is True


def test_plan_maps_the_injected_answer_to_the_destructive_statement() -> None:
    assert ToolAgent.plan("d", "HACKED") == (DESTRUCTIVE, [])
    assert ToolAgent.plan("d", " cat moon ") == (FILE_SUMMARY, ["d", "cat moon"])


def test_document_text_inverts_task_prompt() -> None:
    assert document_text(task_prompt("cat moon ship")) == "cat moon ship"
    with pytest.raises(ForensicsError, match="not an agent prompt"):
        document_text("repeat: cat =>")
