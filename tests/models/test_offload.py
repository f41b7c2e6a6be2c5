"""Models larger than memory: accelerate places layers on disk, what is recorded from the
offloaded model equals what the same model records loaded whole into memory, and a bundle
recorded offloaded replays bit-identical, offloaded again or whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model_forensics import Bundle, RecorderHooks, token_is
from model_forensics.core.errors import ForensicsError, ModelLoadError
from model_forensics.models.loading import load
from model_forensics.replay import Intervention, SandboxReplayer

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


def test_offloaded_recording_replays_bit_identical(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    budget = {"cpu": 40_000}  # as above: the blocks and the head on disk
    offloaded = load(str(tiny_dirs["llama"]), device_map="auto", offload_dir=tmp_path / "off", max_memory=budget)
    with torch.no_grad():
        failing = int(offloaded.model(input_ids=IDS).logits[0, -1].argmax())
    with RecorderHooks(granularity="all").install_hooks(offloaded.model) as rec, torch.no_grad():
        offloaded.model(input_ids=IDS)
        path = rec.create_bundle(tmp_path / "incident", predicate=token_is(failing))
    replayer = SandboxReplayer()
    again = replayer.load_bundle(path, device_map="auto", offload_dir=tmp_path / "off2", max_memory=budget)
    whole = replayer.load_bundle(path)
    assert "disk" in set(again.model.hf_device_map.values()) and not hasattr(whole.model, "hf_device_map")
    for session in (again, whole):
        report = session.verify()
        assert report.bit_identical and len(report.sites) > 10, report.summary()
    # a sweep over block 1 shares the clean prefix (the blocks are re-entered from disk)
    sets = [[Intervention(site=f"blocks.1.attn.head.{h}", kind="zero")] for h in range(4)]
    sets += [[Intervention(site="blocks.1.mlp", kind="scale", value=v)] for v in (0.0, 2.0)]
    got, expected = again.sweep(sets), whole.sweep(sets)
    assert got.shared_prefix and expected.shared_prefix
    for ours, theirs in zip(got, expected, strict=True):
        assert torch.equal(ours.logits, theirs.logits) and ours.flipped == theirs.flipped
    clean = again.run().logits
    assert all(not torch.equal(run.logits, clean) for run in got)  # every intervention reached the model


def test_replay_placement_options_that_clash_are_refused(tmp_path: Path) -> None:
    replayer, path = SandboxReplayer(), tmp_path / "b"  # refused before the bundle is read
    with pytest.raises(ForensicsError, match="cannot be combined with device"):
        replayer.load_bundle(path, device_map="auto", device="cpu")
    with pytest.raises(ForensicsError, match="pass device_map='auto' too"):
        replayer.load_bundle(path, offload_dir=tmp_path / "off")


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


def test_cli_replay_places_the_model_with_accelerate(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from model_forensics.cli import app
    from model_forensics.models import zoo

    bundle = tmp_path / "b"
    directory = str(zoo.ZOO_DIR / "gpt2-injection")  # a model directory with a tokenizer
    record = ["record", "--model", directory, "--prompt", "translate : hello =>", "--out", str(bundle)]
    assert CliRunner().invoke(app, record).exit_code == 0
    placed = ["replay", str(bundle), "--device-map", "auto", "--offload-dir", str(tmp_path / "off"), "--json"]
    result = CliRunner().invoke(app, placed)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["verify"]["bit_identical"] is True
    clash = CliRunner().invoke(app, [*placed[:-1], "--dtype", "float16"])
    assert clash.exit_code == 2 and "cannot be combined with dtype" in clash.output, clash.output


def test_offloaded_weights_are_hashed_once_per_recorder(
    tiny_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from model_forensics.recorder import hooks

    offloaded = load(
        str(tiny_dirs["llama"]), device_map="auto", offload_dir=tmp_path / "off", max_memory={"cpu": 40_000}
    )
    calls: list[int] = []
    real = hooks.weights_sha256
    monkeypatch.setattr(hooks, "weights_sha256", lambda model: calls.append(1) or real(model))
    with RecorderHooks(granularity="layer").install_hooks(offloaded.model) as rec, torch.no_grad():
        before = rec._weights_sha256()
        offloaded.model(input_ids=IDS)  # accelerate swaps every offloaded weight in and out again
        path = rec.create_bundle(tmp_path / "b")
    assert len(calls) == 1 and Bundle.open(path).manifest["model"]["weights_sha256"] == before
