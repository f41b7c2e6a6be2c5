"""Streaming estimators: statistics over thousands of inputs without storing them.

Two building blocks serve every experiment:

* :class:`Moments` — count, mean and the 2nd–4th central sums per unit, updated batch by
  batch with the pairwise merge formulas of Chan et al. (1979) and Pébay (2008). Memory
  is O(units), independent of how many rows were seen; results equal the two-pass
  formulas to float64 rounding.
* :class:`Reservoir` — a uniform random sample of at most ``capacity`` rows, kept by
  *bottom-k sampling*: every item gets a fixed pseudo-random key and the reservoir holds
  the ``capacity`` items with the smallest keys. That is a uniform sample without
  replacement of everything offered so far, it is deterministic given the keys, and two
  reservoirs fed the same keys (two models, the same inputs) keep the same items.
  Quantiles, two-sample tests and representation similarity read from reservoirs, so
  their memory is bounded by ``capacity`` whatever the number of inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Moments:
    """Per-unit count, mean, central sums M2..M4, min and max of a stream of rows.

    Feed ``(n, units)`` arrays to :meth:`update`; read :attr:`mean`, :attr:`var`,
    :attr:`std`, :attr:`skewness`, :attr:`kurtosis`. All units see the same rows, so
    ``count`` is one number.
    """

    units: int
    count: int = 0
    mean: np.ndarray = field(init=False)
    m2: np.ndarray = field(init=False)
    m3: np.ndarray = field(init=False)
    m4: np.ndarray = field(init=False)
    min: np.ndarray = field(init=False)
    max: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.mean = np.zeros(self.units)
        self.m2 = np.zeros(self.units)
        self.m3 = np.zeros(self.units)
        self.m4 = np.zeros(self.units)
        self.min = np.full(self.units, np.inf)
        self.max = np.full(self.units, -np.inf)

    def update(self, rows: np.ndarray) -> None:
        """Add ``rows`` (n, units); float64 internally."""
        if rows.shape[0] == 0:
            return
        x = np.asarray(rows, dtype=np.float64)
        batch = Moments(self.units)
        batch.count = x.shape[0]
        batch.mean = x.mean(axis=0)
        c = x - batch.mean
        c2 = c * c
        batch.m2 = c2.sum(axis=0)
        batch.m3 = (c2 * c).sum(axis=0)
        batch.m4 = (c2 * c2).sum(axis=0)
        batch.min = x.min(axis=0)
        batch.max = x.max(axis=0)
        self.merge(batch)

    def merge(self, other: Moments) -> None:
        """Fold another accumulator over the same units into this one (Pébay 2008, eq. 2.1–2.3)."""
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.m2, self.m3, self.m4 = (
                other.count,
                other.mean.copy(),
                other.m2.copy(),
                other.m3.copy(),
                other.m4.copy(),
            )
            self.min, self.max = other.min.copy(), other.max.copy()
            return
        na, nb = float(self.count), float(other.count)
        n = na + nb
        d = other.mean - self.mean
        d2 = d * d
        m2 = self.m2 + other.m2 + d2 * na * nb / n
        m3 = self.m3 + other.m3 + d2 * d * na * nb * (na - nb) / n**2 + 3.0 * d * (na * other.m2 - nb * self.m2) / n
        m4 = (
            self.m4
            + other.m4
            + d2 * d2 * na * nb * (na * na - na * nb + nb * nb) / n**3
            + 6.0 * d2 * (na * na * other.m2 + nb * nb * self.m2) / n**2
            + 4.0 * d * (na * other.m3 - nb * self.m3) / n
        )
        self.mean = self.mean + d * nb / n
        self.m2, self.m3, self.m4 = m2, m3, m4
        self.count = int(n)
        self.min = np.minimum(self.min, other.min)
        self.max = np.maximum(self.max, other.max)

    @property
    def var(self) -> np.ndarray:
        """Sample variance (ddof = 1); NaN with fewer than two rows."""
        if self.count < 2:
            return np.full(self.units, np.nan)
        return self.m2 / (self.count - 1)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)

    @property
    def skewness(self) -> np.ndarray:
        """Population skewness g1 = m3 / m2^1.5 (m_k the k-th central moment)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            n = float(self.count)
            return np.where(self.m2 > 0, np.sqrt(n) * self.m3 / self.m2**1.5, np.nan)

    @property
    def kurtosis(self) -> np.ndarray:
        """Excess kurtosis g2 = m4 / m2² − 3 (0 for a normal distribution)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            n = float(self.count)
            return np.where(self.m2 > 0, n * self.m4 / (self.m2 * self.m2) - 3.0, np.nan)

    def pooled(self) -> Moments:
        """All units of this accumulator treated as one distribution (one unit).

        Exact: every unit saw ``count`` rows, so the central sums shift by each unit's
        offset from the grand mean (the same algebra as :meth:`merge`).
        """
        out = Moments(1)
        if self.count == 0:
            return out
        n = float(self.count)
        mu = float(self.mean.mean())
        d = self.mean - mu
        out.count = int(n * self.units)
        out.mean = np.array([mu])
        out.m2 = np.array([np.sum(self.m2 + n * d**2)])
        out.m3 = np.array([np.sum(self.m3 + 3 * d * self.m2 + n * d**3)])
        out.m4 = np.array([np.sum(self.m4 + 4 * d * self.m3 + 6 * d**2 * self.m2 + n * d**4)])
        out.min = np.array([self.min.min()])
        out.max = np.array([self.max.max()])
        return out

    def nbytes(self) -> int:
        return 6 * self.units * 8


class Reservoir:
    """A bounded uniform sample of rows: the ``capacity`` rows with the smallest keys.

    Args:
        capacity: the most rows kept.
        units: row width.
        dtype: storage dtype (float32 by default; statistics are computed in float64).
    """

    def __init__(self, capacity: int, units: int, dtype: type = np.float32):
        self.capacity = int(capacity)
        self.units = int(units)
        self.keys = np.empty(0)
        self.ids = np.empty(0, dtype=np.int64)
        self.rows: np.ndarray = np.empty((0, units), dtype=dtype)
        self.seen = 0

    def update(self, rows: np.ndarray, keys: np.ndarray, ids: np.ndarray) -> None:
        """Offer ``rows`` (n, units) with their keys (n,) in [0, 1) and item ids (n,)."""
        self.seen += len(keys)
        if len(self.keys) >= self.capacity:
            # Only items whose key beats the current largest kept key can enter.
            take = keys < self.keys.max()
            rows, keys, ids = rows[take], keys[take], ids[take]
        if len(keys) == 0:
            return
        all_keys = np.concatenate([self.keys, keys])
        all_ids = np.concatenate([self.ids, ids])
        all_rows = np.concatenate([self.rows, np.asarray(rows, dtype=self.rows.dtype)])
        if len(all_keys) > self.capacity:
            keep = np.argpartition(all_keys, self.capacity - 1)[: self.capacity]
            all_keys, all_ids, all_rows = all_keys[keep], all_ids[keep], all_rows[keep]
        order = np.argsort(all_ids, kind="stable")
        self.keys, self.ids, self.rows = all_keys[order], all_ids[order], all_rows[order]

    def merge(self, other: Reservoir) -> None:
        """Fold in a reservoir fed other items with keys from the same draw: the result
        holds the ``capacity`` smallest keys of both, exactly what one reservoir fed every
        item would hold (bottom-k sampling is order-free)."""
        seen = self.seen + other.seen
        if len(other):
            self.update(other.rows, other.keys, other.ids)
        self.seen = seen

    def __len__(self) -> int:
        return len(self.keys)

    def values(self) -> np.ndarray:
        """The kept rows (k, units), ordered by item id."""
        return self.rows

    def quantiles(self, qs: np.ndarray) -> np.ndarray:
        """Per-unit sample quantiles (len(qs), units) of the kept rows (linear interpolation)."""
        if len(self) == 0:
            return np.full((len(qs), self.units), np.nan)
        return np.quantile(self.rows.astype(np.float64), qs, axis=0)

    def nbytes(self) -> int:
        return int(self.rows.nbytes + self.keys.nbytes + self.ids.nbytes)


def item_keys(n: int, seed: int) -> np.ndarray:
    """The reservoir keys of items 0..n−1: i.i.d. uniform [0, 1), fixed by ``seed``."""
    return np.random.default_rng([seed, 0x5EED]).random(n)
