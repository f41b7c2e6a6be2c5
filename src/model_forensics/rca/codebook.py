"""Relative compression: how many bits a unit's benign codebook misses on an activation.

Per unit group (a site's output, one head's slice of ``attn.z``, an MLP's ``post``), the
benign token vectors x (d,) are summarised by a low-rank codebook — their mean μ and the
top-k principal directions P (d, k) that keep ``variance`` of the benign variance — and
by a Gaussian of the residual r = (I − P Pᵀ)(x − μ), one variance σ²_j per dimension
fitted on the same benign tokens. The description length of a token under the codebook
is the residual's code length

    bits(x) = Σ_j [ r_j² / (2 σ²_j ln 2) + ½ log₂(2π σ²_j) ]

(per dimension j for a ``per_dim`` group: an MLP neuron's bits), and a run's bits are the
mean over its ``TOP_TOKENS`` worst-reconstructed tokens (a trigger lives in a few tokens;
a mean over the whole prompt dilutes it). Everything here is pure tensor math; the
calibration against benign runs is in :mod:`~model_forensics.rca.compression`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TOP_TOKENS = 0.25  # fraction of a run's tokens (at least one) whose bits make its score


@dataclass
class Moments:
    """Running sums of benign token vectors of a group of B units of width d, shifted by
    the first batch's mean so that float32 sums stay exact enough."""

    shift: torch.Tensor  # (B, d)
    count: int
    total: torch.Tensor  # (B, d) Σ (x − shift)
    outer: torch.Tensor  # (B, d, d) Σ (x − shift)(x − shift)ᵀ

    @classmethod
    def of(cls, x: torch.Tensor) -> Moments:
        """Start from one run's tokens ``x`` (B, T, d)."""
        shift = x.float().mean(dim=1)
        moments = cls(shift, 0, torch.zeros_like(shift), shift.new_zeros(*shift.shape, shift.shape[-1]))
        moments.add(x)
        return moments

    def add(self, x: torch.Tensor) -> None:
        """Add one run's tokens ``x`` (B, T, d)."""
        xs = x.float() - self.shift[:, None]
        self.count += x.shape[1]
        self.total += xs.sum(dim=1)
        self.outer += xs.transpose(1, 2) @ xs


@dataclass
class Codebook:
    """B units' codebooks: mean (B, d), principal directions (B, d, k) zero-padded to the
    largest k of the group, residual variances (B, d)."""

    mean: torch.Tensor
    basis: torch.Tensor
    residual_var: torch.Tensor

    @classmethod
    def fit(cls, moments: Moments, variance: float) -> Codebook:
        """The codebook keeping ``variance`` (0–1) of each unit's benign variance."""
        n = max(1, moments.count)
        centre = moments.total.double() / n  # (B, d), relative to the shift
        cov = moments.outer.double() / n - centre[:, :, None] * centre[:, None, :]  # (B, d, d)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        evals, evecs = evals.flip(-1).clamp_min(0.0), evecs.flip(-1)
        share = evals.cumsum(-1) / evals.sum(-1, keepdim=True).clamp_min(1e-30)
        keep = (share < variance).sum(-1) + 1  # (B,) components per unit
        k = int(keep.max())
        mask = torch.arange(k)[None, :] < keep[:, None]  # (B, k)
        basis = evecs[..., :k] * mask[:, None, :]  # (B, d, k)
        proj = torch.eye(cov.shape[-1], dtype=cov.dtype) - basis @ basis.transpose(1, 2)  # (B, d, d)
        residual = torch.diagonal(proj @ cov @ proj, dim1=-2, dim2=-1)  # (B, d)
        floor = 1e-6 * evals.sum(-1, keepdim=True) / cov.shape[-1] + 1e-12
        return cls((moments.shift.double() + centre).float(), basis.float(), residual.clamp_min(0.0).add(floor).float())

    def bits(self, x: torch.Tensor) -> torch.Tensor:
        """Code length of each token's residual, (B, T, d) per dimension, for ``x`` (B, T, d)."""
        xc = x.float() - self.mean[:, None]
        r = xc - (xc @ self.basis) @ self.basis.transpose(1, 2)  # (B, T, d)
        var = self.residual_var[:, None]
        return r.square() / (2 * var * math.log(2)) + 0.5 * torch.log2(2 * math.pi * var)


def run_bits(per_token: torch.Tensor) -> torch.Tensor:
    """A run's bits per unit from token bits (U, T): the mean of the ``TOP_TOKENS`` largest."""
    k = max(1, math.ceil(per_token.shape[1] * TOP_TOKENS))
    return per_token.topk(k, dim=1).values.mean(dim=1)
