"""ModelInspector on the zoo's image model (zoo:cnn-digits-badnets): all eight experiments
(plus pruning) run on pixel inputs, and their answers match the planted backdoor."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from typer.testing import CliRunner

from model_forensics import ForensicsError, ModelInspector
from model_forensics.inspection.collect import Sample
from model_forensics.inspection.robustness import IMAGE_FAMILIES, image_variants
from model_forensics.models import zoo
from model_forensics.models.adapters import adapter_for
from model_forensics.models.zoo.digits_cnn import rows_image

PLANTED = (4, 13, 22)  # channels of features.2 that carry the trigger (the entry's ground truth)


@pytest.fixture(scope="module")
def cnn() -> Any:
    return zoo.load("cnn-digits-badnets").model


@pytest.fixture(scope="module")
def images() -> dict[str, list[torch.Tensor]]:
    data = zoo.scenario_data("cnn-digits-badnets")
    return {kind: [torch.tensor(rows_image(r)) for r in data[f"{kind}_images"]] for kind in ("benign", "failing")}


def test_eight_experiments_on_the_cnn_find_the_planted_channels(cnn, images) -> None:
    assert zoo.entry("cnn-digits-badnets").ground_truth["extra"]["channels"] == list(PLANTED)
    clean, patched = images["benign"], images["failing"]
    inputs = [Sample(tensor=x, passed=True, group="1-clean") for x in clean[:40]]
    inputs += [Sample(tensor=x, passed=False, group="2-patched") for x in patched[:40]]
    fixed = copy.deepcopy(cnn)  # the planted channels zeroed: the model before the backdoor
    with torch.no_grad():
        for c in PLANTED:
            fixed.features[2].weight[c] = 0.0
            fixed.features[2].bias[c] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = ModelInspector(cnn).run(inputs, reference=clean[40:], compare_model=fixed)
    assert res.skipped == {} and set(res.results()) == {
        "sparsity", "stats", "shift", "drift", "regression", "sensitivity", "attribution", "robustness", "pruning"
    }  # fmt: skip
    # failing vs passing inputs: after the pool, the planted channels separate them most
    assert res.attribution is not None
    pooled = next(la for la in res.attribution.layers if la.site == "features.4")
    assert {u for u, _ in pooled.top_units[:3]} == set(PLANTED)
    logits = next(la for la in res.attribution.layers if la.site == "classifier")
    assert logits.top_units[0][0] == 0 and logits.top_units[0][1] > 0  # the target class rises
    # the two models agree on the clean half and disagree on the patched half
    assert res.regression is not None and 0.4 <= res.regression.agreement <= 0.6
    # ReLU outputs are sparse, convolution outputs are not
    zeros = {la.site: la.zero_fraction for la in res.sparsity.layers} if res.sparsity else {}
    assert zeros["features.1"] > 0.1 and zeros["features.3"] > 0.1 and zeros["features.0"] == 0.0
    # pixel perturbation families; a shift moves the corner patch, so it changes predictions most
    assert res.robustness is not None
    rates = {f.family: f.rate for f in res.robustness.families}
    assert set(rates) == set(IMAGE_FAMILIES)
    assert rates["shift"] < rates["noise"] and rates["shift"] < rates["brightness"]
    assert res.drift is not None and "classifier" in res.drift.drifting_layers()


def test_image_variants_are_seeded_bounded_and_different(images) -> None:
    image = images["benign"][0]
    for family in IMAGE_FAMILIES:
        a, b = image_variants(image, family, 2, 0, 5), image_variants(image, family, 2, 0, 5)
        assert len(a) == 2 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        assert all(not torch.equal(x, image) and x.shape == image.shape for x in a)
        assert all(x.min() >= 0.0 and x.max() <= 1.0 for x in a)
    shifted = image_variants(image, "shift", 1, 0, 0)[0]
    assert torch.isclose(shifted.sum(), image.sum()) or shifted.sum() < image.sum()  # content only leaves


def test_an_image_model_given_text_is_one_clear_error(cnn, tmp_path: Path) -> None:
    with pytest.raises(ForensicsError, match="takes tensors .* 2 of 2 inputs are text"):
        ModelInspector(cnn).run(["a prompt", "another"], experiments=["stats"])
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"text": "a prompt"}) + "\n")
    from model_forensics.cli import app

    result = CliRunner().invoke(
        app, ["inspect", "--model", "zoo:cnn-digits-badnets", "--data", str(data), "--out", str(tmp_path / "o")]
    )
    flat = " ".join(result.output.split())  # rich wraps long lines
    assert result.exit_code == 2 and "takes tensors" in flat and "Traceback" not in result.output


def test_the_pass_counter_counts_pixel_rows(cnn, images) -> None:
    from model_forensics.core.config import ReplayConfig
    from model_forensics.replay.environment import ReplayEnvironment

    class Recording:  # what the environment reads of a bundle
        manifest: ClassVar[dict[str, Any]] = {}

        def calls(self) -> list[dict[str, Any]]:
            return []

    env = ReplayEnvironment(Recording(), adapter_for(cnn), ReplayConfig())  # type: ignore[arg-type]
    batch = torch.stack(images["failing"][:5])  # (5, 1, 8, 8)
    with env.active():
        cnn(pixel_values=batch)
        cnn(batch[:2])
    assert (env.counter.passes, env.counter.rows) == (2, 7)
