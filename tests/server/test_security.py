"""What the server refuses: paths out of the served directory (encoded, double-encoded,
absolute, through links), calls without the token, foreign Host headers, large bodies,
non-JSON posts; and listening beyond loopback without a token."""

from __future__ import annotations

import os

import pytest
from fastapi.testclient import TestClient

from model_forensics import ForensicsError
from model_forensics.server.app import create_app


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> os.PathLike:
    secret = tmp_path_factory.mktemp("outside")
    (secret / "secret.json").write_text('{"value": "TOPSECRET"}')
    return secret


@pytest.fixture(scope="module")
def linked(served, outside):
    """Links inside the served root that point out of it: a bundle and a file."""
    (served["root"] / "link-bundle").symlink_to(served["incident"], target_is_directory=True)
    (served["root"] / "link-out").symlink_to(outside, target_is_directory=True)
    (served["root"] / "leak.json").symlink_to(outside / "secret.json")
    return served


@pytest.mark.parametrize(
    "path",
    [
        "/api/bundles/..%2f..%2f..%2fetc/cube",
        "/api/bundles/%2e%2e%2fserved/cube",
        "/api/bundles/..%252f..%252fetc/cube",
        "/api/bundles/%252e%252e%252fx",
        "/api/bundles/%2fetc%2fpasswd",
        "/api/bundles//etc/passwd",
        "/api/files/..%2f..%2fetc%2fpasswd.json",
        "/api/files/%252e%252e/secret.json",
        "/api/files/link-out/secret.json",
        "/api/files/leak.json",
        "/api/bundles/link-bundle",
        "/api/bundles/zoo%5c..%5cincident-0",
        "/api/inspections/..%2f",
    ],
)
def test_paths_outside_the_served_directory_are_forbidden(client, linked, path) -> None:
    res = client.get(path)
    assert res.status_code == 403, (path, res.status_code, res.text)
    assert "TOPSECRET" not in res.text and "detail" in res.json()


def test_only_png_and_json_files_are_served(client, served) -> None:
    assert client.get("/api/files/zoo/incident-0/activations.safetensors").status_code == 403
    assert client.get("/api/files/inspect-out/results.json").json()["experiments"] == ["sparsity"]


def test_a_link_is_not_listed_as_a_bundle(client, linked) -> None:
    assert "link-bundle" not in {row["id"] for row in client.get("/api/bundles").json()}


def test_the_token_is_checked_on_every_api_call(served) -> None:
    app = create_app(served["root"], token="s3cret", host="0.0.0.0")
    with TestClient(app, base_url="http://10.0.0.5:8765") as c:
        assert c.get("/api/bundles").status_code == 401
        assert c.get("/api/bundles", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/health", params={"token": "wrong"}).status_code == 401
        assert c.post("/api/jobs", json={"bundle": "x"}).status_code == 401
        assert c.get("/api/bundles", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/api/health", params={"token": "s3cret"}).status_code == 200


def test_listening_beyond_loopback_needs_a_token(served) -> None:
    with pytest.raises(ForensicsError, match="--token"):
        create_app(served["root"], host="0.0.0.0")
    create_app(served["root"], host="::1")  # loopback: fine without


def test_a_foreign_host_header_is_refused_on_loopback(client) -> None:
    res = client.get("/api/bundles", headers={"Host": "evil.example:8765"})
    assert res.status_code == 403 and "not this server" in res.json()["detail"]
    assert client.get("/api/health", headers={"Host": "localhost:8765"}).status_code == 200


def test_request_bodies_are_bounded_and_must_be_json(client) -> None:
    big = b'{"bundle": "' + b"x" * (1024 * 1024 + 10) + b'"}'
    res = client.post("/api/jobs", content=big, headers={"Content-Type": "application/json"})
    assert res.status_code == 413

    def chunks():
        for _ in range(40):
            yield b"x" * 65536

    streamed = client.post("/api/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    form = client.post("/api/jobs", content=b"bundle=x", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415
