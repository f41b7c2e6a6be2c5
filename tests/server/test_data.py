"""The data layer against the bundle's own contents: cube slices are the ActivityCube's values,
attention is the recorded pattern, a recomputed pattern equals the recorded one."""

from __future__ import annotations

import pytest
import torch

from model_forensics import ActivityCube, Bundle
from model_forensics.server import data
from model_forensics.server.security import BadParameter, NotFound


def test_cube_slice_equals_the_activity_cube(served) -> None:
    bundle = Bundle.open(served["incident"])
    cube = ActivityCube.from_json(bundle.cube())
    for metric in ("energy", "mean_activation", "std_activation"):
        got = data.cube_slice(bundle, metric)
        assert got.layers == [la.layer_index for la in cube.layers]
        assert got.tokens == cube.tokens
        assert got.values == [la.core_metrics[metric] for la in cube.layers]
        assert not got.downsampled and got.site_kind == "resid"


def test_cube_slice_pages_tokens_and_thins_layers(served) -> None:
    bundle = Bundle.open(served["incident"])
    cube = ActivityCube.from_json(bundle.cube())
    got = data.cube_slice(bundle, "energy", max_tokens=4, token_offset=3, max_layers=1)
    assert got.positions == [3, 4, 5, 6] and got.tokens == cube.tokens[3:7]
    assert got.layers == [cube.layers[0].layer_index]
    assert got.values == [cube.layers[0].core_metrics["energy"][3:7]]
    assert got.downsampled and "tokens 3–6 of" in got.note and "1 of 2 layers" in got.note
    with pytest.raises(BadParameter, match="metric 'nope'.*energy"):
        data.cube_slice(bundle, "nope")
    with pytest.raises(BadParameter, match="offset 99"):
        data.cube_slice(bundle, "energy", token_offset=99)


def test_evenly_spaced_keeps_first_and_last() -> None:
    assert data.evenly_spaced(30, 4) == [0, 10, 19, 29]
    assert data.evenly_spaced(3, 8) == [0, 1, 2]


def test_attention_is_the_recorded_pattern(served) -> None:
    bundle = Bundle.open(served["incident"])
    for layer in (0, 1):
        pattern = bundle.activation(f"blocks.{layer}.attn.pattern")[0]  # (H, T, T)
        for head in range(pattern.shape[0]):
            got = data.attention(bundle, layer, head)
            assert got.source == "recorded" and got.heads == pattern.shape[0]
            assert got.matrix == pattern[head].tolist()
    window = data.attention(bundle, 1, 2, max_tokens=3, offset=2)
    assert window.matrix == pattern[2, 2:5, 2:5].tolist() and window.downsampled
    with pytest.raises(BadParameter, match="head 9"):
        data.attention(bundle, 0, 9)
    with pytest.raises(NotFound, match="layer 7"):
        data.attention(bundle, 7, 0)


@pytest.mark.parametrize("key", ["incident", "llama"])
def test_recomputed_pattern_equals_the_recorded_one(served, key) -> None:
    # gpt2: plain causal softmax(q kᵀ/√d); llama (GQA, 4 query heads on 2 kv heads): rotary first.
    bundle = Bundle.open(served[key])
    for layer in range(data.n_layers(bundle)):
        recorded = bundle.activation(f"blocks.{layer}.attn.pattern")[0]
        torch.testing.assert_close(data.recompute_pattern(bundle, layer), recorded, atol=1e-5, rtol=1e-4)


def test_gqa_heads_are_labelled_with_their_kv_group(served) -> None:
    bundle = Bundle.open(served["llama"])
    assert data.head_counts(bundle) == (4, 2)
    assert [data.attention(bundle, 0, h).kv_group for h in range(4)] == [0, 0, 1, 1]


def test_compare_is_b_minus_a_over_shared_positions(served) -> None:
    a, b = Bundle.open(served["incident"]), Bundle.open(served["baseline"])
    got = data.compare(a, b, "energy")
    ca, cb = ActivityCube.from_json(a.cube()), ActivityCube.from_json(b.cube())
    n = min(len(ca.tokens), len(cb.tokens))
    assert got.a == [la.core_metrics["energy"][:n] for la in ca.layers]
    assert got.b == [la.core_metrics["energy"][:n] for la in cb.layers]
    assert got.diff == [[y - x for x, y in zip(ra, rb, strict=True)] for ra, rb in zip(got.a, got.b, strict=True)]
    assert "b − a" in got.note


def test_corrupt_bundles_are_listed_with_their_reason(served) -> None:
    paths = data.find_bundles(served["root"])
    assert served["corrupt"] in paths and served["incident"] in paths and served["llama"] in paths
    summary = data.bundle_summary(served["root"], served["corrupt"])
    assert summary.error and "manifest.json" in summary.error and summary.model is None
    good = data.bundle_summary(served["root"], served["incident"])
    assert good.error is None and good.verified is True and good.predicate_result is True
    assert good.model == "zoo:gpt2-injection" and good.output == "HACKED"


def test_a_modified_bundle_is_not_verified(served, tmp_path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(served["baseline"], copy)
    raw = bytearray((copy / "activations.safetensors").read_bytes())
    raw[-1] ^= 1  # same size, other bytes
    (copy / "activations.safetensors").write_bytes(bytes(raw))
    assert data.bundle_summary(tmp_path, copy).verified is False
