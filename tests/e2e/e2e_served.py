"""Start and stop `model-forensics serve` for the browser tests; read the JSON API."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
START_TIMEOUT_S = 90.0  # importing torch on a loaded 2-core machine can take a while


@dataclass
class Server:
    url: str
    root: Path
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        """What `serve` printed so far (stdout and stderr)."""
        return self.log.read_text(errors="replace")

    def get(self, path: str) -> Any:
        """The JSON of GET ``path`` (e.g. ``/api/bundles``)."""
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def wait_job(self, job_id: str, timeout_s: float) -> dict[str, Any]:
        """The job once it has ended (done, failed or cancelled), polling; fails after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.get(f"/api/jobs/{job_id}")
            if job["state"] in ("done", "failed", "cancelled"):
                return dict(job)
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} still {job['state']} after {timeout_s} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def start_server(root: Path, log: Path, extra: list[str] | None = None) -> Iterator[Server]:
    """`model-forensics serve ROOT --port P` in a subprocess, up when /api/health answers;
    its output goes to ``log`` (a file, so a chatty server never blocks on a full pipe)."""
    port = free_port()
    cli = Path(sys.executable).with_name("model-forensics")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [str(cli), "serve", str(root), "--port", str(port), *(extra or [])],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
    server = Server(f"http://127.0.0.1:{port}", root, process, log)
    try:
        _wait_up(server)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def _wait_up(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(
                f"`model-forensics serve` exited with {server.process.returncode}: {server.output()[-2000:]}"
            )
        try:
            server.get("/api/health")
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.25)
    raise AssertionError(f"`model-forensics serve` did not answer at {server.url} within {START_TIMEOUT_S} s")
