"""The JSON API on a served directory: values equal the bundle's, errors are one-line JSON."""

from __future__ import annotations

import pytest
from served_ids import bundle_id

from model_forensics import ActivityCube, Bundle, Intervention, SandboxReplayer
from model_forensics.circuits import token_influence


def test_health_and_bundle_list_with_a_corrupt_bundle(client, served) -> None:
    assert client.get("/api/health").json()["version"]
    rows = {row["id"]: row for row in client.get("/api/bundles").json()}
    incident = rows[bundle_id(served, "incident")]
    assert incident["predicate_result"] is True and incident["verified"] is True and incident["error"] is None
    assert incident["model"] == "zoo:gpt2-injection" and incident["predicate"] == "contains('HACKED')"
    corrupt = rows["corrupt"]
    assert corrupt["error"] and "manifest.json" in corrupt["error"]
    assert client.get("/api/bundles/corrupt").status_code == 422  # listed, but its page says why it cannot open


def test_detail_says_what_can_be_shown(client, served) -> None:
    got = client.get(f"/api/bundles/{bundle_id(served, 'incident')}").json()
    bundle = Bundle.open(served["incident"])
    assert got["tokens"] == bundle.manifest["input"]["tokens"]
    assert got["layers"] == 2 and got["heads"] == 4 and got["kv_heads"] == 4
    assert got["has_attention"] and got["attention_layers"] == [0, 1] and got["attention_source"] == "recorded"
    assert {"energy", "mean_activation", "std_activation"} <= set(got["metrics"])
    assert {s["name"] for s in got["sites"]} == set(bundle.sites)
    assert got["manifest"]["name"] == bundle.name


def test_cube_endpoint_equals_the_activity_cube(client, served) -> None:
    cube = ActivityCube.from_json(Bundle.open(served["incident"]).cube())
    got = client.get(f"/api/bundles/{bundle_id(served, 'incident')}/cube", params={"metric": "std_activation"}).json()
    assert got["values"] == [la.core_metrics["std_activation"] for la in cube.layers]
    assert got["tokens"] == cube.tokens and got["layers"] == [0, 1]


def test_attention_endpoint_is_the_recorded_pattern_per_head(client, served) -> None:
    pattern = Bundle.open(served["incident"]).activation("blocks.0.attn.pattern")[0]
    url = f"/api/bundles/{bundle_id(served, 'incident')}/attention"
    matrices = [client.get(url, params={"layer": 0, "head": h}).json()["matrix"] for h in range(4)]
    assert matrices == [pattern[h].tolist() for h in range(4)]
    assert matrices[0] != matrices[3]


def test_attention_without_a_pattern_says_how_to_record_one(client, tmp_path, tiny) -> None:
    import torch
    from fastapi.testclient import TestClient

    from model_forensics import RecorderHooks
    from model_forensics.server.app import create_app

    with RecorderHooks(granularity="layer").install_hooks(tiny["gpt2"].model) as rec, torch.no_grad():
        tiny["gpt2"].model(input_ids=torch.tensor([[1, 2, 3]]))
        rec.create_bundle(tmp_path / "b")
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1") as c:
        res = c.get("/api/bundles/b/attention", params={"layer": 0, "head": 0})
    assert res.status_code == 404 and "head granularity" in res.json()["detail"]


def test_compare_endpoint(client, served) -> None:
    got = client.get(
        "/api/compare",
        params={"a": bundle_id(served, "incident"), "b": bundle_id(served, "baseline"), "metric": "energy"},
    ).json()
    assert got["diff"] == [
        [y - x for x, y in zip(ra, rb, strict=True)] for ra, rb in zip(got["a"], got["b"], strict=True)
    ]
    assert got["layers"] == [0, 1]


@pytest.mark.parametrize(
    ("url", "status", "words"),
    [
        ("/api/bundles/nope", 404, "does not exist"),
        ("/api/bundles/zoo", 404, "not a bundle"),
        ("/api/bundles/zoo/incident-0/cube?metric=nope", 400, "metric 'nope'"),
        ("/api/bundles/zoo/incident-0/cube?max_tokens=0", 400, "max_tokens"),
        ("/api/bundles/zoo/incident-0/attention?layer=0", 400, "head"),
        ("/api/bundles/zoo/incident-0/attention?layer=0&head=12", 400, "head 12"),
        ("/api/bundles/zoo/incident-0/analyses/missing", 404, "analysis 'missing'"),
        ("/api/jobs/unknown", 404, "job 'unknown'"),
        ("/api/inspections/zoo", 404, "no results.json"),
        ("/api/nothing", 404, "no API endpoint"),
    ],
)
def test_errors_are_one_line_json(client, url, status, words) -> None:
    res = client.get(url)
    assert res.status_code == status, res.text
    detail = res.json()["detail"]
    assert words in detail and "\n" not in detail and "Traceback" not in detail


def test_influence_equals_token_influence_on_the_replayed_session(client, served) -> None:
    got = client.get(
        f"/api/bundles/{bundle_id(served, 'incident')}/influence", params={"target": "HACKED", "method": "occlusion"}
    ).json()
    expected = token_influence(SandboxReplayer().load_bundle(served["incident"]), target="HACKED", method="occlusion")
    assert got["scores"] == [float(s) for s in expected.scores] and got["tokens"] == expected.tokens
    assert got["causal"] is True and got["target_label"] == "HACKED"


def test_replay_equals_session_run(client, served) -> None:
    body = {"site": "blocks.0.attn", "head": 3, "kind": "zero"}
    got = client.post(f"/api/bundles/{bundle_id(served, 'incident')}/replay", json=body).json()
    session = SandboxReplayer().load_bundle(served["incident"])
    expected = session.run([Intervention("blocks.0.attn.head.3", "zero")])
    assert got["new_output"] == expected.text and got["predicate_result"] == expected.failed
    assert got["recorded_output"] == "HACKED" and got["changed"] == (expected.text != "HACKED")
    bad = client.post(f"/api/bundles/{bundle_id(served, 'incident')}/replay", json={"site": "blocks.9.mlp"})
    assert bad.status_code == 400 and "blocks.9.mlp" in bad.json()["detail"]


def test_inspections_and_their_figures(client) -> None:
    listed = client.get("/api/inspections").json()
    assert listed == [
        {"id": "inspect-out", "path": "inspect-out", "model": "zoo:gpt2-injection", "experiments": ["sparsity"]}
    ]
    detail = client.get("/api/inspections/inspect-out").json()
    assert detail["summary"]["experiments"] == ["sparsity"] and detail["summary_markdown"].startswith("# Inspection")
    assert detail["plots"] == [{"name": "sparsity", "url": "/api/files/inspect-out/sparsity.png"}]
    png = client.get(detail["plots"][0]["url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content.startswith(b"\x89PNG")


def test_the_dashboard_and_its_client_side_routes(client) -> None:
    root = client.get("/")
    assert root.status_code == 200 and "text/html" in root.headers["content-type"]
    assert client.get("/bundle/zoo/incident-0").text == root.text  # falls back to index.html
    assert client.get("/openapi.json").json()["info"]["title"].startswith("model-forensics")


def test_a_missing_build_is_a_page_saying_how_to_build_it(served, tmp_path) -> None:
    from fastapi.testclient import TestClient

    from model_forensics.server.app import create_app

    with TestClient(create_app(served["root"], static_dir=tmp_path), base_url="http://127.0.0.1") as c:
        page = c.get("/rca/x")
        assert page.status_code == 200 and "npm run build" in page.text
        assert c.get("/api/health").json()["ui_built"] is False
