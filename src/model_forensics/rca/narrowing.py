"""Narrowing a fix set to failure directions: ablate heads only along what the failure adds.

A head's failure direction (rank 1 of d_head) is its mean output z at the last prompt
position over the failing variants minus the same over the baselines (the benign set when
there are none). Benign inputs sit near the baseline along that direction, so ablating only
that component barely moves them. The greedy search runs again over the top
``direction_pool`` heads, each ablated along its direction; the narrowed set is kept when
it flips as much as the whole-unit set (up to the threshold) with less benign KL.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model_forensics.rca.attribution import UnitScore
from model_forensics.rca.candidates import Ablation
from model_forensics.rca.members import solo_kls
from model_forensics.rca.notes import Note
from model_forensics.rca.runs import Inputs, capture
from model_forensics.rca.search import FixChoice, FixSearch, Found
from model_forensics.replay import Session

DIRECTION_VARIANTS = 16  # failing variants (and baselines) a direction averages over


def narrow_if_it_helps(
    search: FixSearch, scores: list[UnitScore], fix: FixChoice, whole_flip_rate: float, notes: list[Note]
) -> FixChoice:
    """The heads search along failure directions; kept over ``fix`` (whole units, flipping
    ``whole_flip_rate`` of the failing variants) when it flips at least min(whole_flip_rate,
    threshold) with less benign KL."""
    pool = [u for u in scores if u.level == "head"][: search.config.direction_pool]
    narrowed = Ablation(fix.ablation.kind, failure_directions(search.session, search.failing, [u.unit for u in pool]))
    solo_kl = solo_kls(search.session, pool, narrowed, search.config.max_fix_set_size)

    def heads_search(variants: list[Inputs]) -> Found:
        trial = search.greedy(variants, pool, narrowed, search.config.max_fix_set_size)
        chosen = (
            search.minimise(variants, trial.units, narrowed, solo_kl)
            if search.reaches(trial.flip_rate)
            else trial.units
        )
        return Found(chosen, sorted({u.unit.rsplit(".head.", 1)[0] for u in chosen}), solo_kl)

    refined = search.refine(heads_search, narrowed, notes)
    kl = search.benign_kl(narrowed.all(refined.found.units))
    numbers = {"flip_rate": refined.flip_rate, "kl": kl, "whole_flip_rate": whole_flip_rate, "whole_kl": fix.benign_kl}
    if refined.flip_rate >= min(whole_flip_rate, search.config.early_stop_threshold) and kl < fix.benign_kl:
        notes.append(Note("narrowed", numbers))
        return FixChoice(refined.found.units, narrowed, kl, refined.found.solo_kl)
    notes.append(Note("narrowing_did_not_help", numbers))
    return fix


def failure_directions(
    session: Session, failing: list[Inputs], heads: list[str], limit: int = DIRECTION_VARIANTS
) -> dict[str, tuple[float, ...]]:
    """Per head ``blocks.L.attn.head.H``: its mean z (d_head,) at the last prompt position
    over up to ``limit`` failing variants minus the same over the baseline set (the benign
    set when there is none); heads whose difference is exactly 0 are left out."""
    where = {h: (h.rsplit(".head.", 1)[0] + ".z", int(h.rsplit(".head.", 1)[1])) for h in heads}
    sites = list(dict.fromkeys(site for site, _ in where.values()))
    reference = list(session.baselines or session.benign())[:limit]

    def mean_last(batches: Sequence[Inputs]) -> dict[str, torch.Tensor]:
        total: dict[str, torch.Tensor] = {}
        for batch in batches:
            got = capture(session, batch, granularity="layer", sites=sites)  # z: (T, H, d_head)
            for site in sites:
                total[site] = total.get(site, 0) + got[site][-1].double()
        return {site: t / len(batches) for site, t in total.items()}  # (H, d_head)

    bad, good = mean_last(failing[:limit]), mean_last(reference)
    out = {}
    for head, (site, index) in where.items():
        diff = bad[site][index] - good[site][index]
        if bool(diff.abs().max() > 0):
            out[head] = tuple(diff.tolist())
    return out
