"""Gates that decide per token position (``Gate(..., reads="each")``): the intervention applies
exactly at the positions whose gate projection exceeds the threshold, in every forward call."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from replay_models import observe

from model_forensics import Intervention, SiteError
from model_forensics.core.errors import ForensicsError
from model_forensics.rca.runs import capture
from model_forensics.replay.interventions import Gate

SITE = "blocks.1.resid_pre"


def _gap_threshold(scores: torch.Tensor) -> float:
    """A threshold in the middle of the widest gap near the median: some positions above, some
    below, none within rounding of it."""
    s = scores.double().sort().values
    n = len(s)
    lo, hi = n // 4, max(n // 4 + 1, 3 * n // 4)
    gaps = s[lo + 1 : hi + 1] - s[lo:hi]
    i = lo + int(gaps.argmax())
    return float((s[i] + s[i + 1]) / 2)


def _unit(d: int, seed: int) -> torch.Tensor:
    u = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return u / u.norm()


@pytest.mark.parametrize("kind", ["steer", "mean"])
def test_positions_below_the_threshold_are_untouched_and_those_above_change_as_ungated(sessions, kind):
    s = sessions["forward"]
    clean = observe(s, SITE, []).double()
    u = _unit(clean.shape[-1], 3)
    proj = clean @ u
    gate = Gate(SITE, tuple(u.tolist()), _gap_threshold(proj), "each")
    over = proj > gate.above
    assert over.any() and not over.all()
    if kind == "steer":
        plain = Intervention(SITE, "steer", value=tuple((0.5 * torch.randn(clean.shape[-1])).tolist()))
    else:
        plain = Intervention(SITE, "mean", direction=tuple(u.tolist()))
    gated = Intervention(plain.site, plain.kind, value=plain.value, direction=plain.direction, gate=gate)
    got = observe(s, SITE, [gated])
    ungated = observe(s, SITE, [plain])
    clean = observe(s, SITE, [])
    assert torch.equal(got[~over], clean[~over])  # bit-identical where the gate stays shut
    assert torch.equal(got[over], ungated[over])  # exactly the ungated change where it fires
    assert not torch.equal(got[over], clean[over])
    assert s.run([gated]).gates == {SITE: True}
    shut = Gate(SITE, gate.direction, float(proj.max()) + 1.0, "each")
    closed = s.run([Intervention(plain.site, plain.kind, value=plain.value, direction=plain.direction, gate=shut)])
    assert torch.equal(closed.logits, s.run([]).logits) and closed.gates == {SITE: False}


def test_generation_steps_are_gated_one_by_one(sessions):
    s = sessions["generate"]
    prompt_len = int(s.inputs["input_ids"].shape[1])
    clean = s.run([])
    ids = clean.outputs["generated_ids"]
    steps = len(ids) - prompt_len

    def states(seq: torch.Tensor) -> torch.Tensor:
        batch = {"input_ids": seq[None], "attention_mask": torch.ones_like(seq)[None]}
        return capture(s, batch, "layer", [SITE])[SITE][:-1].double()  # the positions that predict a token

    u = _unit(states(ids).shape[-1], 5)
    gate = Gate(SITE, tuple(u.tolist()), _gap_threshold(states(ids)[prompt_len - 1 :] @ u), "each")
    fix = Intervention("blocks.1.mlp", "scale", value=0.0, gate=gate)
    run = s.run([fix])
    out = run.outputs["generated_ids"]
    # blocks.1.resid_pre does not depend on the fix (it sits upstream), so the run's own sequence
    # tells where the gate fired: at some generation steps and not at others
    fired = (states(out) @ u > gate.above)[prompt_len - 1 :]
    assert fired.any() and not fired.all()
    # each step's logits are those of the fix applied at exactly the fired positions, as the
    # teacher-forced pass over the same sequence (which reads all positions at once) gives them
    batch = {"input_ids": out[None], "attention_mask": torch.ones_like(out)[None]}
    forced = s.forced(batch, [s.prepare([fix], batch)], prompt_len=prompt_len)[0, prompt_len - 1 : -1]
    assert torch.allclose(run.outputs["logits"].double(), forced.double(), atol=1e-4)
    assert torch.equal(out[prompt_len:], run.outputs["logits"].argmax(-1)) and steps == len(out) - prompt_len
    # and the run is not the ungated one
    assert not torch.allclose(
        run.outputs["logits"], s.run([Intervention("blocks.1.mlp", "scale", value=0.0)]).outputs["logits"]
    )
    swept = s.sweep([[fix], []])
    assert swept[0].text == run.text and swept[1].text == clean.text


def test_side_effects_count_a_gate_that_opens_only_during_the_reply(sessions):
    # A gate shut at every prompt position that opens at a generated one: side_effects.measure
    # counts the prompt as one the gate fired on (it reads RunResult.gates of the fixed run,
    # every generation step included; a capture of the prompt alone would count none).
    from model_forensics.rca.side_effects import measure

    s = sessions["generate"]
    prompt_len = int(s.inputs["input_ids"].shape[1])
    ids = s.run([]).outputs["generated_ids"]
    batch = {"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None]}
    states = capture(s, batch, "layer", [SITE])[SITE][:-1].double()  # the positions that predict a token
    prompt, reply = states[:prompt_len], states[prompt_len:]
    assert len(reply) > 0
    units = reply / reply.norm(dim=-1, keepdim=True)  # candidate directions: each reply state's own
    gaps = (reply * units).sum(-1) - (prompt @ units.T).max(0).values  # own projection above the prompt's max
    j = int(gaps.argmax())
    assert gaps[j] > 0
    u = units[j]
    above = float((prompt @ u).max() + gaps[j] / 2)
    gate = Gate(SITE, tuple(u.tolist()), above, "each")
    assert gate.score(prompt) < above  # shut over the whole prompt
    fix = Intervention("blocks.1.mlp", "scale", value=0.0, gate=gate)
    effects = measure(s, [fix], 0.05, benign=[s.inputs["input_ids"][0].tolist()])
    assert effects.n_benign == 1 and effects.gate_fired == 1.0
    never = Intervention("blocks.1.mlp", "scale", value=0.0, gate=Gate(SITE, gate.direction, above + 1e6, "each"))
    assert measure(s, [never], 0.05, benign=[s.inputs["input_ids"][0].tolist()]).gate_fired == 0.0


def test_each_gates_round_trip_and_must_be_read_first(sessions):
    gate = Gate("blocks.0.resid_post", (1.0, -0.5), 2.5, "each")
    iv = Intervention("blocks.1.attn.head.2", "mean", gate=gate)
    assert Intervention.from_json(iv.to_json()) == iv
    assert "@each" in str(iv) and Intervention.parse(str(iv)) == iv
    parsed = Intervention.parse("blocks.1.mlp:zero:gate=blocks.0.resid_post>1.5@each:gate_direction=1,2")
    assert parsed.gate == Gate("blocks.0.resid_post", (1.0, 2.0), 1.5, "each")
    with pytest.raises(ForensicsError, match="'last', 'max' or 'each'"):
        Gate("blocks.0.resid_post", (1.0,), 0.0, "any")
    s = sessions["forward"]
    d = observe(s, SITE, []).shape[-1]
    downstream = Gate("blocks.1.resid_post", tuple([1.0] * d), 0.0, "each")
    with pytest.raises(SiteError, match="had not reached"):
        s.run([Intervention("blocks.0.mlp", "zero", gate=downstream)])


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory):
    from model_forensics import SandboxReplayer
    from model_forensics.models import zoo
    from model_forensics.scenarios import get

    if "gpt2-injection" not in zoo.names():
        pytest.skip("zoo weights not shipped")
    bundle = get("gpt2-injection").record(tmp_path_factory.mktemp("inj"), limit=1).incidents[0]
    return SandboxReplayer().load_bundle(bundle)


def test_the_exported_hook_module_applies_each_gates_as_replay(gpt2, tmp_path: Path):
    from model_forensics.models.hooks import logits_of
    from model_forensics.replay.export import export_fix

    s = gpt2
    site = "blocks.0.resid_post"
    clean = capture(s, s.inputs, "layer", [site])[site].double()
    u = _unit(clean.shape[-1], 7)
    gate = Gate(site, tuple(u.tolist()), _gap_threshold(clean @ u), "each")
    fix = [
        Intervention("blocks.1.attn.head.2", "mean", gate=gate),
        Intervention("blocks.1.resid_post", "steer", value=tuple((0.3 * torch.randn(len(u))).tolist()), gate=gate),
    ]
    export_fix(s, fix, tmp_path / "out")
    spec = importlib.util.spec_from_file_location("apply_fix_each", tmp_path / "out" / "apply_fix.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    from model_forensics import SandboxReplayer

    model = SandboxReplayer().load_bundle(s.bundle.path).model
    for batch in [s.inputs, *s.variants()[:2], *s.benign()[:2]]:
        with module.apply_fix(model), torch.no_grad():
            got = logits_of(model(**batch.expand(1))).double()
        hooked = s.forced(batch, [s.prepare(fix, batch)]).double()
        assert (got - hooked).abs().max() < 1e-5
        # generation: each step gated by its own position, as in replay
        with module.apply_fix(model), torch.no_grad():
            ids = batch.expand(1)
            out = model.generate(**ids, **s.generation)
        text = s.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        assert text == s.run(fix, inputs=batch).text
    with torch.no_grad():
        plain = logits_of(model(**s.inputs.expand(1))).double()
    assert not torch.allclose(plain, s.forced(s.inputs, [s.prepare(fix, s.inputs)]).double())
