"""Narrowing a fix set to failure directions: ablate heads only along what the failure adds.

A head's failure direction (rank 1 of d_head) is its mean output z at the last prompt
position over the failing variants minus the same over the baselines (the benign set when
there are none). Benign inputs sit near the baseline along that direction, so ablating only
that component barely moves them. A narrowed set is kept when it flips as much as the
whole-unit set (up to the threshold) with less benign KL. Cheapest first:

1. the fix's own heads, each ablated along its direction (one set; when every member is a
   head): kept when it helps, and nothing else runs;
2. then the largest set the search could return (the top ``max_fix_set_size`` heads of the
   pool, along their directions) on every failing variant: when even that set flips less
   than the whole-unit set (up to the threshold), no search runs and the note gives step
   1's figures (a heuristic: flip rates need not grow with the set, but a search whose
   largest candidate falls short rarely ends above it);
3. otherwise (or when the fix holds more than heads) the greedy search runs again over the
   top ``direction_pool`` heads, each ablated along its direction (step 2's set is its
   largest prefix: measured once).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model_forensics.rca.attribution import UnitScore
from model_forensics.rca.candidates import Ablation
from model_forensics.rca.members import solo_kls
from model_forensics.rca.notes import Note
from model_forensics.rca.runs import Inputs, capture, flip_rate
from model_forensics.rca.search import FixChoice, FixSearch, Found
from model_forensics.replay import Session

DIRECTION_VARIANTS = 16  # failing variants (and baselines) a direction averages over


def narrow_if_it_helps(
    search: FixSearch, scores: list[UnitScore], fix: FixChoice, whole_flip_rate: float, notes: list[Note]
) -> FixChoice:
    """The fix's own heads along their failure directions, then (when promising) the heads
    search along failure directions (see the module docstring); kept over ``fix`` (whole
    units, flipping ``whole_flip_rate`` of the failing variants) when it flips at least
    min(whole_flip_rate, threshold) with less benign KL."""
    cfg = search.config
    pool = [u for u in scores if u.level == "head"][: cfg.direction_pool]
    heads = [u.unit for u in pool] + [u.unit for u in fix.units if u.level == "head"]
    narrowed = Ablation(
        fix.ablation.kind, failure_directions(search.session, search.failing, list(dict.fromkeys(heads)))
    )
    target = min(whole_flip_rate, cfg.early_stop_threshold)
    if fix.units and all(u.unit in narrowed.directions for u in fix.units):
        own_rate = flip_rate(search.flips(search.failing, narrowed.all(fix.units)))
        own_kl = search.benign_kl(narrowed.all(fix.units))
        own = {"flip_rate": own_rate, "kl": own_kl, "whole_flip_rate": whole_flip_rate, "whole_kl": fix.benign_kl}
        if own_rate >= target and own_kl < fix.benign_kl:
            notes.append(Note("narrowed", own))
            return FixChoice(fix.units, narrowed, own_kl, solo_kls(search.session, fix.units, narrowed, len(fix.units)))
        largest = [u for u in pool if u.unit in narrowed.directions][: cfg.max_fix_set_size]
        if flip_rate(search.flips(search.failing, narrowed.all(largest))) < target:
            notes.append(Note("narrowing_did_not_help", own))
            return fix
    solo_kl = solo_kls(search.session, pool, narrowed, cfg.max_fix_set_size)

    def heads_search(variants: list[Inputs]) -> Found:
        trial = search.greedy(variants, pool, narrowed, cfg.max_fix_set_size)
        chosen = (
            search.minimise(variants, trial.units, narrowed, solo_kl)
            if search.reaches(trial.flip_rate)
            else trial.units
        )
        return Found(chosen, sorted({u.unit.rsplit(".head.", 1)[0] for u in chosen}), solo_kl)

    refined = search.refine(heads_search, narrowed, notes)
    kl = search.benign_kl(narrowed.all(refined.found.units))
    numbers = {"flip_rate": refined.flip_rate, "kl": kl, "whole_flip_rate": whole_flip_rate, "whole_kl": fix.benign_kl}
    if refined.flip_rate >= target and kl < fix.benign_kl:
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
            got = capture(session, batch, "layer", sites, only_sites=True)  # z: (T, H, d_head)
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
