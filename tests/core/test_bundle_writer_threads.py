"""The bundle writer loads, encodes, hashes and writes each site in the calling thread (only
the disk's writeback runs in a thread): a site that fails to load fails the write as a
whole, with the site's own error, and leaves nothing behind."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from model_forensics import Bundle, BundleError, RecorderHooks
from model_forensics.core.bundle import BundleContents, write_bundle
from model_forensics.recorder import hooks as hooks_mod

IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 8, 4]])


def _contents(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> BundleContents:
    """What create_bundle hands to write_bundle for an int8 recording of every site."""
    captured: list[BundleContents] = []
    real = hooks_mod.write_bundle
    monkeypatch.setattr(hooks_mod, "write_bundle", lambda path, c, **kw: captured.append(c) or real(path, c, **kw))
    with RecorderHooks(granularity="all", sketch="int8").install_hooks(tiny["llama"].model) as rec, torch.no_grad():
        tiny["llama"].model(input_ids=IDS)
        rec.create_bundle(tmp_path / "reference")
    return captured[0]


class _Failing:
    """A site source that fails on its third site, and notes which threads loaded sites."""

    def __init__(self, source: Any):
        self.source, self.threads = source, set()
        self.failing = source.sites()[2]

    def sites(self) -> list[str]:
        return self.source.sites()

    def specs(self, site: str) -> Any:
        return self.source.specs(site)

    def load(self, site: str) -> Any:
        self.threads.add(threading.current_thread().name)
        if site == self.failing:
            raise OSError(28, "No space left on device")
        return self.source.load(site)


def test_a_site_failing_to_load_fails_the_write_and_leaves_nothing(tiny, tmp_path, monkeypatch) -> None:
    contents = _contents(tiny, tmp_path, monkeypatch)
    failing = _Failing(contents.activations)
    out = tmp_path / "out"
    with pytest.raises(BundleError, match="the disk is full.*nothing was written"):
        write_bundle(out / "b", BundleContents(**{**vars(contents), "activations": failing}))
    assert list(out.iterdir()) == []
    assert failing.threads == {threading.current_thread().name}  # no encoding pool
    again = write_bundle(out / "b", contents)  # the same contents, written whole
    assert Bundle.open(again).digest == Bundle.open(tmp_path / "reference").digest
