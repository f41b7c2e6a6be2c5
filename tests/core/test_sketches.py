import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from model_forensics.core import digests, sketches

shapes = st.lists(st.integers(1, 6), min_size=1, max_size=3)


def _tensor(shape: list[int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 3


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 10_000))
def test_full_is_exact(shape: list[int], seed: int) -> None:
    x = _tensor(shape, seed)
    enc = sketches.encode("s", x, "full", 0.1)
    assert torch.equal(sketches.decode("s", enc, "full", tuple(x.shape), x.dtype), x)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 10_000))
def test_fp16_relative_error_bound(shape: list[int], seed: int) -> None:
    x = _tensor(shape, seed)
    y = sketches.decode("s", sketches.encode("s", x, "fp16", 0.1), "fp16", tuple(x.shape), x.dtype)
    assert torch.all((y - x).abs() <= x.abs() * 2**-11 + 6e-8)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 10_000))
def test_int8_absmax_bound(shape: list[int], seed: int) -> None:
    x = _tensor(shape, seed)
    y = sketches.decode("s", sketches.encode("s", x, "int8", 0.1), "int8", tuple(x.shape), x.dtype)
    scale = x.abs().amax(dim=-1, keepdim=True)
    assert torch.all((y - x).abs() <= scale / 254 + 1e-6)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 10_000), ratio=st.floats(0.05, 1.0))
def test_topk_keeps_largest_exactly(shape: list[int], seed: int, ratio: float) -> None:
    x = _tensor(shape, seed)
    y = sketches.decode("s", sketches.encode("s", x, "topk", ratio), "topk", tuple(x.shape), x.dtype)
    kept = y != 0
    assert int(kept.sum()) <= sketches.topk_count(x.numel(), ratio)
    assert torch.equal(y[kept], x[kept])
    if (~kept).any() and kept.any():
        assert x[~kept].abs().max() <= x[kept].abs().min()


def test_encoded_size_matches_what_is_written() -> None:
    x = torch.randn(2, 5, 8)
    for kind in sketches.SKETCHES:
        enc = sketches.encode("s", x, kind, 0.25)
        written = sum(t.numel() * t.element_size() for t in enc.values())
        assert written == sketches.encoded_nbytes(tuple(x.shape), x.dtype, kind, 0.25), kind


@pytest.mark.parametrize("algorithm", digests.ALGORITHMS)
def test_digest_depends_on_exact_bits(algorithm: str) -> None:
    x = torch.randn(4, 4)
    y = x.clone()
    y[0, 0] = torch.nextafter(y[0, 0], torch.tensor(10.0))
    assert digests.tensor_digest(x, algorithm) == digests.tensor_digest(x.clone(), algorithm)
    assert digests.tensor_digest(x, algorithm) != digests.tensor_digest(y, algorithm)
