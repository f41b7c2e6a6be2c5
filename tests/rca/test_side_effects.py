"""Side effects of a fix on the benign set: the numbers match an independent recomputation,
and a fix above the configured KL bound is reported as such."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from model_forensics import CausalCCA, ForensicsConfig, Intervention, SandboxReplayer
from model_forensics.models.inputs import ModelInputs
from model_forensics.rca.side_effects import measure
from model_forensics.scenarios import get


@pytest.fixture(scope="module")
def incident(tmp_path_factory: pytest.TempPathFactory):
    """bert-sentiment-bypass cut to 12 failing prompts and 8 benign reviews with their labels."""
    scenario = get("bert-sentiment-bypass")
    small = dataclasses.replace(
        scenario, variants=scenario.variants[:9], benign=scenario.benign[:8], baseline=scenario.baseline[:8]
    )
    return small.record(tmp_path_factory.mktemp("bert"), limit=1).incidents[0]


def _kl(clean: torch.Tensor, fixed: torch.Tensor) -> float:
    """KL(p_clean ‖ p_fixed) in nats, (C,) scores."""
    return float(F.kl_div(fixed.log_softmax(-1), clean.log_softmax(-1), log_target=True, reduction="sum"))


def _recompute(session, fix: list[Intervention]) -> dict[str, float]:
    kls, changed, right_clean, right_fixed = [], 0, 0, 0
    for entry, batch in zip(session.extras["benign"], session.benign(), strict=True):
        clean, fixed = session.sweep([[], fix], inputs=batch)
        kls.append(_kl(clean.logits, fixed.logits))
        changed += clean.failed != fixed.failed
        right_clean += clean.prediction == entry["expected"]
        right_fixed += fixed.prediction == entry["expected"]
    n = len(kls)
    return {
        "mean_kl": sum(kls) / n,
        "max_kl": max(kls),
        "predicate_changed": changed / n,
        "accuracy_clean": right_clean / n,
        "accuracy_fixed": right_fixed / n,
    }


def test_fix_above_a_tiny_kl_bound_is_reported_with_a_note(incident) -> None:
    config = ForensicsConfig.from_mapping({"modules": {"cca": {"max_side_effect_kl": 1e-9}}})
    session = SandboxReplayer().load_bundle(incident)
    # Ungated: a gate would keep every benign run bit-identical and so within any bound.
    fix = CausalCCA(config, neurons_per_site=8, confirm_top=8, gating="never").search_fix_set(session)

    effects = fix.side_effects
    assert effects is not None and effects.bound == 1e-9
    assert effects.mean_kl > effects.bound
    assert not effects.within_bound and fix.to_json()["side_effects"]["within_bound"] is False
    assert any("side effects exceed the bound" in note for note in fix.notes)
    assert effects.mean_kl == pytest.approx(_recompute(session, fix.interventions)["mean_kl"], rel=1e-4)
    # the same fix under the default bound is within it
    assert measure(session, fix.interventions, ForensicsConfig().modules.cca.max_side_effect_kl).within_bound

    for member in fix.members:
        if member.benign_kl is not None:  # the member alone, on every benign prompt
            # (the search computes it in a batch of many candidates: float32 rounding differs
            # from this two-row sweep at KLs of ~1e-6)
            assert member.benign_kl == pytest.approx(
                _recompute(session, [member.intervention])["mean_kl"], rel=1e-2, abs=1e-9
            )


def test_measure_matches_an_independent_recomputation(incident) -> None:
    session = SandboxReplayer().load_bundle(incident)
    # A blunt fix that changes predictions on benign reviews too.
    fix = [Intervention("blocks.0.attn", "zero"), Intervention("blocks.1.attn", "zero")]
    effects = measure(session, fix, bound=0.05)
    expected = _recompute(session, fix)
    assert effects.n_benign == len(session.benign())
    for name, value in expected.items():
        assert getattr(effects, name) == pytest.approx(value, rel=1e-4, abs=1e-9), name
    assert effects.accuracy_drop == pytest.approx(expected["accuracy_clean"] - expected["accuracy_fixed"])
    assert effects.mean_kl > 0.05 and not effects.within_bound


def test_empty_fix_has_no_side_effects(incident) -> None:
    session = SandboxReplayer().load_bundle(incident)
    effects = measure(session, [], bound=0.0)
    assert effects.mean_kl == 0.0 and effects.max_kl == 0.0
    assert effects.predicate_changed == 0.0
    assert effects.accuracy_fixed == effects.accuracy_clean
    assert effects.within_bound


def test_generation_kl_covers_every_step_of_the_clean_answer(tmp_path_factory: pytest.TempPathFactory) -> None:
    # gpt2-injection generates 8 tokens. Zeroing an MLP at one position past every benign
    # prompt leaves the first decoding step alone but changes later steps of the answer.
    scenario = get("gpt2-injection")
    small = dataclasses.replace(
        scenario, variants=scenario.variants[:3], benign=scenario.benign[:6], baseline=scenario.baseline[:4]
    )
    session = SandboxReplayer().load_bundle(small.record(tmp_path_factory.mktemp("gen"), limit=1).incidents[0])
    assert session.mode == "generate"
    late = max(int(b["input_ids"].shape[1]) for b in session.benign()) + 1
    effects = measure(session, [Intervention("blocks.0.mlp", "zero", positions=(late,))], bound=0.05)
    assert effects.first_step_kl == 0.0
    assert effects.mean_kl > 0.0
    assert effects.to_json()["first_step_kl"] == 0.0

    # Changing the first step too: both see it, and the whole answer averages it in.
    both = measure(session, [Intervention("blocks.0.mlp", "zero")], bound=0.05)
    assert both.first_step_kl is not None and both.first_step_kl > 0.0 and both.mean_kl > 0.0


def test_the_answer_kl_pass_entering_at_the_fixs_block_equals_the_whole_pass(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # The two-row teacher-forced pass of side effects (clean, fixed) entering at the fix's
    # first block on the shared clean prefix (the clean row: only the final norm and head)
    # gives the KLs and kept answers the whole two-row pass gives, to float rounding.
    from model_forensics.rca import flips, side_effects

    scenario = get("gpt2-injection")
    small = dataclasses.replace(
        scenario, variants=scenario.variants[:3], benign=scenario.benign[:4], baseline=scenario.baseline[:4]
    )
    session = SandboxReplayer().load_bundle(small.record(tmp_path_factory.mktemp("kl"), limit=1).incidents[0])
    fixes = [[Intervention("blocks.1.attn.head.0", "zero")], [Intervention("blocks.1.mlp", "scale", value=0.5)]]
    for batch in session.benign():
        clean = flips.clean_run(session, batch)
        forced = ModelInputs.of_ids(clean.outputs["generated_ids"].reshape(1, -1)[:, :-1])
        for fix in fixes:
            whole_kl, whole_kept = side_effects._forced(session, fix, batch, clean, share=False)
            for _ in range(2):  # the first ask of an input may run whole; the second shares its prefix
                kl, kept = side_effects._forced(session, fix, batch, clean, share=True)
            assert session.prefixes.get(forced.key) is not None
            assert torch.allclose(kl, whole_kl, rtol=1e-5, atol=1e-7), (kl, whole_kl)
            assert (kept is None) == (whole_kept is None)
            if kept is not None and whole_kept is not None:
                assert (kept.text, kept.failed, kept.opened) == (whole_kept.text, whole_kept.failed, whole_kept.opened)
