"""record --image: an image model (the zoo's BadNets CNN) recorded from the CLI.

The image comes from a file (.npy, .safetensors, .json) holding one preprocessed
(C, H, W) image; the bundle replays bit-identical, and text given to an image model (or an
image to a text model) is one line, exit 2."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from model_forensics.cli import app
from model_forensics.core.bundle import Bundle
from model_forensics.core.errors import ForensicsError
from model_forensics.models import zoo
from model_forensics.models.image_files import read_image
from model_forensics.models.zoo.digits_cnn import rows_image
from model_forensics.replay import SandboxReplayer

runner = CliRunner()
CNN = "zoo:cnn-digits-badnets"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The scenario's first patched digit in every format, and its clean counterpart."""
    root = tmp_path_factory.mktemp("images")
    data = zoo.scenario_data("cnn-digits-badnets")
    patched = np.array(rows_image(data["failing_images"][0]), dtype=np.float32)  # (1, 8, 8)
    np.save(root / "patched.npy", patched)
    np.save(root / "clean.npy", np.array(rows_image(data["baseline_images"][0]), dtype=np.float32))
    save_file({"pixel_values": torch.from_numpy(patched)}, str(root / "patched.safetensors"))
    torch.save(torch.from_numpy(patched), root / "patched.pt")  # refused: nothing is unpickled
    (root / "patched.json").write_text(json.dumps(patched.tolist()))
    return {p.stem if p.suffix == ".npy" else p.name: p for p in root.iterdir()}


def test_every_format_reads_the_same_image(images: dict[str, Path]) -> None:
    expected = read_image(images["patched"])
    assert expected.shape == (1, 1, 8, 8) and expected.dtype == torch.float32
    for name in ("patched.safetensors", "patched.json"):
        assert torch.equal(read_image(images[name]), expected), name
    with pytest.raises(ForensicsError, match=r"has suffix '\.pt'"):  # a pickle: never read
        read_image(images["patched.pt"])


def test_record_image_replays_bit_identical(images: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "incident"
    result = runner.invoke(
        app, ["record", "-m", CNN, "--image", str(images["patched"]), "--predicate", "class_is:0", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    bundle = Bundle.open(out)
    assert torch.equal(bundle.inputs["pixel_values"], read_image(images["patched"]))
    assert bundle.manifest["output"]["prediction"] == 0  # the backdoor fires: the predicate holds
    assert {"features.0", "features.2", "classifier"} <= set(bundle.sites)
    report = SandboxReplayer().load_bundle(out).verify()
    assert report.bit_identical, report.summary()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-m", CNN, "-p", "a seven"], "is an image model (its forward() takes pixel_values"),
        (["-m", "zoo:induction-2l", "--image", "IMAGE"], "takes no image: its forward() takes no pixel_values"),
        (["-m", CNN], "record takes one input: --prompt TEXT for a text model or --image FILE"),
        (["-m", CNN, "-p", "x", "--image", "IMAGE"], "--image FILE for an image model, not both"),
        (["-m", CNN, "--image", "IMAGE", "--benign", "IMAGE", "--predicate", "class_is:0"], "--benign read prompt"),
        (["-m", CNN, "--image", "IMAGE", "--max-new-tokens", "2"], "--max-new-tokens applies to text models"),
        (["-m", CNN, "--image", "missing.npy"], "image file 'missing.npy' does not exist"),
        (["-m", CNN, "--image", "BAD.json"], "not valid JSON"),
        (["-m", CNN, "--image", "BAD.png"], "has suffix '.png'; give a .npy, .safetensors, .json file"),
    ],
)
def test_wrong_input_kind_is_one_line(images: dict[str, Path], tmp_path: Path, args: list[str], expected: str) -> None:
    bad = tmp_path / "BAD.json"
    bad.write_text("[[0.5, 1.0], [0.2")
    (tmp_path / "BAD.png").write_bytes(b"\x89PNG")
    given = {"IMAGE": str(images["patched"]), "BAD.json": str(bad), "BAD.png": str(tmp_path / "BAD.png")}
    result = runner.invoke(app, ["record", *[given.get(a, a) for a in args], "-o", str(tmp_path / "b")])
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (tmp_path / "b").exists()


def test_bad_image_values_name_the_file(tmp_path: Path) -> None:
    ragged = tmp_path / "nan.npy"
    np.save(ragged, np.full((1, 8, 8), np.nan, dtype=np.float32))
    with pytest.raises(ForensicsError, match=r"image file '.*nan.npy': pixel_values hold NaN"):
        read_image(ragged)
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ForensicsError, match="not a readable .npy array of numbers"):
        read_image(objects)
    several = tmp_path / "two.safetensors"
    save_file({"a": torch.zeros(1, 2, 2), "b": torch.zeros(1, 2, 2)}, str(several))
    with pytest.raises(ForensicsError, match="holds 2 tensors"):
        read_image(several)
