import copy
import json

import jsonschema
import torch

from model_forensics import ActivityCube, add_hooks_all
from model_forensics.core.bundle import load_schema

IDS = torch.tensor([[1, 5, 9, 3, 7, 2]])


def test_cube_metrics_are_per_token_norms_means_stds(tiny, tmp_path) -> None:
    # a copy: output_hidden_states=True makes transformers install its capture hooks on the
    # model for good, which must not leak into the session fixture other tests share
    model = copy.deepcopy(tiny["gpt2"].model)
    with add_hooks_all(model) as tracer, torch.no_grad():
        out = model(input_ids=IDS, output_hidden_states=True)
        cube = tracer.cube("tiny-gpt2")
    layer0 = out.hidden_states[1][0]  # block 0 output, (T, d)
    assert [layer.layer_index for layer in cube.layers] == [0, 1]
    assert cube.layers[0].layer_name == "transformer.h.0"
    torch.testing.assert_close(
        torch.tensor(cube.layers[0].core_metrics["energy"]), layer0.norm(dim=-1), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        torch.tensor(cube.layers[0].core_metrics["mean_activation"]), layer0.mean(-1), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        torch.tensor(cube.layers[0].core_metrics["std_activation"]), layer0.std(-1, correction=0), atol=1e-5, rtol=1e-5
    )
    assert cube.metric("energy").shape == (2, 6)


def test_cube_json_matches_mr_recon_schema_and_round_trips(tiny, tmp_path) -> None:
    model = tiny["gpt2"].model
    with add_hooks_all(model) as tracer, torch.no_grad():
        model(input_ids=IDS)
        path = tracer.cube().save(tmp_path / "cube.json")
    data = json.loads(path.read_text())
    jsonschema.validate(data, load_schema("cube"))
    assert set(data) == {"meta", "tokens", "layers", "provenance"}
    assert set(data["meta"]) == {"model_name", "timestamp", "input_shape"}
    assert data["meta"]["input_shape"] == [1, 6]
    assert len(data["tokens"]) == 6
    assert set(data["provenance"]) >= {"commit_hash", "package_versions"}
    assert ActivityCube.from_json(data).to_json() == data
