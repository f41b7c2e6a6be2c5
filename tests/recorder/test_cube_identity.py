"""The cube's numbers are read out of each metric's tensor in one ``tolist()``: the same
JSON bytes as converting element by element (the plain algorithm, kept here)."""

from __future__ import annotations

import json

import torch

from model_forensics import RecorderHooks
from model_forensics.recorder.cube import CORE_METRICS, cube_from_sites


def _plain_metrics(x: torch.Tensor, metrics: dict) -> dict[str, list[float]]:  # type: ignore[type-arg]
    return {name: [round(float(v), 6) for v in fn(x)] for name, fn in metrics.items()}


def test_cube_json_bytes_equal_the_element_by_element_algorithm(tiny) -> None:
    loaded = tiny["llama"]
    metrics = {**CORE_METRICS, "argmax": lambda x: x.argmax(dim=-1)}  # an integer metric too
    with RecorderHooks(granularity="all").install_hooks(loaded.model) as rec, torch.no_grad():
        loaded.model(input_ids=torch.tensor([[1, 5, 9, 3, 7, 2, 8, 4]]))
        recorded = rec.recorded()
    cube = cube_from_sites(recorded, rec.adapter, [], "tiny", [1, 8], metrics=metrics, provenance={})
    assert cube.layers
    for layer in cube.layers:
        x = recorded[layer.raw_ref["site"]][0].float()
        plain = _plain_metrics(x.reshape(x.shape[0], -1), metrics)
        assert json.dumps(layer.core_metrics) == json.dumps(plain), layer.layer_name
