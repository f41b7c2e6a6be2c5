"""A served directory recorded once: the zoo's gpt2-injection incident and its clean baseline
(granularity ``all``: attention patterns, q and k), a GQA Llama bundle, a corrupt bundle, an
``inspect --out``-style folder; and a TestClient on the app serving it."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory, tiny) -> dict[str, Path]:
    from model_forensics import RecorderHooks, token_is
    from model_forensics.scenarios import get

    root = tmp_path_factory.mktemp("served")
    scenario = get("gpt2-injection")
    small = dataclasses.replace(
        scenario, variants=scenario.variants[:2], benign=scenario.benign[:2], baseline=scenario.baseline[:3]
    )
    run = small.record(root / "zoo", limit=1)
    out = {"root": root, "incident": run.incidents[0], "baseline": run.baselines[0]}
    llama = tiny["llama"]
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with RecorderHooks(granularity="all", sketch="full").install_hooks(llama.model) as rec, torch.no_grad():
        llama.model(input_ids=ids)
        out["llama"] = rec.create_bundle(root / "llama", predicate=token_is(0))
    corrupt = root / "corrupt"
    shutil.copytree(out["baseline"], corrupt)
    (corrupt / "manifest.json").write_text((corrupt / "manifest.json").read_text()[:200])
    out["corrupt"] = corrupt
    inspection = root / "inspect-out"
    inspection.mkdir()
    (inspection / "results.json").write_text(json.dumps({"model": "zoo:gpt2-injection", "experiments": ["sparsity"]}))
    (inspection / "summary.md").write_text("# Inspection\n")
    (inspection / "sparsity.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 16)
    out["inspection"] = inspection
    return out


@pytest.fixture(scope="module")
def client(served: dict[str, Path]) -> Iterator[object]:
    from fastapi.testclient import TestClient

    from model_forensics.server.app import create_app

    with TestClient(create_app(served["root"], time_limit_s=120), base_url="http://127.0.0.1") as c:
        yield c
