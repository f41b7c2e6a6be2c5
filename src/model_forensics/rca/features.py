"""Compressibility features of one activation tensor (pure functions, no I/O).

For x of shape (T, d) (tokens × units):
    compressed_ratio   zlib size of the per-row int8-quantised tensor / its raw size.
                       Low = repetitive, regular computation; an outlier pattern changes it.
    spectral_entropy   H(p) / log(min(T, d)), p_i = σ_i² / Σσ² (σ: singular values of x
                       centred over tokens). 1 = energy spread over many directions.
    topk_energy        Σ of the largest ⌈0.01·n⌉ values of x² / Σ x²: how concentrated the
                       activation is in a few entries (massive activations, outlier neurons).
"""

from __future__ import annotations

import math
import zlib

import torch

FEATURES = ("compressed_ratio", "spectral_entropy", "topk_energy")


def compressed_ratio(x: torch.Tensor) -> float:
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
    q = torch.round(x / scale * 127).to(torch.int8).numpy().tobytes()
    return len(zlib.compress(q, 6)) / max(1, len(q))


def spectral_entropy(x: torch.Tensor) -> float:
    x = x.float()
    if min(x.shape) < 2:
        return 0.0
    s = torch.linalg.svdvals(x - x.mean(dim=0, keepdim=True))
    energy = s.square()
    total = float(energy.sum())
    if total <= 0:
        return 0.0
    p = energy / total
    p = p[p > 0]
    return float(-(p * p.log()).sum()) / math.log(min(x.shape))


def topk_energy(x: torch.Tensor, fraction: float = 0.01) -> float:
    sq = x.float().reshape(-1).square()
    total = float(sq.sum())
    if total <= 0:
        return 0.0
    k = max(1, math.ceil(sq.numel() * fraction))
    return float(sq.topk(k).values.sum()) / total


def features(x: torch.Tensor) -> dict[str, float]:
    """All compressibility features of ``x`` (T, d); extra leading dims are flattened into d."""
    x = x.reshape(x.shape[0], -1)
    return {
        "compressed_ratio": compressed_ratio(x),
        "spectral_entropy": spectral_entropy(x),
        "topk_energy": topk_energy(x),
    }
