"""Interventions: data round-trips, site resolution errors, and what each kind computes."""

from __future__ import annotations

import json

import pytest
import torch
from replay_models import BASELINES, observe

from model_forensics import Intervention, SiteError
from model_forensics.core.errors import ForensicsError
from model_forensics.replay.interventions import Gate


def test_json_round_trip_is_exact():
    ivs = [
        Intervention("blocks.1.attn.head.3", "zero"),
        Intervention("blocks.0.mlp", "scale", value=0.5),
        Intervention("blocks.2.mlp.post[17]@pos=5", "noise", value=0.25, seed=7),
        Intervention("embed", "steer", value=[0.1, -2.0, 1e-9]),
        Intervention("blocks.0.attn.z", "patch", heads=[1, 2], positions=[-1], source="b.mfb.zip", align="last"),
        Intervention("blocks.0.mlp", "mean", source=["a", "b"]),
        Intervention("blocks.1.attn.head.2", "mean", direction=[0.3, -1.0, 1 / 3]),
        Intervention("blocks.1.resid_post", "clamp", value=2.5, direction=[1.0, 0.5]),
    ]
    for iv in ivs:
        again = Intervention.from_json(iv.to_json())
        assert again == iv
        assert again.to_json() == iv.to_json()


def test_cli_spec_parses_into_the_same_data():
    assert Intervention.parse("blocks.1.attn.head.3:zero") == Intervention("blocks.1.attn.head.3", "zero")
    assert Intervention.parse("blocks.0.mlp:scale=0.5") == Intervention("blocks.0.mlp", "scale", value=0.5)
    assert Intervention.parse("blocks.2.mlp.post[17]@pos=5:zero").site == "blocks.2.mlp.post[17]@pos=5"
    noise = Intervention.parse("blocks.0.mlp:noise=0.5:seed=3")
    assert (noise.value, noise.seed) == (0.5, 3)
    assert Intervention.parse("embed:steer=1,0,-2").value == (1.0, 0.0, -2.0)
    assert Intervention.parse(str(noise)) == noise
    directed = Intervention("blocks.1.attn.head.2", "mean", direction=[0.1, -2.5, 1 / 3])
    assert Intervention.parse(str(directed)) == directed
    with pytest.raises(ForensicsError, match="SITE:KIND"):
        Intervention.parse("blocks.0.mlp")
    with pytest.raises(ForensicsError, match="kind 'explode' is unknown"):
        Intervention.parse("blocks.0.mlp:explode")


def test_bad_values_are_rejected_on_construction():
    with pytest.raises(ForensicsError, match="needs value=FACTOR"):
        Intervention("blocks.0.mlp", "scale")
    with pytest.raises(ForensicsError, match="steer"):
        Intervention("blocks.0.mlp", "steer", value=1.0)
    with pytest.raises(ForensicsError, match="non-zero direction"):
        Intervention("blocks.0.mlp", "zero", direction=[0.0, 0.0])
    with pytest.raises(ForensicsError, match="needs value=CAP"):
        Intervention("blocks.0.mlp", "clamp")


def test_unknown_site_lists_nearest_names(sessions):
    s = sessions["forward"]
    with pytest.raises(SiteError, match=r"blocks\.9\.mlp' does not exist; the model has 2 blocks \(0–1\); nearest: "):
        s.run([Intervention("blocks.9.mlp", "zero")])
    with pytest.raises(SiteError, match=r"head 7 does not exist: 'blocks\.1\.attn' has 4 query heads \(0–3\)"):
        s.run([Intervention("blocks.1.attn.head.7", "zero")])
    with pytest.raises(SiteError, match="read-only"):
        s.run([Intervention("blocks.0.attn.pattern", "zero")])
    with pytest.raises(SiteError, match="out of range"):
        s.run([Intervention("blocks.0.mlp.post[999]", "zero")])


def test_zero_head_touches_only_that_query_head(sessions):
    s = sessions["forward"]  # GQA: 4 query heads over 2 key/value heads
    clean = observe(s, "blocks.1.attn.z", [])
    z = observe(s, "blocks.1.attn.z", [Intervention("blocks.1.attn.head.3", "zero")])
    assert torch.equal(z[:, 3], torch.zeros_like(z[:, 3]))
    assert torch.equal(z[:, :3], clean[:, :3])


