"""The fast sketch encoders give exactly the entries of the plain algorithm: int8 as
round(x / s · 127) with fresh temporaries, topk as ``topk(k).indices.sort()``; ties that
straddle the threshold, NaN and infinities included (the fast top-k hands those to topk)."""

from __future__ import annotations

import math

import pytest
import torch

from model_forensics.core import sketches


def _plain(name: str, t: torch.Tensor, sketch: str, ratio: float) -> dict[str, torch.Tensor]:
    """Entries as the writer made them before the fast encoders."""
    if sketch == "int8":
        x = t.float()
        scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return {name: torch.round(x / scale * 127).to(torch.int8), f"{name}::scale": scale.contiguous()}
    flat = t.reshape(-1)
    indices = flat.abs().float().topk(sketches.topk_count(flat.numel(), ratio)).indices.sort().values
    return {f"{name}::indices": indices.to(torch.int64), f"{name}::values": flat[indices].contiguous()}


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sparse = torch.randn(40, 30, generator=g)
    sparse[sparse.abs() < 0.7] = 0.0  # many exact zeros: ties at the threshold
    odd = torch.randn(20, 30, generator=g)
    odd[3, 4], odd[5, 6], odd[7, 8] = float("nan"), float("inf"), -float("inf")
    return {
        "float32": torch.randn(3, 17, 64, generator=g),
        "float16": torch.randn(5, 48, generator=g).half(),
        "bfloat16": torch.randn(5, 48, generator=g).bfloat16(),
        "float64": torch.randn(5, 48, generator=g).double(),
        "ties": torch.randn(30, 40, generator=g).round(),  # small integers: many equal magnitudes
        "sparse": sparse,
        "signed zeros": torch.tensor([[1.0, -1.0, 1.0, 2.0, 0.0, -0.0]]),
        "nan and inf": odd,
        "causal pattern": torch.softmax(torch.randn(2, 3, 16, 16, generator=g), -1).tril(),
        "one entry": torch.ones(1, 1),
        "empty": torch.empty(0, 5),
    }


@pytest.mark.parametrize("sketch", ["int8", "topk"])
@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("case", list(_cases()))
def test_fast_encode_equals_the_plain_algorithm(sketch: str, ratio: float, case: str) -> None:
    tensor = _cases()[case]
    fast, plain = sketches.encode("s", tensor, sketch, ratio), _plain("s", tensor, sketch, ratio)
    assert list(fast) == list(plain)
    for key in plain:
        assert (fast[key].dtype, fast[key].shape) == (plain[key].dtype, plain[key].shape), key
        assert _bits(fast[key]) == _bits(plain[key]), key


def test_largest_indices_falls_back_to_topk_on_straddling_ties() -> None:
    magnitude = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0, 2.0])  # k = 2: one of three 2.0s
    assert sketches.largest_indices(magnitude, 2).tolist() == magnitude.topk(2).indices.sort().values.tolist()
    assert sketches.largest_indices(magnitude, 4).tolist() == [0, 2, 3, 5]  # the 2.0s fit exactly


def test_largest_indices_on_a_site_sized_tensor_matches_topk() -> None:
    x = torch.randn(128 * 1536, generator=torch.Generator().manual_seed(1)).abs()
    k = math.ceil(x.numel() * 0.1)
    assert torch.equal(sketches.largest_indices(x, k), x.topk(k).indices.sort().values)


def test_largest_indices_selects_among_the_entries_above_the_sampled_guess() -> None:
    x = torch.randn(128 * 1536, generator=torch.Generator().manual_seed(2)).abs()
    k = math.ceil(x.numel() * 0.1)
    guess = sketches._below_kth(x.numpy(), k)
    assert guess is not None and k <= int((x >= guess).sum()) < 2 * k  # the guess path, with few candidates
    assert torch.equal(sketches.largest_indices(x, k), x.topk(k).indices.sort().values)


def test_largest_indices_when_the_sample_guesses_above_the_kth_largest() -> None:
    # every sampled position holds a large value: the guess lands above the k-th largest, so
    # too few entries pass it and the selection runs over all of them
    x = torch.rand(16 * 4096, generator=torch.Generator().manual_seed(3))
    x[torch.from_numpy(sketches._sample_index(x.numel()))] = 10.0 + torch.rand(4096)
    k = math.ceil(x.numel() * 0.2)
    guess = sketches._below_kth(x.numpy(), k)
    assert guess is not None and int((x >= guess).sum()) < k
    assert torch.equal(sketches.largest_indices(x, k), x.topk(k).indices.sort().values)
