"""batch / triage on a local Ray cluster give the serial results; every --ray entry point
fails fast, with one line and exit code 2, on an address nobody answers."""

from __future__ import annotations

import itertools
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from model_forensics.cli import app
from model_forensics.core.distributed import RayUnavailable, probe, shard_spans
from model_forensics.rca.pipeline import find_bundles, run_many

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def bundles(tiny, argmax_incidents, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return argmax_incidents(tiny["llama"], tmp_path_factory.mktemp("bundles"), n_benign=10)


@pytest.fixture(scope="module")
def cluster(ray_cluster: Any) -> Any:
    """The session's local cluster (tests/conftest.py), two CPUs."""
    return ray_cluster


def _results(report: Any) -> list[dict[str, Any]]:
    drop = {"seconds"}
    return [{k: v for k, v in r.items() if k not in drop} for r in report.results]


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two JSON values differ (wall times aside)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a if k != "seconds" for d in _diff(a[k], b[k], f"{path}/{k}")]  # wall time
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"[:300]]


@pytest.mark.slow  # Ray workers import torch: ~20 s on a shared machine
def test_batch_on_ray_equals_serial(cluster: Any, bundles: Path) -> None:
    paths = find_bundles(bundles)
    serial = run_many(paths, search=True, workers=1)
    address = cluster.get_runtime_context().gcs_address  # HOST:PORT of the running cluster
    probe(address)  # a real Ray GCS passes the reachability check
    remote = run_many(paths, search=True, ray=address)
    assert remote.backend == f"ray ({address})" and len(remote.results) == 3
    assert _diff(_results(serial), _results(remote)) == []  # anomalies, ranking, fix sets, passes
    assert remote.groups == serial.groups


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_address_fails_fast_on_every_entry_point(bundles: Path, tmp_path: Path) -> None:
    address = f"127.0.0.1:{_closed_port()}"
    prompts, data = tmp_path / "p.jsonl", tmp_path / "d.jsonl"
    prompts.write_text(json.dumps({"prompt": "The cat sat"}) + "\n" + json.dumps({"prompt": "A dog ran"}) + "\n")
    data.write_text(json.dumps({"text": "The cat sat"}) + "\n" + json.dumps({"text": "A dog ran"}) + "\n")
    commands = [
        ["batch", str(bundles), "--ray", address],
        ["triage", str(bundles), "--ray", address],
        ["inspect", "--model", "zoo:induction-2l", "--data", str(data), "--ray", address,
         "--experiments", "stats", "--out", str(tmp_path / "out")],
        ["circuits", "evaluate", "--model", "zoo:induction-2l", "--prompts", str(prompts),
         "--unit", "blocks.0.attn.head.0", "--ray", address],
    ]  # fmt: skip
    for argv in commands:
        started = time.perf_counter()
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 2, (argv, result.output)
        flat = " ".join(result.output.split())  # rich wraps long lines
        assert f"cannot reach the Ray cluster at '{address}'" in flat, (argv, result.output)
        lines = result.output.strip().splitlines()
        assert "Traceback" not in result.output and "error: cannot reach" in flat
        assert sum("error" in line for line in lines) == 1
        assert time.perf_counter() - started < 45  # loads a model first; Ray alone retries for minutes


def test_an_address_that_answers_but_is_no_ray_cluster_times_out_within_the_bound() -> None:
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted: list[Any] = []  # accepts and stays silent, as a proxy or another service may
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    started = time.perf_counter()
    with pytest.raises(RayUnavailable, match="no answer within 1 s"):
        probe(f"127.0.0.1:{server.getsockname()[1]}", timeout_s=1.0)
    assert time.perf_counter() - started < 5
    server.close()


def test_malformed_address_is_one_clear_error() -> None:
    with pytest.raises(RayUnavailable, match="is not HOST:PORT"):
        probe("my-cluster")


def test_shards_keep_micro_batches_whole() -> None:
    spans = shard_spans(45, 4, align=8)
    assert spans[0][0] == 0 and spans[-1][1] == 45
    assert all(a % 8 == 0 for a, _ in spans) and all(b == c for (_, b), (c, _) in itertools.pairwise(spans))
    assert shard_spans(5, 8) == [(i, i + 1) for i in range(5)]