def test_neurons_and_positions_narrow_the_target(sessions):
    s = sessions["forward"]
    clean = observe(s, "blocks.0.mlp.post", [])
    x = observe(s, "blocks.0.mlp.post", [Intervention("blocks.0.mlp.post[3,5]@pos=2,-1", "scale", value=2.0)])
    changed = (x != clean).nonzero().tolist()
    assert {(p, n) for p, n in changed} <= {(2, 3), (2, 5), (15, 3), (15, 5)}
    assert torch.equal(x[2, [3, 5]], clean[2, [3, 5]] * 2)
    assert torch.equal(x[15, [3, 5]], clean[15, [3, 5]] * 2)


def test_several_interventions_compose_in_list_order(sessions):
    s = sessions["forward"]
    clean = observe(s, "blocks.0.mlp.post", [])
    v = [1.0] * clean.shape[-1]
    a = observe(
        s,
        "blocks.0.mlp.post",
        [Intervention("blocks.0.mlp.post", "scale", value=2.0), Intervention("blocks.0.mlp.post", "steer", value=v)],
    )
    b = observe(
        s,
        "blocks.0.mlp.post",
        [Intervention("blocks.0.mlp.post", "steer", value=v), Intervention("blocks.0.mlp.post", "scale", value=2.0)],
    )
    assert torch.allclose(a, clean * 2 + 1)
    assert torch.allclose(b, (clean + 1) * 2)


def test_noise_is_seeded_and_in_std_units(sessions):
    s = sessions["forward"]
    clean = observe(s, "blocks.0.mlp.post", [])
    one = observe(s, "blocks.0.mlp.post", [Intervention("blocks.0.mlp.post", "noise", value=0.5, seed=1)])
    again = observe(s, "blocks.0.mlp.post", [Intervention("blocks.0.mlp.post", "noise", value=0.5, seed=1)])
    other = observe(s, "blocks.0.mlp.post", [Intervention("blocks.0.mlp.post", "noise", value=0.5, seed=2)])
    assert torch.equal(one, again)
    assert not torch.equal(one, other)
    ratio = float((one - clean).std() / clean.std())
    assert 0.4 < ratio < 0.6


def test_mean_uses_the_baseline_set(sessions):
    from model_forensics.recorder import RecorderHooks

    s = sessions["forward"]
    acts = []
    for prompt in BASELINES:
        with RecorderHooks(sites=["blocks.1.attn.z"], sketch="full").install_hooks(s.model) as rec, torch.no_grad():
            s.model(**s.encode(prompt))
            acts.append(rec.recorded()["blocks.1.attn.z"][0])
    expected = torch.cat(acts).double().mean(0).float()  # (heads, d_head)
    z = observe(s, "blocks.1.attn.z", [Intervention("blocks.1.attn.head.2", "mean")])
    assert torch.allclose(z[:, 2], expected[2].expand_as(z[:, 2]))
    # align='last': the mean of each baseline's last prompt position
    last = torch.stack([a[-1] for a in acts]).double().mean(0).float()
    z = observe(s, "blocks.1.attn.z", [Intervention("blocks.1.attn.head.2", "mean", align="last")])
    assert torch.allclose(z[:, 2], last[2].expand_as(z[:, 2]))
    assert not torch.allclose(last[2], expected[2])


