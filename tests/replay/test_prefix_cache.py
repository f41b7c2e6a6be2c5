"""The sweep's prefix cache: the last inputs' clean prefixes that fit its budget, first in, first out."""

from __future__ import annotations

from types import SimpleNamespace

from model_forensics import Intervention, SandboxReplayer
from model_forensics.replay.sweep import PrefixCache


def test_the_cache_keeps_the_last_inputs_first_in_first_out():
    cache = PrefixCache(max_mb=2.5)  # room for two prefixes of 1 MB
    a, b, c = (SimpleNamespace(nbytes=2**20) for _ in range(3))
    cache.add((1,), a)  # type: ignore[arg-type]
    cache.add((2,), b)  # type: ignore[arg-type]
    assert cache.get((1,)) is a  # a hit does not make an entry younger
    cache.add((3,), c)  # type: ignore[arg-type]
    assert cache.get((1,)) is None and cache.get((2,)) is b and cache.get((3,)) is c
    assert len(cache) == 2 and cache.usable is None


def test_a_model_whose_blocks_cannot_be_reentered_is_found_out_once(bundles, lms):
    s = SandboxReplayer().load_bundle(bundles["bert"], model=lms["bert"])
    sets = [[Intervention(f"blocks.1.attn.head.{h}", "zero")] for h in range(s.adapter.n_heads)]
    first = s.sweep(sets)  # a classifier: the clean capture shows its scores have no token axis
    assert not first.shared_prefix and first.batches == 1 and first.forward_passes == 2
    again = s.sweep(sets)  # remembered: no second capture
    assert not again.shared_prefix and again.forward_passes == again.batches == 1
