"""Sketches: how an activation tensor is stored in a bundle (the "KV sketcher").

``full``  exact copy.
``fp16``  half precision; relative error ≤ 2⁻¹¹ for normal values.
``int8``  per-channel absmax over the last dimension: q = round(x / s · 127), s = max|x| per
          channel; absolute error ≤ s / 254 per entry.
``topk``  the largest ``compression_ratio`` fraction of entries by magnitude (flat indices
          int64 + values in the original dtype); the rest decode as 0, so the error of an
          entry is 0 if kept and |x| otherwise.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch

SKETCHES = ("full", "fp16", "int8", "topk")


def tensor_bytes(tensor: torch.Tensor) -> Any:
    """The exact bytes of a CPU tensor (contiguous, native dtype) as a flat uint8 array that
    shares the tensor's memory: hashed or written without a copy."""
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


def encoded_nbytes(shape: tuple[int, ...], dtype: torch.dtype, sketch: str, compression_ratio: float) -> int:
    """Bytes a sketch of a tensor with this shape takes (what the size cap counts)."""
    numel = math.prod(shape)
    itemsize = dtype.itemsize
    if sketch == "full":
        return numel * itemsize
    if sketch == "fp16":
        return numel * 2
    if sketch == "int8":
        channels = numel // shape[-1] if shape and shape[-1] else 1
        return numel + channels * 4
    k = topk_count(numel, compression_ratio)
    return k * (itemsize + 8)


def encoded_specs(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, sketch: str, compression_ratio: float
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The entries :func:`encode` makes for a tensor of this shape and dtype, as
    ``{entry name: (dtype, shape)}``, without encoding anything (a streaming writer lays out
    the file's header from it before the first site is loaded)."""
    if sketch == "full":
        return {name: (dtype, shape)}
    if sketch == "fp16":
        return {name: (torch.float16, shape)}
    if sketch == "int8":
        return {name: (torch.int8, shape), f"{name}::scale": (torch.float32, (*shape[:-1], 1))}
    if sketch == "topk":
        k = topk_count(math.prod(shape), compression_ratio)
        return {f"{name}::indices": (torch.int64, (k,)), f"{name}::values": (dtype, (k,))}
    raise ValueError(f"unknown sketch '{sketch}'; use one of {SKETCHES}")


def topk_count(numel: int, compression_ratio: float) -> int:
    return max(1, math.ceil(numel * compression_ratio)) if numel else 0


def encode(name: str, tensor: torch.Tensor, sketch: str, compression_ratio: float) -> dict[str, torch.Tensor]:
    """Encode one tensor into safetensors entries keyed ``name`` / ``name::part``."""
    t = tensor.detach().contiguous()
    if sketch == "full":
        return {name: t}
    if sketch == "fp16":
        return {name: t.to(torch.float16)}
    if sketch == "int8":
        x = t.float()
        scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)  # (..., 1)
        q = x / scale  # round(x / s · 127), in place: the same operations, one temporary
        q.mul_(127).round_()
        return {name: q.to(torch.int8), f"{name}::scale": scale.contiguous()}
    if sketch == "topk":
        flat = t.reshape(-1)
        k = topk_count(flat.numel(), compression_ratio)
        indices = largest_indices(flat.abs().float(), k)
        return {f"{name}::indices": indices.to(torch.int64), f"{name}::values": flat[indices].contiguous()}
    raise ValueError(f"unknown sketch '{sketch}'; use one of {SKETCHES}")


def largest_indices(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """The flat indices (int64, ascending) of the ``k`` largest entries of a 1-D float
    tensor: exactly ``magnitude.topk(k).indices.sort().values``.

    The k-th largest value v comes from one O(n) selection (numpy's introselect), over only
    the entries above a guess below v when a sample gives one (:func:`_below_kth`); when
    exactly k entries are ≥ v and none is NaN, they are the set topk picks, and their
    indices come out ascending. Otherwise (ties straddle v, a NaN, a tensor off the CPU)
    topk itself decides which of the equal entries it keeps, as before."""
    n = magnitude.numel()
    if 0 < k <= n and magnitude.device.type == "cpu":
        values = magnitude.numpy()
        if not np.isnan(values.max()):
            chosen = _at_least_kth(values, k)
            if chosen.size == k:
                return torch.from_numpy(chosen.astype(np.int64, copy=False))
    return magnitude.topk(k).indices.sort().values


_SAMPLE = 4096  # entries a guess of the k-th largest value is read from


def _at_least_kth(values: Any, k: int) -> Any:
    """The ascending indices of the entries of ``values`` (1-D, no NaN) that are ≥ its k-th
    largest value. The selection runs over the candidates ≥ a guess when at least k are (then
    the k-th largest of the candidates is the k-th largest of all), else over every entry."""
    candidates = None
    guess = _below_kth(values, k)
    if guess is not None:
        candidates = np.flatnonzero(values >= guess)
        if candidates.size < k:  # the guess was above v: select over everything
            candidates = None
    pool = values if candidates is None else values[candidates]
    threshold = np.partition(pool, pool.size - k)[pool.size - k]
    if candidates is None:
        return np.flatnonzero(values >= threshold)
    return candidates[pool >= threshold]


def _below_kth(values: Any, k: int) -> Any:
    """A value likely below the k-th largest of ``values``, read from a fixed sample of
    :data:`_SAMPLE` entries with a margin of four standard deviations (None: the tensor is
    small, or k too large a share of it, for a guess to save work). Only the speed depends
    on it: a guess above the k-th largest sends :func:`_at_least_kth` to the full selection."""
    n = values.size
    if n < 8 * _SAMPLE or k > n // 4:
        return None
    sample = values[_sample_index(n)]
    expected = _SAMPLE * k / n
    want = min(_SAMPLE, math.ceil(expected + 4 * math.sqrt(expected) + 8))
    return np.partition(sample, _SAMPLE - want)[_SAMPLE - want]


@functools.lru_cache(maxsize=64)
def _sample_index(n: int) -> Any:
    """A fixed pseudo-random sample of positions in ``range(n)`` (the same for every tensor
    of ``n`` entries, so a guess does not depend on the run)."""
    return np.random.default_rng(n).integers(0, n, _SAMPLE)


def decode(
    name: str, entries: dict[str, torch.Tensor], sketch: str, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of :func:`encode` (exact for ``full``, within the documented bound otherwise)."""
    if sketch == "full":
        return entries[name]
    if sketch == "fp16":
        return entries[name].to(dtype)
    if sketch == "int8":
        return (entries[name].float() / 127 * entries[f"{name}::scale"]).to(dtype)
    if sketch == "topk":
        out = torch.zeros(math.prod(shape), dtype=dtype)
        out[entries[f"{name}::indices"]] = entries[f"{name}::values"].to(dtype)
        return out.reshape(shape)
    raise ValueError(f"unknown sketch '{sketch}'; use one of {SKETCHES}")
