"""ModelInspector on a local Ray cluster: the sharded streaming pass, merged, gives the
local run's results (reservoir-based values exactly, moment-based ones to 1e-6)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import inspection_models
import pytest
from inspection_models import CharTokenizer, sentences, tiny_gpt2

from model_forensics import ModelInspector
from model_forensics.inspection.streaming import Reservoir, item_keys

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster(ray_cluster: Any) -> Iterator[Any]:
    """The session's local cluster of two CPUs (tests/conftest.py); the workers cannot
    import the test helpers, so they travel by value."""
    ray_cluster.cloudpickle.register_pickle_by_value(inspection_models)
    yield ray_cluster
    ray_cluster.cloudpickle.unregister_pickle_by_value(inspection_models)


def _same(local: Any, remote: Any, path: str = "") -> list[str]:
    """Where two results' JSON differ (floats beyond 1e-6 relative, anything else at all)."""
    if isinstance(local, dict):
        if set(local) != set(remote):
            return [f"{path}: keys {sorted(set(local) ^ set(remote))}"]
        skip = {"timings_s", "backend"}
        return [d for k in local if k not in skip for d in _same(local[k], remote[k], f"{path}/{k}")]
    if isinstance(local, list):
        if len(local) != len(remote):
            return [f"{path}: {len(local)} vs {len(remote)} items"]
        return [d for i, (a, b) in enumerate(zip(local, remote, strict=True)) for d in _same(a, b, f"{path}[{i}]")]
    if (
        isinstance(local, float)
        and isinstance(remote, float)
        and ((math.isnan(local) and math.isnan(remote)) or abs(local - remote) <= 1e-6 * max(1.0, abs(local)))
    ):
        return []
    return [] if local == remote else [f"{path}: {local!r} vs {remote!r}"]


@pytest.mark.slow  # Ray workers import torch and transformers: ~30 s on a shared machine
def test_all_experiments_on_ray_equal_the_local_run(cluster: Any) -> None:
    model, tok = tiny_gpt2(0, dormant=(3,)), CharTokenizer()
    data = [{"text": t, "passed": i % 3 != 0, "group": f"g{i // 20}"} for i, t in enumerate(sentences(60, 1))]
    reference = sentences(30, 2)
    insp = ModelInspector(model, tok, batch_size=8, token_capacity=40, pooled_capacity=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        local = insp.run(data, reference=reference, compare_model=tiny_gpt2(1))
        remote = insp.run(data, reference=reference, compare_model=tiny_gpt2(1), ray="local")
    assert remote.backend == "ray (local, 2 shards)" and local.backend == "local"
    assert set(remote.results()) == set(local.results()) == {
        "sparsity", "stats", "shift", "drift", "regression", "sensitivity", "attribution", "robustness", "pruning"
    }  # fmt: skip
    assert _same(local.to_json(), remote.to_json()) == []
    # the reservoirs (capacity 40 of 60 inputs: the merge had to choose) keep the same rows
    assert remote.shift is not None and local.shift is not None
    assert remote.sparsity is not None and remote.sparsity.layer("blocks.0.mlp.post").dormant_units[:1] == [3]
    assert "merge" in remote.timings


def test_reservoir_merge_is_the_reservoir_of_everything() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    rows, keys = rng.normal(size=(50, 3)), item_keys(50, 7)
    ids = np.arange(50)
    whole = Reservoir(12, 3)
    for start in range(0, 50, 5):
        whole.update(rows[start : start + 5], keys[start : start + 5], ids[start : start + 5])
    left, right = Reservoir(12, 3), Reservoir(12, 3)
    left.update(rows[:20], keys[:20], ids[:20])
    right.update(rows[20:], keys[20:], ids[20:])
    left.merge(right)
    assert np.array_equal(left.ids, whole.ids) and np.array_equal(left.values(), whole.values())
    assert left.seen == whole.seen == 50
