"""verify_contents checks that every site decodes to its declared shape without building the
decoded tensor: a bundle whose digests all match but whose top-k indices point outside the
site, or whose int8 scale has the wrong shape, is still reported, site by site."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model_forensics import Bundle, RecorderHooks
from model_forensics.core.bundle import BundleContents, write_bundle
from model_forensics.recorder import hooks as hooks_mod

IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 8, 4]])


def _encoded(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sketch: str) -> tuple[BundleContents, dict]:
    """A recording's contents, with its activations encoded in memory ({entry: tensor})."""
    captured: list[BundleContents] = []
    real = hooks_mod.write_bundle
    monkeypatch.setattr(hooks_mod, "write_bundle", lambda path, c, **kw: captured.append(c) or real(path, c, **kw))
    with RecorderHooks(granularity="layer", sketch=sketch).install_hooks(tiny["llama"].model) as rec, torch.no_grad():
        tiny["llama"].model(input_ids=IDS)
        rec.create_bundle(tmp_path / "reference")
    contents = captured[0]
    entries: dict = {}
    for site in contents.activations.sites():
        entries.update(contents.activations.load(site)[0])
    manifest = Bundle.open(tmp_path / "reference").manifest  # with every site's exact sha256
    return BundleContents(manifest, contents.inputs, contents.outputs, entries, contents.cube, contents.calls), entries


@pytest.mark.parametrize("bad", [-1, "numel"])
def test_top_k_indices_outside_the_site_are_reported(tiny, tmp_path, monkeypatch, bad) -> None:
    contents, entries = _encoded(tiny, tmp_path, monkeypatch, "topk")
    site = next(iter(contents.manifest["sites"]))
    numel = torch.Size(contents.manifest["sites"][site]["shape"]).numel()
    indices = entries[f"{site}::indices"].clone()
    indices[-1] = numel if bad == "numel" else -1
    entries[f"{site}::indices"] = indices
    path = write_bundle(tmp_path / "bad", contents)  # every digest matches what is stored
    assert Bundle.open(path, verify=False).verify_contents() == [
        f"site '{site}': top-k indices fall outside the declared shape {contents.manifest['sites'][site]['shape']}"
    ]


def test_an_int8_scale_of_the_wrong_shape_is_reported(tiny, tmp_path, monkeypatch) -> None:
    contents, entries = _encoded(tiny, tmp_path, monkeypatch, "int8")
    site = next(iter(contents.manifest["sites"]))
    entries[f"{site}::scale"] = entries[f"{site}::scale"].reshape(-1)  # (..., 1) → flat
    path = write_bundle(tmp_path / "bad", contents)
    problems = Bundle.open(path, verify=False).verify_contents()
    assert problems == [
        f"site '{site}': the stored int8 sketch does not match the declared shape "
        + str(contents.manifest["sites"][site]["shape"])
    ]
    assert Bundle.open(tmp_path / "reference", verify=False).verify_contents() == []
