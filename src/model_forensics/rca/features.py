"""Compressibility features of one activation tensor (pure functions, no I/O).

For x of shape (T, d) (tokens × units):
    compressed_ratio   zlib size of the per-row int8-quantised tensor / its raw size.
                       Low = repetitive, regular computation; an outlier pattern changes it.
    spectral_entropy   H(p) / log(min(T, d)), p_i = σ_i² / Σσ² (σ: singular values of x
                       centred over tokens). 1 = energy spread over many directions.
    topk_energy        Σ of the largest ⌈0.01·n⌉ values of x² / Σ x²: how concentrated the
                       activation is in a few entries (massive activations, outlier neurons).

The squared singular values are the eigenvalues of the Gram matrix of the smaller side,
x_c x_cᵀ (T, T) when T ≤ d, else x_cᵀ x_c (d, d), formed in float64: no SVD of the full
tensor, and the same numbers as ``svdvals`` up to float32 rounding (tests compare them).
:func:`head_features` computes the features of every head of an ``attn.z`` (T, H, d_head)
with one batched eigendecomposition.
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


def spectral_energies(x: torch.Tensor) -> torch.Tensor:
    """σ² of ``x`` (…, T, d) centred over T: eigenvalues of the smaller-side Gram matrix,
    (…, min(T, d)) in float64, clamped at 0 (rounding makes the smallest slightly negative)."""
    xc = x.double() - x.double().mean(dim=-2, keepdim=True)
    gram = xc @ xc.transpose(-1, -2) if x.shape[-2] <= x.shape[-1] else xc.transpose(-1, -2) @ xc
    return torch.linalg.eigvalsh(gram).clamp_min(0.0)


def _entropy(energy: torch.Tensor, n: int) -> float:
    total = float(energy.sum())
    if total <= 0:
        return 0.0
    p = energy / total
    p = p[p > 0]
    return float(-(p * p.log()).sum()) / math.log(n)


def spectral_entropy(x: torch.Tensor) -> float:
    if min(x.shape) < 2:
        return 0.0
    return _entropy(spectral_energies(x), min(x.shape))


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


def head_features(z: torch.Tensor) -> list[dict[str, float]]:
    """:func:`features` of every head of ``z`` (T, H, d_head), the spectra in one batch."""
    heads = z.float().transpose(0, 1)  # (H, T, d_head)
    n = min(heads.shape[1:])
    energies = spectral_energies(heads) if n >= 2 else None  # (H, n)
    return [
        {
            "compressed_ratio": compressed_ratio(x),
            "spectral_entropy": 0.0 if energies is None else _entropy(energies[h], n),
            "topk_energy": topk_energy(x),
        }
        for h, x in enumerate(heads)
    ]
