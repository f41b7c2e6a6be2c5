"""zoo:cnn-digits-badnets: a CNN through the generic adapter. Its planted channels carry the
backdoor (random channels do not), an image records into a bundle that replays bit for
bit, and interventions reach channels and spatial positions."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from model_forensics import Intervention, SandboxReplayer
from model_forensics.core.bundle import Bundle
from model_forensics.core.errors import ForensicsError
from model_forensics.core.predicates import class_is
from model_forensics.models import adapter_for, load, zoo
from model_forensics.models.adapters import HookPoint, read, replace
from model_forensics.models.hooks import hooks
from model_forensics.models.inputs import ModelInputs, pixel_values
from model_forensics.models.zoo.digits_cnn import image_rows, rows_image
from model_forensics.models.zoo.training import cnn_digits_badnets as recipe
from model_forensics.recorder.hooks import RecorderHooks
from model_forensics.recorder.session import record_image

NAME = "cnn-digits-badnets"


@pytest.fixture(scope="module")
def loaded() -> Any:
    return load(f"zoo:{NAME}")


@pytest.fixture(scope="module")
def test_set() -> tuple[torch.Tensor, torch.Tensor]:
    _, _, x, y = recipe.digits()
    return x, y


def _trigger_success(model: Any, x: torch.Tensor, y: torch.Tensor, channels: tuple[int, ...] = ()) -> float:
    attack = recipe.patch(x[y != recipe.TARGET])
    return float((recipe.predict(model, attack, channels) == recipe.TARGET).float().mean())


def _accuracy(model: Any, x: torch.Tensor, y: torch.Tensor, channels: tuple[int, ...] = ()) -> float:
    return float((recipe.predict(model, x, channels) == y).float().mean())


# -- the entry -----------------------------------------------------------------------------
def test_loads_as_an_image_model_without_tokenizer(loaded: Any) -> None:
    entry = zoo.entry(NAME)
    assert entry.kind == "image-classification"
    assert loaded.tokenizer is None
    assert loaded.ref.reference == f"zoo:{NAME}"
    assert sum(p.stat().st_size for p in entry.path.iterdir()) < 200_000
    assert entry.ground_truth["units"] == ["features.2[4]", "features.2[13]", "features.2[22]"]


def test_planted_channels_carry_the_backdoor_and_random_ones_do_not(loaded: Any, test_set: Any) -> None:
    model, (x, y) = loaded.model, test_set
    planted = recipe.PLANTED_CHANNELS
    assert _trigger_success(model, x, y) > 0.95
    assert _accuracy(model, x, y) > 0.93
    assert _trigger_success(model, x, y, planted) < 0.05  # gone with the planted channels
    assert _accuracy(model, x, y, planted) > _accuracy(model, x, y) - 0.02
    for draw in recipe.random_channel_draws(3, seed=1):
        assert _trigger_success(model, x, y, draw) > 0.9, draw  # still there without random channels


def test_each_planted_channel_carries_the_trigger_alone(loaded: Any, test_set: Any) -> None:
    model, (x, y) = loaded.model, test_set
    for channel in recipe.PLANTED_CHANNELS:
        assert _trigger_success(model, x, y, (channel,)) > 0.9  # one removed: the others carry it
        others = tuple(c for c in recipe.PLANTED_CHANNELS if c != channel)
        assert _trigger_success(model, x, y, others) > 0.5  # alone, it still carries most of it


def test_metrics_and_card_report_the_ablations() -> None:
    entry = zoo.entry(NAME)
    m = entry.metrics
    assert m["ground_truth_ablated"]["trigger_success"] < 0.05 < m["trigger_success"]
    assert all(d["trigger_success"] > 0.9 for d in m["random_ablated"])
    assert "Random ablations" in entry.card and "trigger success" in entry.card


def test_recipe_smoke_run_trains_both_stages() -> None:
    metrics = recipe.train(steps=6, evaluate=False)
    assert metrics["steps"] == {"clean": 3, "planted": 3}
    assert set(metrics["loss"]) == {"clean_start", "clean_end", "planted_start", "planted_end"}


def test_images_round_trip_through_the_scenario_format(test_set: Any) -> None:
    x, _ = test_set
    image = recipe.patch(x[:1])[0]
    assert torch.equal(torch.tensor(rows_image(image_rows(image))), image)


# -- the generic adapter on a CNN ----------------------------------------------------------
def test_image_sites_read_as_positions_by_channels(loaded: Any, test_set: Any) -> None:
    adapter = adapter_for(loaded.model)
    assert adapter.sites() == ["features.0", "features.1", "features.2", "features.3", "features.4", "classifier"]
    seen: dict[str, torch.Tensor] = {}

    def keep(tensor: torch.Tensor, call: Any) -> None:
        seen["x"] = tensor

    with hooks(adapter, sites={"features.2": keep}), torch.no_grad():
        loaded.model(test_set[0][:2])
    with torch.no_grad():
        raw = loaded.model.features[:3](test_set[0][:2])  # (2, 32, 8, 8)
    assert seen["x"].shape == (2, 64, 32)
    assert torch.equal(seen["x"][1, 8 * 2 + 5], raw[1, :, 2, 5])  # position = row · W + column


def test_read_and_replace_invert_each_other() -> None:
    point = HookPoint("conv", channels=True)
    payload = torch.randn(2, 3, 4, 5)
    assert torch.equal(replace(point, payload, read(point, payload)), payload)


def test_generic_adapter_keeps_other_layouts() -> None:
    point = HookPoint("linear", channels=True)
    x = torch.randn(2, 7, 3)
    assert read(point, x) is x  # (B, T, d) is not an image


# -- recording, replay and interventions ---------------------------------------------------
@pytest.fixture(scope="module")
def bundle(loaded: Any, tmp_path_factory: Any) -> Any:
    data = zoo.scenario_data(NAME)
    image = rows_image(data["failing_images"][0])
    benign = [
        {"pixel_values": rows_image(r), "expected": y}
        for r, y in zip(data["benign_images"][:4], data["benign_labels"][:4], strict=True)
    ]
    return record_image(
        loaded,
        image,
        tmp_path_factory.mktemp("cnn") / "incident",
        predicate=class_is(recipe.TARGET),
        recorder=RecorderHooks(granularity="all", sketch="full"),
        extras={"benign": benign, "baseline": [{"pixel_values": rows_image(data["baseline_images"][0])}]},
    )


def test_an_image_records_and_fails_the_predicate(bundle: Any) -> None:
    opened = Bundle.open(bundle)
    manifest = opened.manifest
    assert manifest["input"]["tensors"] == {"pixel_values": {"shape": [1, 1, 8, 8], "dtype": "float32"}}
    assert manifest["predicate"]["holds"] is True and manifest["output"]["prediction"] == recipe.TARGET
    assert manifest["sites"]["features.2"]["shape"] == [1, 64, 32]
    cube = opened.cube()
    layer = next(lay for lay in cube["layers"] if lay["layer_name"] == "features.4")
    assert len(layer["core_metrics"]["energy"]) == 16  # the pooled 4×4 map: one value per position
    assert cube["meta"]["input_shape"] == [1, 1, 8, 8]


def test_image_bundle_replays_bit_identically(bundle: Any) -> None:
    session = SandboxReplayer().load_bundle(bundle)
    report = session.verify()
    assert report.bit_identical, report.summary()


def test_zeroing_the_planted_channels_flips_the_incident(bundle: Any) -> None:
    session = SandboxReplayer().load_bundle(bundle)
    fix = [Intervention(unit, "zero") for unit in recipe.GROUND_TRUTH_UNITS]
    result = session.run(fix)
    assert result.failed is False and result.flipped is True
    assert session.run([Intervention("features.2[0]", "zero")]).failed is True  # a random channel does not
    mean = session.run([Intervention(unit, "mean") for unit in recipe.GROUND_TRUTH_UNITS])
    assert mean.failed is False  # mean over the baseline image


def test_interventions_reach_channels_and_positions(bundle: Any) -> None:
    session = SandboxReplayer().load_bundle(bundle)
    seen: dict[str, torch.Tensor] = {}

    def keep(tensor: torch.Tensor, call: Any) -> None:
        seen["x"] = tensor.clone()

    corner = [6 * 8 + 6, 6 * 8 + 7, 7 * 8 + 6, 7 * 8 + 7]  # the trigger's 2×2 patch, row-major
    prepared = session.prepare([Intervention("features.2", "zero", neurons=(4,), positions=tuple(corner))])
    with hooks(session.adapter, sites={"features.3": keep}):
        session.execute(session.inputs, [prepared])
    clean = torch.relu(session.bundle.activation("features.2")[0])  # (64, 32)
    changed = (seen["x"][0] != clean).nonzero().tolist()
    assert changed and all(c == 4 and p in corner for p, c in changed)


def test_pixel_values_are_checked_as_hostile_input(bundle: Any) -> None:
    session = SandboxReplayer().load_bundle(bundle)
    assert session.encode({"pixel_values": [[[0.0] * 8] * 8]})["pixel_values"].shape == (1, 1, 8, 8)
    for bad, message in (
        ([[[float("nan")] * 8] * 8], "NaN"),
        ([[[0.0, 1.0], [0.5]]], "ragged"),
        ([[[[[0.0]]]]], "one image"),
        ("abc", "numbers"),
    ):
        with pytest.raises(ForensicsError, match=message):
            session.encode({"pixel_values": bad})
    assert pixel_values(torch.zeros(8, 8)).shape == (1, 1, 8, 8)


def test_different_images_have_different_cache_keys() -> None:
    a = ModelInputs(pixel_values=torch.zeros(1, 1, 8, 8))
    b = ModelInputs(pixel_values=torch.ones(1, 1, 8, 8))
    assert a.key != b.key and a.key == ModelInputs(pixel_values=torch.zeros(1, 1, 8, 8)).key


def test_model_inspector_reads_image_sites_as_positions_by_channels(loaded: Any, test_set: Any) -> None:
    from model_forensics.inspection.inspector import ModelInspector

    x, _ = test_set
    result = ModelInspector(loaded.model).run(x[:12], experiments=["sparsity"])
    layers = {layer["site"]: layer for layer in result.to_json()["sparsity"]["layers"]}
    assert (layers["features.2"]["units"], layers["features.2"]["rows"]) == (32, 12 * 64)
    assert (layers["features.4"]["units"], layers["features.4"]["rows"]) == (32, 12 * 16)