def test_direction_changes_only_the_component_along_it(sessions):
    s = sessions["forward"]
    clean = observe(s, "blocks.1.attn.z", [])[:, 2].double()  # (T, d_head)
    full = observe(s, "blocks.1.attn.z", [Intervention("blocks.1.attn.head.2", "mean")])[:, 2].double()
    u = torch.randn(clean.shape[-1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = observe(s, "blocks.1.attn.z", [Intervention("blocks.1.attn.head.2", "mean", direction=u.tolist())])
    got = got[:, 2].double()
    u = u / u.norm()
    # Along û: the baseline mean's component; orthogonal to û: untouched.
    assert torch.allclose(got @ u, full @ u, atol=1e-5)
    assert torch.allclose(got - (got @ u)[:, None] * u, clean - (clean @ u)[:, None] * u, atol=1e-5)
    assert not torch.allclose(got, clean, atol=1e-3)
    with pytest.raises(ForensicsError, match="direction of length 3"):
        s.run([Intervention("blocks.1.attn.head.2", "mean", direction=[1.0, 0.0, 0.0])])


def test_clamp_caps_the_component_along_a_direction_and_leaves_the_rest(sessions):
    s = sessions["forward"]
    clean = observe(s, "blocks.1.resid_pre", []).double()  # (T, d_model)
    u = torch.randn(clean.shape[-1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    u = u / u.norm()
    proj = clean @ u
    cap = float(proj.median())  # about half the positions sit above it
    got = observe(
        s, "blocks.1.resid_pre", [Intervention("blocks.1.resid_pre", "clamp", value=cap, direction=u.tolist())]
    )
    got = got.double()
    over = proj > cap
    assert over.any() and (~over).any()
    # Positions under the cap pass bit for bit; above it, the component along û is the cap.
    assert torch.equal(got[~over], clean[~over])
    assert torch.allclose(got[over] @ u, torch.full_like(proj[over], cap), atol=1e-4)
    assert torch.allclose(got - (got @ u)[:, None] * u, clean - proj[:, None] * u, atol=1e-4)
    # Without a direction the cap is elementwise.
    flat = observe(s, "blocks.1.resid_pre", [Intervention("blocks.1.resid_pre", "clamp", value=0.1)]).double()
    assert torch.equal(flat, clean.clamp(max=0.1).to(flat.dtype))


def _gate_at_last_position(session, offset: float, reads: str = "last") -> Gate:
    """A gate on blocks.1.resid_pre whose threshold sits ``offset`` above the clean run's
    score: the projection at the last prompt position, or the largest over the prompt."""
    from model_forensics.rca.runs import capture

    clean = capture(session, session.inputs, "layer", ["blocks.1.resid_pre"])["blocks.1.resid_pre"].double()
    u = torch.randn(clean.shape[-1], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    proj = clean @ (u / u.norm())
    score = proj[-1] if reads == "last" else proj.max()
    assert reads == "last" or proj.argmax() != len(proj) - 1  # the two readings differ here
    return Gate("blocks.1.resid_pre", tuple(u.tolist()), float(score) + offset, reads)


@pytest.mark.parametrize("reads", ["last", "max"])
def test_gate_applies_the_intervention_only_when_the_detector_fires(sessions, reads):
    for mode in ("forward", "generate"):
        s = sessions[mode]
        fix = Intervention("blocks.1.mlp", "scale", value=0.0)
        plain = s.run([fix])
        clean = s.run([])
        assert not torch.equal(plain.logits, clean.logits)
        opened = s.run([Intervention("blocks.1.mlp", "scale", value=0.0, gate=_gate_at_last_position(s, -1e-3, reads))])
        closed = s.run([Intervention("blocks.1.mlp", "scale", value=0.0, gate=_gate_at_last_position(s, 1e-3, reads))])
        # Open: the same run as the ungated intervention, every generation step included.
        assert torch.equal(opened.logits, plain.logits) and opened.text == plain.text
        # Closed: bit-identical to the clean run.
        assert torch.equal(closed.logits, clean.logits) and closed.text == clean.text
        if mode == "generate":
            assert torch.equal(opened.outputs["generated_ids"], plain.outputs["generated_ids"])
        # Batched sweeps (which reuse the clean prefix below the earliest site) agree.
        swept = s.sweep([list(opened.interventions), list(closed.interventions)])
        assert swept[0].text == plain.text and swept[1].text == clean.text
        assert torch.allclose(swept[0].logits, plain.logits, atol=1e-5)
        assert torch.allclose(swept[1].logits, clean.logits, atol=1e-5)


def test_gate_round_trips_and_must_sit_upstream(sessions):
    for reads in ("last", "max", "each"):
        iv = Intervention("blocks.1.attn.head.2", "mean", gate=Gate("blocks.0.resid_post", (1.0, -0.5), 2.5, reads))
        assert Intervention.from_json(json.loads(json.dumps(iv.to_json()))) == iv
        assert Intervention.parse(str(iv)) == iv
    with pytest.raises(ForensicsError, match="reads 'last', 'max' or 'each'"):
        Gate("blocks.0.resid_post", (1.0,), 0.0, "mean")
    with pytest.raises(ForensicsError, match="gate=SITE>ABOVE and :gate_direction="):
        Intervention.parse("blocks.1.mlp:zero:gate=blocks.0.resid_post>1")
    s = sessions["forward"]
    downstream = _gate_at_last_position(s, 0.0)
    with pytest.raises(SiteError, match="upstream"):
        s.run([Intervention("blocks.0.mlp", "zero", gate=downstream)])
    with pytest.raises(SiteError, match="gate site 'blocks.7.resid_post' does not exist"):
        s.run([Intervention("blocks.1.mlp", "zero", gate=Gate("blocks.7.resid_post", (1.0,), 0.0))])


def test_patch_takes_the_baseline_activation_by_position(sessions):
    s = sessions["forward"]
    base = s.encode(BASELINES[0])
    with torch.no_grad():
        hidden = s.model(**base, output_hidden_states=True).hidden_states[1][0]  # input of block 1
    x = observe(
        s, "blocks.1.resid_pre", [Intervention("blocks.1.resid_pre@pos=4", "patch", source=f"prompt:{BASELINES[0]}")]
    )
    clean = observe(s, "blocks.1.resid_pre", [])
    assert torch.equal(x[4], hidden[4])
    assert torch.equal(x[:4], clean[:4]) and torch.equal(x[5:], clean[5:])


def test_patch_of_another_length_needs_align_last(sessions):
    s = sessions["forward"]
    short = "w5 w6 w7 w8"
    with pytest.raises(ForensicsError, match="baseline has 4 tokens but the incident prompt has 16.*align='last'"):
        s.run([Intervention("blocks.1.resid_pre", "patch", source=f"prompt:{short}")])
    x = observe(
        s, "blocks.1.resid_pre", [Intervention("blocks.1.resid_pre", "patch", source=f"prompt:{short}", align="last")]
    )
    clean = observe(s, "blocks.1.resid_pre", [])
    with torch.no_grad():
        hidden = s.model(**s.encode(short), output_hidden_states=True).hidden_states[1][0]
    assert torch.equal(x[-4:], hidden) and torch.equal(x[:-4], clean[:-4])


def test_resample_picks_one_baseline_example_by_seed(sessions):
    s = sessions["forward"]
    picks = {
        tuple(observe(s, "blocks.0.mlp.post", [Intervention("blocks.0.mlp.post", "resample", seed=k)])[0, :3].tolist())
        for k in range(6)
    }
    assert 1 <= len(picks) <= len(BASELINES)


def test_patch_from_a_bundle(sessions, lms, tmp_path):
    from replay_models import record

    s = sessions["forward"]
    other = record(lms["llama"], tmp_path / "clean", prompt=BASELINES[1])
    x = observe(s, "blocks.1.resid_pre", [Intervention("blocks.1.resid_pre", "patch", source=str(other))])
    with torch.no_grad():
        hidden = s.model(**s.encode(BASELINES[1]), output_hidden_states=True).hidden_states[1][0]
    assert torch.equal(x, hidden)


def test_generation_patched_from_a_recorded_generation_follows_it(sessions, lms, tmp_path):
    from replay_models import record

    s = sessions["generate"]
    steps = s.generation["max_new_tokens"]
    other = record(lms["llama"], tmp_path / "clean", prompt=BASELINES[0], max_new_tokens=steps)
    clean_text = json.loads((other / "manifest.json").read_text())["output"]["text"]
    # block 1 sees the baseline's residual stream at every prompt and generated position
    patched = s.run([Intervention("blocks.1.resid_pre", "patch", source=str(other))])
    assert patched.text == clean_text != s.manifest["output"]["text"]
