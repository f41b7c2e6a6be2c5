"""`model-forensics serve`: a busy port and a missing token are one line and exit code 2; the
exported OpenAPI schema is the app's."""

from __future__ import annotations

import socket
from pathlib import Path

from typer.testing import CliRunner

from model_forensics.cli import app


def test_a_busy_port_is_one_line_and_exit_2(tmp_path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        res = CliRunner().invoke(app, ["serve", str(tmp_path), "--port", str(port)])
    assert res.exit_code == 2
    assert res.output.strip() == f"error: port {port} is in use; pass --port"


def test_a_public_host_without_token_is_refused(tmp_path) -> None:
    res = CliRunner().invoke(app, ["serve", str(tmp_path), "--host", "0.0.0.0"])
    assert res.exit_code == 2 and "--token" in res.output and len(res.output.strip().splitlines()) == 1


def test_a_missing_directory_is_refused(tmp_path) -> None:
    res = CliRunner().invoke(app, ["serve", str(tmp_path / "none")])
    assert res.exit_code == 2 and "not a directory" in res.output


def test_the_exported_openapi_schema_is_current(tmp_path) -> None:
    from model_forensics.server.app import create_app, openapi_text

    stored = (Path(__file__).parents[2] / "src" / "model_forensics" / "server" / "openapi.json").read_text()
    assert stored == openapi_text(create_app(tmp_path)), "stale: run python scripts/export_openapi.py"
