"""analyze --baseline with image bundles: the clean counterpart's recorded pixel_values
are the baseline (they used to be dropped, leaving "a dict with keys []")."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from model_forensics.cli import app
from model_forensics.models import zoo
from model_forensics.models.zoo.digits_cnn import rows_image

runner = CliRunner()
CNN = "cnn-digits-badnets"


def _record(image: list[str], root: Path, name: str) -> Path:
    np.save(root / f"{name}.npy", np.array(rows_image(image), dtype=np.float32))
    out = root / name
    args = ["record", "-m", f"zoo:{CNN}", "--image", str(root / f"{name}.npy"), "--predicate", "class_is:0"]
    result = runner.invoke(app, [*args, "--granularity", "all", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("badnets")
    data = zoo.scenario_data(CNN)
    incident = _record(data["failing_images"][0], root, "incident")
    return incident, [_record(data["baseline_images"][i], root, f"clean-{i}") for i in range(2)]


def test_analyze_with_image_baselines_finds_planted_channels(recorded: tuple[Path, list[Path]], tmp_path: Path) -> None:
    incident, clean = recorded
    baselines = [arg for path in clean for arg in ("--baseline", str(path))]
    result = runner.invoke(app, ["analyze", str(incident), *baselines, "--out", str(tmp_path / "analysis.json")])
    assert result.exit_code == 0, result.output
    fix = json.loads((tmp_path / "analysis.json").read_text())["fix_set"]
    assert fix["total_flip_rate"] == 1.0
    planted = set(zoo.entry(CNN).ground_truth["units"])  # features.2[4], [13], [22]
    found = {i["site"] for i in fix["interventions"]}
    assert found and found <= planted, found


def test_baseline_from_another_model_is_refused(recorded: tuple[Path, list[Path]], tmp_path: Path) -> None:
    other = tmp_path / "text"
    made = runner.invoke(app, ["record", "-m", "zoo:induction-2l", "-p", "x y z a x", "-o", str(other)])
    assert made.exit_code == 0, made.output
    result = runner.invoke(app, ["analyze", str(recorded[0]), "--baseline", str(other)])
    assert result.exit_code == 2, result.output
    assert "record the baseline with the incident's model" in " ".join(result.output.split())
