"""Experiment 6 — layer sensitivity: how much outputs and each layer's activations move
per unit of input perturbation (docs/metrics.md §6).

Families and their unit of size s:

* ``token_substitution`` — one real token (never the first of a longer input) replaced
  by a uniformly random vocabulary id; s = 1 substituted token;
* ``embedding_noise`` — Gaussian noise of std σ·RMS(e) added to the embedding output e
  (or to a float input tensor for plain modules); s = σ.

Per family, with clean/perturbed states h, h' and prediction logits z, z':

    Δ_ℓ   = mean over affected real tokens of ‖h'_ℓ − h_ℓ‖₂ / ‖h_ℓ‖₂, divided by s
    KL    = KL(softmax z ‖ softmax z'), divided by s                       (nats)
    L2    = ‖(z' − mean z') − (z − mean z)‖₂, divided by s                (logit units)

Affected tokens are the substituted position and those after it in causal models, every
position otherwise. Layers are ranked by Δ_ℓ averaged over families.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rich.table import Table
from torch import nn

from model_forensics.core.config import SensitivityConfig
from model_forensics.core.metrics import kl_divergence
from model_forensics.core.records import fields_json
from model_forensics.inspection._json import jsonable
from model_forensics.inspection.collect import Batch, Recorded, forward, patched
from model_forensics.models.adapters import Adapter
from model_forensics.recorder import RecorderHooks

FAMILIES = ("token_substitution", "embedding_noise")

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class FamilySensitivity:
    """Sensitivity to one perturbation family."""

    family: str
    size: float  # perturbation size s in the family's unit
    unit: str
    kl: float  # output KL per unit perturbation (nats)
    logit_l2: float
    layer_change: dict[str, float]  # site → Δ_ℓ per unit perturbation


@dataclass
class SensitivityResult:
    """Per-layer and output sensitivity to each perturbation family, plus a layer ranking."""

    inputs: int
    families: list[FamilySensitivity] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def sites(self) -> list[str]:
        return list(self.families[0].layer_change) if self.families else []

    def ranking(self) -> list[tuple[str, float]]:
        """Sites from most to least sensitive (Δ_ℓ averaged over families)."""
        scores = {s: float(np.mean([f.layer_change[s] for f in self.families])) for s in self.sites}
        return sorted(scores.items(), key=lambda kv: -kv[1])

    def to_json(self) -> dict[str, Any]:
        return jsonable(
            fields_json(
                self,
                families=[vars(f) for f in self.families],
                ranking=[{"site": s, "score": v} for s, v in self.ranking()],
            )
        )

    def table(self) -> Table:
        t = Table(title=f"Layer sensitivity (per unit perturbation, {self.inputs} inputs)", title_justify="left")
        t.add_column("rank", justify="right")
        t.add_column("site")
        for f in self.families:
            t.add_column(f"Δ {f.family}", justify="right")
        for rank, (site, _) in enumerate(self.ranking(), start=1):
            t.add_row(str(rank), site, *(f"{f.layer_change[site]:.4f}" for f in self.families))
        outputs = "; ".join(
            f"{f.family}: KL {f.kl:.4f} nats, logit L2 {f.logit_l2:.3f} per {f.unit}" for f in self.families
        )
        t.caption = f"output change — {outputs}"
        return t

    def figure(self) -> Figure:
        from model_forensics.core import plots

        return plots.sensitivity_plot(
            self.sites,
            {f"{f.family} (per {f.unit})": [f.layer_change[s] for s in self.sites] for f in self.families},
            ylabel="‖Δh‖ / ‖h‖ per unit perturbation",
        )


SensitivitySettings = SensitivityConfig  # the ``inspection.sensitivity`` config section


def sensitivity(
    model: nn.Module,
    adapter: Adapter,
    recorder: RecorderHooks,
    batches: Sequence[tuple[Batch, list[int]]],
    sites: Sequence[str],
    settings: SensitivityConfig,
    vocab_size: int | None,
) -> SensitivityResult:
    """Measure sensitivity on the given encoded micro-batches (recorder installed on ``model``)."""
    inputs = sum(len(idx) for _, idx in batches)
    result = SensitivityResult(inputs)
    rng = np.random.default_rng([settings.seed, 6])
    gen = torch.Generator().manual_seed(settings.seed)
    acc: dict[str, dict[str, list[float]]] = {f: {"kl": [], "l2": [], **{s: [] for s in sites}} for f in FAMILIES}
    can_substitute = vocab_size is not None and vocab_size > 1 and all(b.ids is not None for b, _ in batches)
    noise_site = "embed" if "embed" in adapter.points else None
    can_noise = noise_site is not None or all(b.args and torch.is_floating_point(b.args[0]) for b, _ in batches)
    if not can_substitute:
        result.skipped["token_substitution"] = "the inputs are not token ids (or the vocabulary size is unknown)"
    if not can_noise:
        result.skipped["embedding_noise"] = "the model has no 'embed' site and its input is not a float tensor"

    def noisy(x: torch.Tensor, _: Batch | None) -> torch.Tensor:
        rms = x.pow(2).mean(dim=-1, keepdim=True).sqrt()
        noise = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
        return x + settings.noise_scale * rms * noise

    for batch, idx in batches:
        clean = forward(model, recorder, batch, sites, idx)
        if can_substitute:
            assert vocab_size is not None
            perturbed, affected = _substitute(batch, rng, vocab_size, adapter.causal)
            _accumulate(
                acc["token_substitution"], clean, forward(model, recorder, perturbed, sites, idx), affected, 1.0, sites
            )
        if can_noise:
            if noise_site is not None:
                with patched(adapter, noise_site, noisy):
                    pert = forward(model, recorder, batch, sites, idx)
            else:
                pert = forward(
                    model,
                    recorder,
                    Batch(
                        (noisy(batch.args[0], None), *batch.args[1:]), batch.kwargs, batch.mask, batch.last, batch.ids
                    ),
                    sites,
                    idx,
                )
            _accumulate(acc["embedding_noise"], clean, pert, batch.mask, settings.noise_scale, sites)

    units = {
        "token_substitution": (1.0, "substituted token"),
        "embedding_noise": (settings.noise_scale, "σ (× embedding RMS)"),
    }
    for family in FAMILIES:
        if family in result.skipped or not acc[family]["kl"]:
            continue
        a = acc[family]
        size, unit = units[family]
        result.families.append(
            FamilySensitivity(
                family=family,
                size=size,
                unit=unit,
                kl=float(np.mean(a["kl"])),
                logit_l2=float(np.mean(a["l2"])),
                layer_change={s: float(np.mean(a[s])) if a[s] else float("nan") for s in sites},
            )
        )
    return result


def _substitute(batch: Batch, rng: np.random.Generator, vocab: int, causal: bool) -> tuple[Batch, torch.Tensor]:
    assert batch.ids is not None
    ids = batch.ids.clone()
    affected = torch.zeros_like(batch.mask)
    for i in range(ids.shape[0]):
        real = int(batch.mask[i].sum())
        p = int(rng.integers(1 if real > 1 else 0, real))
        ids[i, p] = int(rng.integers(0, vocab))
        if causal:
            affected[i, p:real] = True
        else:
            affected[i, :real] = True
    if "input_ids" in batch.kwargs:
        return Batch(batch.args, {**batch.kwargs, "input_ids": ids}, batch.mask, batch.last, ids), affected
    return Batch((ids, *batch.args[1:]), batch.kwargs, batch.mask, batch.last, ids), affected


def _accumulate(
    acc: dict[str, list[float]],
    clean: Recorded,
    pert: Recorded,
    affected: torch.Tensor,
    size: float,
    sites: Sequence[str],
) -> None:
    acc["kl"] += (kl_divergence(clean.prediction, pert.prediction, dtype=torch.float64) / size).tolist()
    zc = clean.prediction.double() - clean.prediction.double().mean(-1, keepdim=True)
    zp = pert.prediction.double() - pert.prediction.double().mean(-1, keepdim=True)
    acc["l2"] += ((zp - zc).norm(dim=-1) / size).tolist()
    for site in sites:
        if site not in clean.sites:
            continue
        h, h2, mask = clean.sites[site], pert.sites[site], clean.masks[site]
        if mask.shape == affected.shape:
            mask = mask & affected
        rel = (h2 - h).norm(dim=-1) / h.norm(dim=-1).clamp_min(1e-12)  # (B, R)
        for i in range(rel.shape[0]):
            if mask[i].any():
                acc[site].append(float(rel[i][mask[i]].mean()) / size)
