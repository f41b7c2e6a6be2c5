"""ActivationSummary: the bounded-memory digest of one set of inputs at a set of sites.

Per site it keeps, whatever the number of inputs:

* ``moments`` — streaming per-unit moments over every real token row (:class:`Moments`);
* ``tokens`` — a reservoir of *one random token row per input* (capacity ``token_capacity``).
  One row per input keeps the sample independent across inputs (tokens of one prompt are
  correlated), which the two-sample tests of shift and drift need;
* ``pooled`` — a reservoir of per-input mean-pooled states (capacity ``pooled_capacity``),
  the input-level representation used by MMD, CKA/Procrustes and probes.

Both reservoirs are keyed by input index, so two summaries over the same inputs (two
models, say) keep the same inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from model_forensics.inspection.collect import Recorded
from model_forensics.inspection.streaming import Moments, Reservoir


def pooled_rows(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real rows: (B, R, U), (B, R) → (B, U)."""
    m = mask.unsqueeze(-1).to(rows.dtype)
    return (rows * m).sum(1) / m.sum(1).clamp_min(1.0)


def random_rows(rows: torch.Tensor, mask: torch.Tensor, u: np.ndarray) -> torch.Tensor:
    """One real row per sample, the ⌊u·n_real⌋-th (u in [0, 1) per sample): (B, U)."""
    real = mask.sum(1).cpu().numpy()
    pick = np.minimum((u * real).astype(np.int64), np.maximum(real - 1, 0))
    positions = [int(np.flatnonzero(mask[i].cpu().numpy())[pick[i]]) for i in range(rows.shape[0])]
    return rows[torch.arange(rows.shape[0]), torch.tensor(positions)]


class ActivationSummary:
    """Streaming digest of activations at ``sites`` over one set of inputs.

    Args:
        token_capacity / pooled_capacity: reservoir sizes (inputs kept).
        keys / positions: per-input reservoir keys and token-choice draws in [0, 1),
            indexed by global input index (see :func:`streaming.item_keys`).
    """

    def __init__(self, token_capacity: int, pooled_capacity: int, keys: np.ndarray, positions: np.ndarray):
        self.token_capacity = token_capacity
        self.pooled_capacity = pooled_capacity
        self.keys = keys
        self.positions = positions
        self.moments: dict[str, Moments] = {}
        self.tokens: dict[str, Reservoir] = {}
        self.pooled: dict[str, Reservoir] = {}
        self.inputs = 0

    def update(self, recorded: Recorded, index: Sequence[int], sites: Sequence[str] | None = None) -> None:
        """Add a recorded micro-batch whose samples have global indices ``index``."""
        idx = np.asarray(index, dtype=np.int64)
        if len(idx) == 0:
            return
        self.inputs += len(idx)
        for site in sites if sites is not None else list(recorded.sites):
            if site not in recorded.sites:
                continue
            rows, mask = recorded.sites[site], recorded.masks[site]
            sub = _select(rows, mask, recorded, index, idx)
            if sub is None:
                continue
            rows, mask = sub
            units = rows.shape[-1]
            if site not in self.moments:
                self.moments[site] = Moments(units)
                self.tokens[site] = Reservoir(self.token_capacity, units)
                self.pooled[site] = Reservoir(self.pooled_capacity, units)
            self.moments[site].update(rows[mask].double().numpy())
            keys = self.keys[idx]
            self.tokens[site].update(random_rows(rows, mask, self.positions[idx]).numpy(), keys, idx)
            self.pooled[site].update(pooled_rows(rows, mask).numpy(), keys, idx)

    def merge(self, other: ActivationSummary) -> None:
        """Fold in the summary of other inputs (a shard of a distributed run, same keys):
        moments by the pairwise formulas, reservoirs by bottom-k, so the result equals one
        summary fed both sets (moments to float64 rounding, reservoirs exactly)."""
        self.inputs += other.inputs
        for site, moments in other.moments.items():
            if site not in self.moments:
                self.moments[site] = Moments(moments.units)
                self.tokens[site] = Reservoir(self.token_capacity, moments.units)
                self.pooled[site] = Reservoir(self.pooled_capacity, moments.units)
            self.moments[site].merge(moments)
            self.tokens[site].merge(other.tokens[site])
            self.pooled[site].merge(other.pooled[site])

    @property
    def sites(self) -> list[str]:
        return list(self.moments)

    def nbytes(self) -> int:
        return sum(m.nbytes() for m in self.moments.values()) + sum(
            r.nbytes() for r in (*self.tokens.values(), *self.pooled.values())
        )


def _select(
    rows: torch.Tensor, mask: torch.Tensor, recorded: Recorded, index: Sequence[int], idx: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor] | None:
    # ``recorded`` covers a whole micro-batch; ``index`` may be a subset of it (one drift
    # group of a mixed batch). Its ``batch_index`` maps global indices to batch rows.
    positions = recorded.rows_of(idx)
    if positions is None:
        return rows, mask
    if len(positions) == 0:
        return None
    sel = torch.as_tensor(positions)
    return rows[sel], mask[sel]
