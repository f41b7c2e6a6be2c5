"""The smallest fix: single units and pairs, tried in one batched sweep before the greedy search.

Greedy addition follows the ranking, and delta-debugging then returns a 1-minimal set, not
the smallest one: a unit that ranks low (on gpt2-injection a head whose site attribution
ranks below a redundant MLP) is never tried alone. So, before the greedy search:

1. singles: every head of the model and the top ``sweep_neurons`` neurons (search order),
   each ablated alone, one batched sweep per search variant;
2. pairs, when no single unit reaches ``early_stop_threshold`` within the side-effect bound:
   every pair of the top ``sweep_pairs`` units, ordered by their solo flip rate (then rank);
3. the sets reaching the threshold on the search variants are re-measured on every failing
   variant (:meth:`~model_forensics.rca.search.FixSearch.reaching_rates`: a few variants at
   a time, each set only until its misses keep it below the threshold), and their solo
   benign KL (first decoding step) is measured; sets above ``max_side_effect_kl`` are
   dropped. The best of the smallest size wins (highest flip rate, then lowest KL, then rank).

:func:`smaller_wins` decides against the greedy set: the sweep's set replaces it when it is
smaller (or the greedy set misses the threshold) and its benign KL, as reported, stays
within the bound or at most the greedy set's.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from model_forensics.rca.attribution import UnitScore
from model_forensics.rca.candidates import Ablation
from model_forensics.rca.runs import flip_rate
from model_forensics.rca.search import FixSearch
from model_forensics.rca.side_effects import benign_kls


@dataclass
class SmallFix:
    """The smallest set the sweep found: its units, flip rate on every failing variant,
    benign KL of the set (first decoding step) and how many sets the sweep tried."""

    units: list[UnitScore]
    flip_rate: float
    first_step_kl: float
    tried: int

    @property
    def solo_kl(self) -> dict[str, float]:
        """The unit's solo benign KL, for a single unit ({} for a pair: the KL is the pair's)."""
        return {self.units[0].unit: self.first_step_kl} if len(self.units) == 1 else {}


@dataclass
class _Tried:
    sets: list[list[UnitScore]]
    rates: list[float]  # on the search variants


def smallest_fix(search: FixSearch, scores: list[UnitScore], ablate: Ablation) -> SmallFix | None:
    """The smallest set (one or two units) reaching the threshold within the side-effect
    bound, or None (see the module docstring)."""
    cfg = search.config
    heads = [u for u in scores if u.level == "head"]
    neurons = [u for u in scores if u.level == "neuron"][: cfg.sweep_neurons]
    singles = [[u] for u in heads + neurons]
    if not singles:
        return None
    report = partial(search.progress, "smallest-fix sweep")  # (sets tried, sets planned)
    planned = len(singles) + len(list(itertools.combinations(range(min(cfg.sweep_pairs, len(singles))), 2)))
    tried = _try(search, singles, ablate, report, 0, planned)
    best = _best(search, tried, ablate)
    if best is None and cfg.sweep_pairs >= 2:
        rank = {u.unit: i for i, u in enumerate(scores)}
        order = sorted(range(len(singles)), key=lambda i: (-tried.rates[i], rank[singles[i][0].unit]))
        pool = [singles[i][0] for i in order[: cfg.sweep_pairs]]
        pairs = [list(pair) for pair in itertools.combinations(pool, 2)]
        best = _best(search, _try(search, pairs, ablate, report, len(singles), planned), ablate)
        count = len(singles) + len(pairs)
    else:
        count = len(singles)
    report(planned, planned)
    if best is None:
        return None
    units, rate, kl = best
    return SmallFix(units, rate, kl, count)


def smaller_wins(
    small: SmallFix, small_kl: float, greedy_size: int, greedy_reaches: bool, greedy_kl: float, bound: float
) -> bool:
    """Whether the sweep's set replaces the greedy one: it is smaller (or the greedy set
    misses the threshold) and its benign KL ``small_kl`` (as reported) is within ``bound``
    or at most the greedy set's ``greedy_kl``."""
    better = len(small.units) < greedy_size or not greedy_reaches
    return better and small_kl <= max(bound, greedy_kl)


def site_of(unit: str) -> str:
    """The site a head or neuron belongs to: ``blocks.0.attn.head.1`` → ``blocks.0.attn``,
    ``blocks.1.mlp.post[7]`` → ``blocks.1.mlp``; a site is its own."""
    return unit.split(".head.")[0].split("[")[0].removesuffix(".post")


def _try(
    search: FixSearch,
    sets: list[list[UnitScore]],
    ablate: Ablation,
    tick: Callable[[int, int], None],
    done: int,
    total: int,
) -> _Tried:
    """Flip rates of ``sets`` on the search variants (one batched sweep per variant)."""
    tick(done, total)
    flips = search.flip_table(search.search_variants, [ablate.all(s) for s in sets])
    tick(done + len(sets), total)
    return _Tried(sets, [flip_rate(f) for f in flips])


def _best(search: FixSearch, tried: _Tried, ablate: Ablation) -> tuple[list[UnitScore], float, float] | None:
    """Of the sets reaching the threshold on the search variants: those that still reach it
    on every failing variant and whose solo benign KL is within the bound; the one with the
    highest flip rate, then the lowest KL (the first, in order, of equals)."""
    reaching = [s for s, r in zip(tried.sets, tried.rates, strict=True) if search.reaches(r)]
    if not reaching:
        return None
    rates = search.reaching_rates(search.failing, [ablate.all(s) for s in reaching])
    confirmed = [(s, r) for s, r in zip(reaching, rates, strict=True) if r is not None]
    if not confirmed:
        return None
    if search.session.benign():
        kls = [sum(k) / len(k) for k in benign_kls(search.session, [ablate.all(s) for s, _ in confirmed])]
    else:
        kls = [0.0] * len(confirmed)
    within = [(s, r, k) for (s, r), k in zip(confirmed, kls, strict=True) if k <= search.config.max_side_effect_kl]
    if not within:
        return None
    return max(within, key=lambda c: (c[1], -c[2]))
