"""Streaming record: steps past ``recorder.memory_budget_mb`` go to a spool file on disk, and
the bundle written from the spool is byte for byte the one an all-in-RAM recording writes."""

from __future__ import annotations

import gc
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from model_forensics import Bundle, RecorderHooks
from model_forensics.core import digests, sketches
from model_forensics.recorder.spool import ActivationSpool, joined_shape

IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 8, 4]])
DATA_FILES = ("inputs.safetensors", "outputs.safetensors", "activations.safetensors", "calls.jsonl")


def _digests(path: Path) -> dict[str, str]:
    return {name: hashlib.sha256((path / name).read_bytes()).hexdigest() for name in DATA_FILES}


def _record(loaded, path: Path, sketch: str, budget_mb: float, spool: Path, generate: bool) -> RecorderHooks:
    rec = RecorderHooks(
        {"recorder": {"memory_budget_mb": budget_mb, "spool_dir": str(spool)}}, granularity="all", sketch=sketch
    )
    with rec.install_hooks(loaded.model), torch.no_grad():
        if generate:
            rec.generate({"input_ids": IDS}, max_new_tokens=3, do_sample=False)
        else:
            loaded.model(input_ids=IDS)
        rec.create_bundle(path)
    return rec


@pytest.mark.parametrize("sketch", ["full", "fp16", "int8", "topk"])
@pytest.mark.parametrize("generate", [False, True], ids=["forward", "generate"])
def test_a_streamed_bundle_is_byte_identical_to_an_in_memory_one(tiny, tmp_path: Path, sketch, generate) -> None:
    loaded = tiny["llama"]
    spool = tmp_path / "spool"
    spool.mkdir()
    ram = _record(loaded, tmp_path / "ram", sketch, 1024, spool, generate)
    disk = _record(loaded, tmp_path / "disk", sketch, 0, spool, generate)
    assert ram._spool.spilled_bytes == 0 and ram._spool.held_bytes > 0
    assert disk._spool.held_bytes == 0 and disk._spool.spilled_bytes == ram._spool.held_bytes
    assert _digests(tmp_path / "disk") == _digests(tmp_path / "ram")
    a, b = Bundle.open(tmp_path / "ram"), Bundle.open(tmp_path / "disk")
    assert a.manifest["sites"] == b.manifest["sites"]
    assert a.manifest["files"]["activations.safetensors"] == b.manifest["files"]["activations.safetensors"]
    assert {**a.cube(), "meta": None} == {**b.cube(), "meta": None}  # the cube's summaries are equal
    assert b.verify_contents() == []
    for site in a.sites:  # the exact digest in the manifest is of the exact tensor, whatever the sketch
        assert a.manifest["sites"][site]["sha256"] == digests.tensor_digest(ram.recorded()[site], a.hash)


def test_a_budget_bounds_what_the_recorder_holds_in_ram(tiny, tmp_path: Path) -> None:
    loaded = tiny["gpt2"]
    budget_mb = 0.01
    rec = RecorderHooks({"recorder": {"memory_budget_mb": budget_mb, "spool_dir": str(tmp_path)}}, granularity="all")
    with rec.install_hooks(loaded.model), torch.no_grad():
        loaded.model(input_ids=IDS)
    spool = rec._spool
    assert 0 < spool.held_bytes <= budget_mb * 1024 * 1024
    assert spool.spilled_bytes > spool.held_bytes  # most of the recording went to disk
    folders = list(tmp_path.glob("mf-spool-*"))
    assert len(folders) == 1 and (folders[0] / "steps.bin").stat().st_size == spool.spilled_bytes
    rec.reset()  # a new recording: the old spool's directory goes with it
    del spool
    gc.collect()
    assert list(tmp_path.glob("mf-spool-*")) == []


def test_spools_left_by_killed_recordings_are_removed_by_the_next_one(tmp_path: Path) -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # a process that is gone
    stale, alive, other = tmp_path / f"mf-spool-{pid}-abc", tmp_path / f"mf-spool-{os.getpid()}-def", tmp_path / "x"
    for folder in (stale, alive, other):
        folder.mkdir()
        (folder / "steps.bin").write_bytes(b"old")
    spool = ActivationSpool(budget_bytes=0, directory=tmp_path)
    spool.add("embed", torch.ones(1, 2, 3))
    assert not stale.exists() and alive.exists() and other.exists()
    spool.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other.name])


def test_a_spilled_step_reads_back_exactly() -> None:
    spool = ActivationSpool(budget_bytes=0)
    steps = [torch.randn(1, 3, 4), torch.randn(1, 1, 4).to(torch.bfloat16).float(), torch.randn(1, 2, 4)]
    pattern = [torch.rand(1, 2, 3, 3), torch.rand(1, 2, 1, 4)]
    for step in steps:
        spool.add("blocks.0.mlp", step)
    for step in pattern:
        spool.add("blocks.0.attn.pattern", step)
    spool.add("embed", torch.arange(6).reshape(1, 6)[:, ::2])  # not contiguous
    assert torch.equal(spool.load("blocks.0.mlp"), torch.cat(steps, dim=1))
    padded = torch.cat([pattern[0], torch.zeros(1, 2, 3, 1)], dim=3)
    assert torch.equal(spool.load("blocks.0.attn.pattern"), torch.cat([padded, pattern[1]], dim=2))
    assert (
        spool.shape("blocks.0.attn.pattern")
        == (1, 2, 4, 4)
        == joined_shape("x.attn.pattern", [(1, 2, 3, 3), (1, 2, 1, 4)])
    )
    assert torch.equal(spool.load("embed"), torch.tensor([[0, 2, 4]]))
    spool.close()


@pytest.mark.parametrize("sketch", ["full", "fp16", "int8", "topk"])
def test_encoded_specs_are_what_encode_makes(sketch: str) -> None:
    for shape in [(1, 5, 8), (2, 3), (1, 2, 4, 4)]:
        tensor = torch.randn(shape)
        made = sketches.encode("s", tensor, sketch, 0.3)
        assert sketches.encoded_specs("s", shape, tensor.dtype, sketch, 0.3) == {
            k: (v.dtype, tuple(v.shape)) for k, v in made.items()
        }


def test_the_recorder_settings_in_the_manifest_leave_out_the_spool_dir(tiny, tmp_path: Path) -> None:
    rec = _record(tiny["gpt2"], tmp_path / "b", "fp16", 0, tmp_path, generate=False)
    recorder = json.loads((tmp_path / "b" / "manifest.json").read_text())["recorder"]
    assert recorder["memory_budget_mb"] == 0 and "spool_dir" not in recorder
    assert rec.config.spool_dir == str(tmp_path)
