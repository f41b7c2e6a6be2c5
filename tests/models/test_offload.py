"""Models larger than memory: accelerate places layers on disk, and what is recorded from
the offloaded model equals what the same model records loaded whole into memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model_forensics import Bundle, RecorderHooks
from model_forensics.core.errors import ModelLoadError
from model_forensics.models.loading import load

IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 8, 4]])


def _recorded(model: torch.nn.Module, out: Path) -> tuple[dict[str, torch.Tensor], Bundle]:
    with RecorderHooks(granularity="all", max_bundle_size_mb=1e6).install_hooks(model) as rec, torch.no_grad():
        model(input_ids=IDS)
        return rec.recorded(), Bundle.open(rec.create_bundle(out))


def test_disk_offload_records_the_same_activations(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    whole = load(str(tiny_dirs["llama"]))
    # ~40 KB of CPU memory: the embeddings fit, the blocks and the head go to disk.
    offloaded = load(
        str(tiny_dirs["llama"]), device_map="auto", offload_dir=tmp_path / "off", max_memory={"cpu": 40_000}
    )
    placed = set(offloaded.model.hf_device_map.values())
    assert "disk" in placed, offloaded.model.hf_device_map
    (expected, whole_bundle), (got, bundle) = (
        _recorded(whole.model, tmp_path / "a"),
        _recorded(offloaded.model, tmp_path / "b"),
    )
    assert set(got) == set(expected) and len(got) > 10
    for site, tensor in expected.items():
        assert torch.equal(got[site], tensor), site
    # the weights digest is read from the offload: the same weights give the same digest
    assert bundle.manifest["model"]["weights_sha256"] == whole_bundle.manifest["model"]["weights_sha256"]
    assert bundle.verify_contents() == []


def test_a_model_that_does_not_fit_is_refused_with_the_numbers(tiny_dirs: dict[str, Path]) -> None:
    with pytest.raises(
        ModelLoadError, match=r"needs 0\.\d+ GiB .* the devices hold 0\.00 GiB \(cpu 0\.00 GiB\).*--offload-dir"
    ):
        load(str(tiny_dirs["llama"]), device_map="auto", max_memory={"cpu": 1000})


def test_an_unknown_device_map_is_refused(tiny_dirs: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match="device_map 'everywhere' is unknown"):
        load(str(tiny_dirs["llama"]), device_map="everywhere")


def test_cli_record_refuses_an_unknown_device_map_with_exit_2(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from model_forensics.cli import app

    args = ["record", "--model", str(tiny_dirs["llama"]), "--prompt", "hi", "--out", str(tmp_path / "b")]
    result = CliRunner().invoke(app, [*args, "--device-map", "everywhere", "--offload-dir", str(tmp_path / "off")])
    assert result.exit_code == 2, result.output
    assert "device_map 'everywhere' is unknown" in result.output
    assert "Traceback" not in result.output
