"""CausalCCA: every claim about a fix set is checked by replaying it, not read off the result.

Two incidents: the zoo's bert-sentiment-bypass (a planted attention mechanism; fewer prompts
than the shipped scenario, so it runs in seconds) and a token the tiny random GPT-2 predicts,
which several blocks.0 MLP neurons carry. Both have at most ``search_variants`` failing
variants, so the search sees every variant that the reported flip rate is measured on.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import torch

from model_forensics import (
    CausalCCA,
    ConfigError,
    ForensicsConfig,
    ForensicsError,
    Intervention,
    RecorderHooks,
    SandboxReplayer,
    token_is,
)
from model_forensics.core.sites import block_index
from model_forensics.rca import attribution_ranking
from model_forensics.rca.side_effects import benign_kls
from model_forensics.scenarios import get

# Few candidates per MLP site: the exhaustive search then covers the greedy search's whole space.
SMALL = {"neurons_per_site": 8, "confirm_top": 8, "confirm_variants": 4}
TINY_TARGET = 2  # predicted by the tiny GPT-2 on ~5 % of random 7-token prompts


def _cca(config: dict | None = None, **kwargs) -> CausalCCA:
    return CausalCCA(ForensicsConfig.from_mapping(config or {}), **{**SMALL, **kwargs})


def _small_zoo_incident(name: str, out: Path) -> Path:
    """Incident 0 of a zoo scenario cut to 12 failing prompts, 8 benign and 8 baselines."""
    scenario = get(name)
    small = dataclasses.replace(
        scenario, variants=scenario.variants[:9], benign=scenario.benign[:8], baseline=scenario.baseline[:8]
    )
    run = small.record(out, limit=1)
    assert run.reproduced
    return run.incidents[0]


def _tiny_incident(loaded, out: Path, target: int | None = TINY_TARGET) -> Path:
    """An incident where ``loaded`` predicts ``target`` (None: its most frequent next token):
    8 failing prompts, 6 benign, 6 clean baselines."""
    g = torch.Generator().manual_seed(5)
    prompts = torch.randint(0, 50, (200, 7), generator=g)
    with torch.no_grad():
        preds = loaded.model(input_ids=prompts).logits[:, -1].argmax(-1)
    if target is None:
        target = int(preds.mode().values)
    failing, clean = prompts[preds == target], prompts[preds != target]
    assert len(failing) >= 8
    extras = {
        "variants": [{"input_ids": [p.tolist()]} for p in failing[1:8]],
        "benign": [{"input_ids": [p.tolist()]} for p in clean[:6]],
        "baseline": [{"input_ids": [p.tolist()]} for p in clean[6:12]],
    }
    with RecorderHooks().install_hooks(loaded.model) as rec, torch.no_grad():
        loaded.model(input_ids=failing[:1])
        return rec.create_bundle(out, predicate=token_is(target), extras=extras)


@pytest.fixture(scope="module", params=["bert-sentiment-bypass", "tiny-gpt2"])
def incident(request, tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp(request.param)
    if request.param == "tiny-gpt2":
        return _tiny_incident(tiny["gpt2"], out / "incident")
    return _small_zoo_incident(request.param, out)


@pytest.fixture(scope="module")
def greedy(incident: Path):
    return _cca().search_fix_set(SandboxReplayer().load_bundle(incident))


def _failing(session) -> list[dict[str, torch.Tensor]]:
    return [v for v in session.variants() if session.run(inputs=v).failed]


def _flip_rates(session, sets: list[list[Intervention]], variants) -> list[float]:
    """Fraction of ``variants`` on which each intervention set removes the failure."""
    flipped = [0] * len(sets)
    for batch in variants:
        for i, result in enumerate(session.sweep(sets, inputs=batch)):
            flipped[i] += not result.failed
    return [f / len(variants) for f in flipped]


def _candidates(session, sites: list[str]) -> list[str]:
    """The fine units the search picks from inside ``sites``: every head of an attention
    site, the top-ranked ``neurons_per_site`` neurons of an MLP site."""
    ranking = attribution_ranking(session)
    out = []
    for site in sites:
        if site.endswith(".attn"):
            out += [u.unit for u in ranking.level("head") if u.unit.startswith(site + ".head.")]
        else:
            out += [u.unit for u in ranking.level("neuron") if u.unit.startswith(site + ".post[")][
                : SMALL["neurons_per_site"]
            ]
    return out


def test_greedy_fix_set_is_verified_and_1_minimal(incident: Path, greedy) -> None:
    session = SandboxReplayer().load_bundle(incident)
    threshold = ForensicsConfig().modules.cca.early_stop_threshold
    variants = _failing(session)
    assert 0 < len(variants) <= CausalCCA().search_variants
    assert greedy.reached_threshold and greedy.members
    assert all(m.level in ("head", "neuron") for m in greedy.members)

    full = greedy.interventions
    without = [[iv for iv in full if iv is not removed] for removed in full]
    rate, *rest = _flip_rates(session, [full, *without], variants)
    assert rate >= threshold
    assert greedy.total_flip_rate == pytest.approx(rate)
    for member, rate_without in zip(greedy.members, rest, strict=True):
        assert rate_without < threshold, f"{member.unit} can be removed: the rest still flips {rate_without:.0%}"
        assert member.necessity == pytest.approx(rate - rate_without)


def test_exhaustive_finds_a_set_no_larger_than_greedy(incident: Path, greedy) -> None:
    session = SandboxReplayer().load_bundle(incident)
    exhaustive = _cca(search_strategy="exhaustive").search_fix_set(session)
    assert exhaustive.strategy == "exhaustive" and exhaustive.reached_threshold
    assert exhaustive.coarse_sites == greedy.coarse_sites
    assert len(exhaustive.members) <= len(greedy.members)

    # Minimum size: no smaller subset of the candidates reaches the threshold.
    candidates = _candidates(session, exhaustive.coarse_sites)
    assert set(exhaustive.units) <= set(candidates) and len(candidates) <= 12
    kind = exhaustive.interventions[0].kind
    smaller = [
        [Intervention(u, kind) for u in subset]
        for subset in itertools.combinations(candidates, len(exhaustive.members) - 1)
    ]
    rates = _flip_rates(session, smaller, _failing(session))
    assert max(rates) < ForensicsConfig().modules.cca.early_stop_threshold


def test_max_fix_set_size_is_respected(incident: Path) -> None:
    fix = _cca({"modules": {"cca": {"max_fix_set_size": 1}}}).search_fix_set(SandboxReplayer().load_bundle(incident))
    assert len(fix.members) <= 1


def test_search_is_deterministic(incident: Path, greedy) -> None:
    again = _cca().search_fix_set(SandboxReplayer().load_bundle(incident))
    assert again.units == greedy.units
    assert again.flips == greedy.flips
    assert again.total_flip_rate == greedy.total_flip_rate


def test_fix_set_json_round_trips_and_replays(incident: Path, greedy) -> None:
    data = json.loads(json.dumps(greedy.to_json()))
    assert data == greedy.to_json()
    assert [m["unit"] for m in data["members"]] == greedy.units
    interventions = [Intervention.from_json(d) for d in data["interventions"]]
    assert interventions == greedy.interventions
    session = SandboxReplayer().load_bundle(incident)
    (rate,) = _flip_rates(session, [interventions], _failing(session))
    assert rate == pytest.approx(data["total_flip_rate"])


def test_incident_that_does_not_fail_has_nothing_to_fix(tiny, tmp_path: Path) -> None:
    loaded = tiny["gpt2"]
    ids = torch.tensor([[1, 5, 9, 3, 7, 2, 8]])
    with torch.no_grad():
        other = int(loaded.model(input_ids=ids).logits[0, -1].argsort()[0])  # the least likely token
    with RecorderHooks().install_hooks(loaded.model) as rec, torch.no_grad():
        loaded.model(input_ids=ids)
        path = rec.create_bundle(tmp_path / "clean", predicate=token_is(other))
    with pytest.raises(ForensicsError, match="nothing to fix"):
        CausalCCA().search_fix_set(SandboxReplayer().load_bundle(path))


def test_unknown_search_strategy_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="greedy"):
        CausalCCA(search_strategy="exhaustiv")


def test_max_fix_set_size_holds_when_the_fix_falls_back_to_sites(tiny, tmp_path: Path) -> None:
    # The tiny Llama's most frequent next token: no single site (or head/neuron) removes it.
    path = _tiny_incident(tiny["llama"], tmp_path / "incident", target=None)
    fix = _cca({"modules": {"cca": {"max_fix_set_size": 1}}}).search_fix_set(SandboxReplayer().load_bundle(path))
    assert not fix.reached_threshold  # the fallback case
    assert len(fix.members) <= 1, f"max_fix_set_size=1 but the fix set has {len(fix.members)}: {fix.units}"


def test_narrowing_to_failure_directions_is_verified_by_replay(tmp_path_factory: pytest.TempPathFactory) -> None:
    # bert-sentiment-bypass: the planted heads write one sentiment direction, so ablating
    # only the component along each head's failure direction still removes the bypass.
    incident = _small_zoo_incident("bert-sentiment-bypass", tmp_path_factory.mktemp("narrow"))
    session = SandboxReplayer().load_bundle(incident)
    whole = _cca(directions="never").search_fix_set(session)
    narrowed = _cca(directions="always").search_fix_set(session)
    assert all(iv.direction is None for iv in whole.interventions)
    assert narrowed.members and all(iv.direction is not None for iv in narrowed.interventions)
    assert {len(iv.direction) for iv in narrowed.interventions} == {session.adapter.d_model // session.adapter.n_heads}
    assert any(note.startswith("narrowed to failure directions") for note in narrowed.notes)

    (rate,) = _flip_rates(session, [narrowed.interventions], _failing(session))
    assert rate == pytest.approx(narrowed.total_flip_rate)
    assert rate >= ForensicsConfig().modules.cca.early_stop_threshold
    kl_whole, kl_narrowed = (
        sum(k) / len(k) for k in benign_kls(session, [whole.interventions, narrowed.interventions])
    )
    assert kl_narrowed <= kl_whole


def test_gated_fix_is_verified_by_replay(tmp_path_factory: pytest.TempPathFactory) -> None:
    # bert-sentiment-bypass: the planted heads sit above block 0, so a gate can read an earlier
    # residual stream. A gated fix must still flip by replay, leave every baseline run
    # bit-identical (the gate's threshold is the largest baseline projection) and cost no
    # more benign KL than the ungated set.
    incident = _small_zoo_incident("bert-sentiment-bypass", tmp_path_factory.mktemp("gate"))
    session = SandboxReplayer().load_bundle(incident)
    plain = _cca(gating="never", directions="never").search_fix_set(session)
    gated = _cca(gating="always", directions="never").search_fix_set(session)
    assert all(iv.gate is None for iv in plain.interventions)
    assert any(note.startswith("gated:") for note in gated.notes), gated.notes
    gates = {iv.gate for iv in gated.interventions}
    assert len(gates) == 1
    (gate,) = gates
    assert gate is not None and gate.site.endswith(".resid_post")
    assert block_index(gate.site) < min(block_index(iv.site) for iv in gated.interventions)

    (rate,) = _flip_rates(session, [gated.interventions], _failing(session))
    assert rate == pytest.approx(gated.total_flip_rate)
    assert rate >= ForensicsConfig().modules.cca.early_stop_threshold
    for batch in session.baselines:
        clean, fixed = session.sweep([[], gated.interventions], inputs=batch)
        assert torch.equal(clean.logits, fixed.logits)
    kl_plain, kl_gated = (sum(k) / len(k) for k in benign_kls(session, [plain.interventions, gated.interventions]))
    assert kl_gated <= kl_plain


def test_a_gate_that_opens_on_too_few_failing_variants_is_not_run(tmp_path_factory: pytest.TempPathFactory) -> None:
    # gpt2-toxic, the fix blocks.1.mlp: the best gate below it opens on 3 of the 12 failing
    # variants. Measured, the gated set flips no more than that (a prompt-read gate that stays
    # shut leaves the failing run as it was), so a fix that needs more is kept ungated
    # without running the gated set; one that needs less runs it.
    from model_forensics.rca import gating
    from model_forensics.rca.attribution import UnitScore
    from model_forensics.rca.candidates import Ablation
    from model_forensics.rca.search import FixChoice, FixSearch

    incident = _small_zoo_incident("gpt2-toxic", tmp_path_factory.mktemp("rare-gate"))
    session = SandboxReplayer().load_bundle(incident)
    units = [UnitScore("blocks.1.mlp", "site", 1.0)]
    measured = gating.fit_gate(FixSearch(session, CausalCCA().config), units, Ablation("mean"))
    assert measured is not None and 0 < measured.detected < 0.5
    assert measured.flip_rate <= measured.detected

    fix = FixChoice(units, Ablation("mean"), 1.0, {})
    search = FixSearch(session, CausalCCA().config)
    notes: list = []
    assert gating.gate_if_it_helps(search, fix, 0.9, notes) is fix
    assert [n.event for n in notes] == ["gate_opens_too_rarely"]
    assert search.memo["flip_checks"] == 0 and search.memo["side_effects"] == 0
    assert "fewer than the 80% it would need, so it was not run" in str(notes[0])

    gating.gate_if_it_helps(search, fix, measured.detected / 2, notes)
    assert notes[-1].event in ("gated", "gating_did_not_help")
    assert search.memo["flip_checks"] == len(search.failing)
    assert notes[-1].numbers["flip_rate"] == measured.flip_rate


def test_gate_threshold_clears_identical_baseline_scores() -> None:
    from model_forensics.rca.cca import gate_threshold

    # Every baseline's prompt-wide maximum is the same template token: zero spread, yet
    # the float rounding of another batch size must not open the gate.
    same = torch.full((30,), -5.79, dtype=torch.float64)
    above, scale = gate_threshold(same)
    assert above > -5.79 + 1e-5 and scale > 0
    spread = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    above, scale = gate_threshold(spread)
    assert scale == pytest.approx(1.0) and above == pytest.approx(3.01)


def test_unknown_directions_mode_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="'auto', 'always' or 'never'"):
        CausalCCA(directions="sometimes")
    with pytest.raises(ConfigError, match="unknown gating mode"):
        CausalCCA(gating="sometimes")
