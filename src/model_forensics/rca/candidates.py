"""The units a fix-set search draws from, in search order, and how each becomes an intervention.

Token positions (``modules.cca.positions``): every prompt position of ``embed`` and of each
block's ``resid_post`` (``embed@pos=3``, level ``position``) is a coarse candidate beside
the attention and MLP sites, and its own fine candidate: a trigger that several heads
carry redundantly often enters through one embedding position.

Guided order: attribution score, times (1 + CF score / threshold) for units CF flags when
CF guides; unguided: every site, head and neuron in forward order. Fine candidates of a
coarse site: every head of an attention site, the top ``neurons_per_site`` neurons of an MLP
site or of a generic site's channels. An :class:`Ablation` turns a unit into its
:class:`Intervention`.

Models without canonical blocks (CNNs and other plain ``nn.Module``s, generic adapter):
the units are the channels of each convolution's output, ``features.2[5]`` (an image
site reads as (B, H·W, C), so the unit is channel 5 at every position). The coarse unit
of a convolution is, in a guided search, its channels of positive score taken together
(``features.2[22,4,13]``: ablating the whole convolution would blank the image rather
than remove what the ranking blames), and in forward order the whole convolution. Forward
order for a CNN runs *backward*, the convolution nearest the output first: it is where a
trigger's features are most concentrated, and a coarse search that stopped at the first
convolution would ablate the image itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from model_forensics.models.adapters import conv_sites
from model_forensics.rca.attribution import Ranking, UnitScore
from model_forensics.rca.compression import AnomalyReport
from model_forensics.rca.notes import Note
from model_forensics.replay import Gate, Intervention, Session


@dataclass(frozen=True)
class Ablation:
    """How a unit is ablated: ``kind`` (mean over the baseline set, or zero), restricted to
    the unit's failure direction where ``directions`` holds one, behind ``gate`` if any."""

    kind: str
    directions: dict[str, tuple[float, ...]] = field(default_factory=dict)
    gate: Gate | None = None

    def __call__(self, unit: UnitScore) -> Intervention:
        # Along a direction, ``mean`` writes the baseline mean over all positions: on SmolLM2
        # it moved benign answers less than the mean at the last prompt position (align='last').
        return Intervention(site=unit.unit, kind=self.kind, direction=self.directions.get(unit.unit), gate=self.gate)

    def all(self, units: Sequence[UnitScore]) -> list[Intervention]:
        """The interventions of a set of units."""
        return [self(unit) for unit in units]


def search_order(
    session: Session, ranking: Ranking | None, guided_by: AnomalyReport | None, unguided: bool
) -> list[UnitScore]:
    """Units in search order. Guided: attribution × (1 + CF score / threshold) for flagged
    units; unguided (or no ranking): every site/head/neuron in forward order."""
    if unguided or ranking is None or (not ranking.units and not session.adapter.n_layers):
        return forward_order(session)
    units = list(ranking.units)
    if not session.adapter.n_layers:
        units += channel_sites(session, units)
    out = []
    for u in units:
        weight = 1.0
        if guided_by is not None:
            cf = cf_score(guided_by, u.unit)
            if cf > guided_by.threshold:
                weight += cf / guided_by.threshold
        out.append(UnitScore(u.unit, u.level, u.score * weight if u.score > 0 else u.score))
    out.sort(key=lambda u: -u.score)
    return out


def forward_order(session: Session) -> list[UnitScore]:
    """Every attention/MLP site, head and MLP neuron, block by block (scores 0); for a
    generic model, every convolution site and its channels, last convolution first."""
    adapter = session.adapter
    units = []
    if not adapter.n_layers:
        for site, channels in reversed(conv_sites(session.adapter)):
            units += [UnitScore(site, "site", 0.0)] + [
                UnitScore(f"{site}[{c}]", "neuron", 0.0) for c in range(channels)
            ]
        return units
    for layer in range(adapter.n_layers):
        units += [UnitScore(f"blocks.{layer}.attn", "site", 0.0), UnitScore(f"blocks.{layer}.mlp", "site", 0.0)]
        units += [UnitScore(f"blocks.{layer}.attn.head.{h}", "head", 0.0) for h in range(adapter.n_heads or 0)]
        units += [UnitScore(f"blocks.{layer}.mlp.post[{i}]", "neuron", 0.0) for i in range(mlp_width(session))]
    return units


