"""Analysis jobs: run to done on a zoo incident (the analysis then listed and served), cancel,
time limit, server-sent events."""

from __future__ import annotations

import json
import time

from served_ids import bundle_id


def _wait(client, job_id: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job still {job['state']}")


def test_an_analysis_job_runs_to_done_and_its_result_is_served(client, served) -> None:
    ident = bundle_id(served, "incident")
    job = client.post("/api/jobs", json={"bundle": ident, "kind": "analyze"}).json()
    assert job["state"] in ("queued", "running")
    events = []
    with client.stream("GET", f"/api/jobs/{job['id']}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert events[-1]["state"] == "done", events[-1]
    assert any(e["progress"]["phase"] == "replay" for e in events)
    name = events[-1]["result"]
    assert name == "incident-0.analysis"
    assert name in client.get(f"/api/bundles/{ident}").json()["analyses"]
    result = client.get(f"/api/bundles/{ident}/analyses/{name}").json()
    written = json.loads((served["incident"].parent / "incident-0.analysis.json").read_text())
    assert result == written and result["fix_set"]["total_flip_rate"] > 0


def test_a_running_job_can_be_cancelled_and_a_queued_one_too(client, served) -> None:
    ident = bundle_id(served, "incident")
    first = client.post("/api/jobs", json={"bundle": ident}).json()
    second = client.post("/api/jobs", json={"bundle": ident}).json()  # one at a time: queued
    assert client.get(f"/api/jobs/{second['id']}").json()["state"] == "queued"
    assert client.delete(f"/api/jobs/{second['id']}").json()["state"] == "cancelled"
    client.delete(f"/api/jobs/{first['id']}")
    ended = _wait(client, first["id"], 30)
    assert ended["state"] == "cancelled" and ended["result"] is None and ended["finished"]


def test_a_job_past_its_time_limit_fails_with_a_message(client, served) -> None:
    job = client.post(
        "/api/jobs", json={"bundle": bundle_id(served, "incident"), "options": {"time_limit_s": 0.01}}
    ).json()
    ended = _wait(client, job["id"], 30)
    assert ended["state"] == "failed" and "time limit of 0.01 s" in ended["error"]


def test_a_failing_analysis_shows_its_error(client, served) -> None:
    job = client.post("/api/jobs", json={"bundle": bundle_id(served, "baseline")}).json()
    ended = _wait(client, job["id"])
    assert ended["state"] == "failed" and "nothing to fix" in ended["error"]


def test_bad_job_requests_are_400(client, served) -> None:
    ident = bundle_id(served, "incident")
    for body, words in (
        ({"bundle": ident, "options": {"strategy": "magic"}}, "strategy='magic'"),
        ({"bundle": ident, "options": {"rm": "-rf"}}, "unknown job option"),
        ({"bundle": ident, "kind": "train"}, "kind"),
        ({"bundle": ident, "options": {"time_limit_s": 10**9}}, "time_limit_s"),
    ):
        res = client.post("/api/jobs", json=body)
        assert res.status_code == 400 and words in res.json()["detail"], res.text
    assert client.post("/api/jobs", json={"bundle": "nope"}).status_code == 404