def channel_sites(session: Session, ranked: Sequence[UnitScore]) -> list[UnitScore]:
    """The coarse units of a generic model's ranking, which scores channels only: per
    convolution, its channels of positive score as one unit (``features.2[22,4,13]``,
    best first), scored by their sum. Ablating a whole convolution would blank the image
    rather than remove what the ranking blames."""
    convs = {site for site, _ in conv_sites(session.adapter)}
    blamed: dict[str, list[UnitScore]] = {}
    for u in sorted(ranked, key=lambda u: -u.score):
        site = u.unit.split("[")[0]
        if u.level == "neuron" and site in convs and u.score > 0:
            blamed.setdefault(site, []).append(u)
    return [
        UnitScore(
            f"{site}[{','.join(u.unit.split('[')[1].rstrip(']') for u in units)}]", "site", sum(u.score for u in units)
        )
        for site, units in blamed.items()
    ]


def fine_candidates(scores: list[UnitScore], sites: Sequence[str], per_site: int) -> list[UnitScore]:
    """The heads of each attention site and the first ``per_site`` neurons (in ``scores``
    order) of each MLP site, or of the channels a generic model's coarse unit names."""
    fine: list[UnitScore] = []
    for site in sites:
        if "@pos=" in site:  # a token position is atomic: its own fine candidate
            fine += [u for u in scores if u.unit == site]
        elif site.endswith(".attn"):
            fine += [u for u in scores if u.level == "head" and u.unit.startswith(site + ".head.")]
        elif site.endswith(".mlp"):
            fine += [u for u in scores if u.level == "neuron" and u.unit.startswith(site + ".post[")][:per_site]
        elif "[" in site:  # a generic model's coarse unit: some channels of a convolution
            base, listed = site.rstrip("]").split("[")
            members = {f"{base}[{c}]" for c in listed.split(",")}
            fine += [u for u in scores if u.level == "neuron" and u.unit in members][:per_site]
        else:  # a generic site: its channels
            fine += [u for u in scores if u.level == "neuron" and u.unit.startswith(site + "[")][:per_site]
    return fine


def saturation_note(ranking: Ranking | None, tolerance: float) -> Note | None:
    """A warning when every attribution score is near zero (max |score| ≤ ``tolerance``):
    the gradient carries no signal (a saturated softmax, a dead path), so the guided
    order is arbitrary and the search is as blind as an unguided one."""
    if ranking is None or not ranking.units:
        return None
    largest = max(abs(u.score) for u in ranking.units)
    if largest > tolerance:
        return None
    return Note(
        "attribution_saturated", {"max_abs_score": largest, "units": len(ranking.units), "tolerance": tolerance}
    )


def unit_count(session: Session) -> int:
    """Heads + MLP neurons of the model (channels of its convolutions for a generic
    model): the fine search space."""
    adapter = session.adapter
    if not adapter.n_layers:
        return sum(channels for _, channels in conv_sites(session.adapter))
    return adapter.n_layers * ((adapter.n_heads or 0) + mlp_width(session))


def mlp_width(session: Session) -> int:
    """MLP neurons per block (d_mlp): the model config's, else 4 · d_model."""
    cfg = getattr(session.model, "config", None)
    for name in ("intermediate_size", "n_inner"):
        value = getattr(cfg, name, None)
        if value:
            return int(value)
    return 4 * int(session.adapter.d_model or 0)


def cf_score(report: AnomalyReport | None, unit: str) -> float:
    """CF's score for a unit: the larger of the unit's own and its site's (0 without CF)."""
    if report is None:
        return 0.0
    site = unit.split("[")[0].removesuffix(".post")
    return max(report.score(unit), report.score(site))
