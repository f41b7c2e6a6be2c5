"""The analysis's shortcuts give the figures the straightforward method gives.

* the teacher-forced screen (:mod:`~model_forensics.rca.flips`): flips equal generating
  every set (:func:`model_forensics.rca.runs.flip_table`), and it stands aside where it
  would not be exact; the same screen for answers kept word for word (side effects) equals
  generating every fixed answer, and the failing variants read from kept clean runs are the
  same;
* no set is measured twice (:class:`~model_forensics.rca.search.FixSearch` keeps every
  flip and side-effect measurement): a repeat runs nothing, and a found fix set's flips,
  members' necessity/sufficiency and side effects equal measuring them afresh.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from model_forensics import CausalCCA, SandboxReplayer
from model_forensics.core.config import load_config
from model_forensics.models import zoo
from model_forensics.rca import flips, runs
from model_forensics.rca.attribution import attribution_ranking
from model_forensics.rca.candidates import Ablation
from model_forensics.rca.search import FixSearch
from model_forensics.rca.side_effects import measure
from model_forensics.replay import Intervention, Session

SCENARIOS = ["gpt2-toxic", "bert-sentiment-bypass", "gpt2-injection"]
pytestmark = pytest.mark.skipif(
    not set(SCENARIOS) <= set(zoo.names()), reason="the zoo's trained weights are not shipped in this checkout"
)


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Session]:
    from model_forensics.scenarios import get

    bundles: dict[str, Path] = {
        name: get(name).record(tmp_path_factory.mktemp(name), limit=1).incidents[0] for name in SCENARIOS
    }
    return {name: SandboxReplayer().load_bundle(bundle) for name, bundle in bundles.items()}


def test_screened_flips_equal_generating_every_set(sessions: dict[str, Session]) -> None:
    session = sessions["gpt2-toxic"]
    assert flips.exact(session)  # greedy generation, a text predicate
    assert not flips.screens(session)  # but a 0.3M-parameter model: not worth it by default
    failing = runs.failing_variants(session)[:4]
    ranking = attribution_ranking(session)
    fine = [u for u in ranking.units if u.level in ("head", "neuron")]
    ablate = Ablation("mean")
    # single units (most keep the clean answer) and growing rank-order prefixes (some flip)
    sets = [[], *([ablate(u)] for u in fine[:24]), *(ablate.all(fine[:k]) for k in range(2, 10))]
    for batch in failing:
        flips.clean_answer(session, batch)  # the clean answers, once per variant (the search has them)
    before = session.counter.rows
    expected = runs.flip_table(session, failing, sets)
    generating = session.counter.rows - before
    got = flips.flip_table(session, failing, sets, screen=True)
    screened = session.counter.rows - before - generating
    assert got == expected
    assert screened < generating  # fewer model rows (prompt × set, every forward call)
    assert any(any(f) for f in expected) and not all(all(f) for f in expected)  # both verdicts occur
    # the screen settles some sets without generating them, not all
    clean = flips.clean_answer(session, failing[0])
    kept = [step is None for step in flips.divergences(session, failing[0], clean.ids, sets)]
    assert clean.screens and kept[0] and 0 < sum(kept) < len(sets)


def test_flips_each_gives_every_variant_its_own_sets(sessions: dict[str, Session]) -> None:
    # Each variant with its own sets (none, one, three, six): generated together or screened,
    # every variant's flips are those of its own flip table.
    session = sessions["gpt2-toxic"]
    failing = runs.failing_variants(session)[:4]
    fine = [u for u in attribution_ranking(session).units if u.level in ("head", "neuron")]
    ablate = Ablation("mean")
    own = [[[]], [ablate.all(fine[:k]) for k in (2, 5, 9)], [], [[ablate(u)] for u in fine[:6]]]
    work = list(zip(failing, own, strict=True))
    expected = [[column[0] for column in runs.flip_table(session, [v], sets)] for v, sets in work]
    assert runs.flips_each(session, work) == expected
    assert flips.flips_each(session, work, screen=True) == expected
    assert [len(f) for f in expected] == [1, 3, 0, 6]
    assert any(any(f) for f in expected) and not all(all(f) for f in expected)  # both verdicts occur


def test_a_set_that_changes_the_answer_after_the_verdict_settled_is_not_generated(
    sessions: dict[str, Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The clean reply is "HACKED" then EOS: its first token settles the verdict. A set that
    # changes only the second step's argmax keeps the verdict and is not generated; one that
    # changes the first is generated. Both verdicts equal generating every set.
    session = sessions["gpt2-injection"]
    variant = runs.failing_variants(session)[0]
    clean = flips.clean_answer(session, variant)
    prompt_len = session.encode(variant).length
    assert clean.screens and clean.failed and clean.settle == 1 and len(clean.ids) == prompt_len + 2
    late = [Intervention(f"final@pos={prompt_len}", "scale", value=-1.0)]  # the second step's scores only
    early = [Intervention("final@pos=-1", "scale", value=-1.0)]  # the last prompt token: the first step's
    assert flips.divergences(session, variant, clean.ids, [late, early, []]) == [1, 0, None]
    generated: list[list[int]] = []
    plain = runs.flips_each

    def spy(session: Session, work, tick=None):
        generated.append([len(sets) for _, sets in work])
        return plain(session, work, tick)

    screened: list[int] = []
    divergences = flips.divergences

    def screen_spy(session: Session, batch, ids, sets, share_prefix=True):
        screened.append(len(ids))
        return divergences(session, batch, ids, sets, share_prefix)

    monkeypatch.setattr(runs, "flips_each", spy)
    monkeypatch.setattr(flips, "divergences", screen_spy)
    got = flips.flips_each(session, [(variant, [late, early, []])], screen=True)
    monkeypatch.undo()
    assert generated == [[1]]  # early alone
    assert screened == [prompt_len + 1]  # the screen stops at the settle point
    expected = [column[0] for column in runs.flip_table(session, [variant], [late, early, []])]
    assert got == [expected] and expected == [False, True, False]


def test_screen_stands_aside_where_it_would_not_be_exact(sessions: dict[str, Session]) -> None:
    assert not flips.exact(sessions["bert-sentiment-bypass"])  # a classifier: nothing generated
    session = sessions["gpt2-toxic"]
    saved = dict(session.generation)
    try:
        session.generation["repetition_penalty"] = 1.3  # a processor that can move an argmax
        assert not flips.exact(session)
    finally:
        session.generation = saved
    assert flips.exact(session)


def test_a_measured_set_is_not_run_again(sessions: dict[str, Session]) -> None:
    session = sessions["gpt2-toxic"]
    search = FixSearch(session, load_config(None).modules.cca)
    ranking = attribution_ranking(session)
    fix = Ablation("mean").all([u for u in ranking.units if u.level == "neuron"][:3])
    first = search.flip_table(search.failing, [fix, fix[:1]])
    effects = search.side_effects(fix)
    passes = session.forward_passes
    assert search.flip_table(search.failing, [fix[:1], fix]) == [first[1], first[0]]
    assert search.flips(search.failing[:2], fix) == first[0][:2]
    assert search.side_effects(fix) is effects and search.benign_kl(fix) == effects.mean_kl
    assert session.forward_passes == passes  # nothing ran
    # the clean run of an input, which ranking, exact patching and the screen read, runs once
    variant = session.variants()[1]
    clean = flips.clean_run(session, variant)
    again = session.run(inputs=variant)
    assert (clean.text, clean.failed) == (again.text, again.failed)
    assert clean.outputs["generated_ids"].tolist() == again.outputs["generated_ids"].tolist()
    passes = session.forward_passes
    assert flips.clean_run(session, session.encode(variant)) is clean and session.forward_passes == passes


@pytest.mark.parametrize("name", SCENARIOS)
def test_fix_set_figures_equal_measuring_afresh(sessions: dict[str, Session], name: str) -> None:
    session = sessions[name]
    fix = CausalCCA(search_variants=6, confirm_top=8, confirm_variants=4).search_fix_set(session)
    assert fix.members
    failing = runs.failing_variants(session)
    full = fix.interventions
    without = [[iv for iv in full if iv is not m] for m in full]
    table = runs.flip_table(session, failing, [full, *without, *([iv] for iv in full)])
    rates = [runs.flip_rate(f) for f in table]
    assert fix.flips == table[0] and fix.total_flip_rate == rates[0]
    n = len(full)
    for i, member in enumerate(fix.members):
        assert member.necessity == rates[0] - rates[1 + i]
        assert member.sufficiency == rates[1 + n + i]
    cfg = load_config(None).modules.cca
    fresh = measure(session, full, cfg.max_side_effect_kl, max_accuracy_drop=cfg.max_accuracy_drop)
    assert fix.side_effects is not None and fix.side_effects.to_json() == fresh.to_json()


def test_shared_prefix_screen_equals_whole_model_passes(sessions: dict[str, Session]) -> None:
    from model_forensics.models.inputs import ModelInputs
    from model_forensics.replay import Gate, Intervention
    from model_forensics.replay.sweep import PrefixCache, forced_picks, rows_per_batch

    session = sessions["gpt2-toxic"]
    failing = runs.failing_variants(session)[:3]
    ranking = attribution_ranking(session)
    fine = [u for u in ranking.units if u.level in ("head", "neuron")]
    ablate = Ablation("mean")
    d = session.model.config.n_embd
    gate = Gate("blocks.0.resid_post", tuple([1.0] * d), 0.0, "each")
    sets = [
        [],
        *([ablate(u)] for u in fine[:16]),
        *(ablate.all(fine[:k]) for k in range(2, 6)),
        [Intervention("blocks.1.mlp", "scale", value=0.0, gate=gate)],
    ]
    for batch in failing:
        clean = flips.clean_answer(session, batch)
        shared = flips.divergences(session, batch, clean.ids, sets, share_prefix=True)
        whole = flips.divergences(session, batch, clean.ids, sets, share_prefix=False)
        assert shared == whole and shared[0] is None and not all(step is None for step in shared)
        # the shared path really ran (it returns None where it stands aside)
        rows = session.prepare_sets(sets, batch)
        prompt_len = ModelInputs.of(batch).length
        forced = ModelInputs.of_ids(clean.ids[:-1].reshape(1, -1))
        steps = len(clean.ids) - prompt_len
        per_batch = rows_per_batch(session, batch)
        assert forced_picks(session, rows, forced, steps, prompt_len, session.prefixes, per_batch) is not None
        # one set skips less than two rows' worth of blocks: shared only when the prefix is held already
        one = session.prepare_sets([sets[1]], batch)
        fresh = PrefixCache()
        assert forced_picks(session, one, forced, steps, prompt_len, fresh, per_batch) is None
        # asked for again: a repeated screen pays for the capture, which later calls share
        again = forced_picks(session, one, forced, steps, prompt_len, fresh, per_batch)
        assert (
            again is not None
            and len(fresh) == 1
            and [p.tolist() for p in again]
            == [p.tolist() for p in forced_picks(session, one, forced, steps, prompt_len, session.prefixes, per_batch)]
        )
        assert forced_picks(session, one, forced, steps, prompt_len, session.prefixes, per_batch) is not None
        assert flips.divergences(session, batch, clean.ids, [sets[1]]) == [shared[1]]
        # a set that changes the embedding cannot enter at a block: whole-model passes
        embed = session.prepare_sets([[Intervention("embed", "scale", value=0.5)]], batch)
        assert forced_picks(session, embed, forced, steps, prompt_len, session.prefixes, per_batch) is None
        assert flips.divergences(session, batch, clean.ids, [[Intervention("embed", "scale", value=0.5)]]) == (
            flips.divergences(session, batch, clean.ids, [[Intervention("embed", "scale", value=0.5)]], False)
        )


def test_screened_side_effects_equal_generating_every_answer(sessions: dict[str, Session]) -> None:
    # Side effects with the teacher-forced screen (a fixed answer generated only where the KL's
    # pass shows it changes) equal generating every fixed answer, on fixes that keep most
    # benign answers, change many, and open a gate on some prompts only.
    from model_forensics.replay import Gate

    session = sessions["gpt2-toxic"]
    d = session.model.config.n_embd
    gate = Gate("blocks.0.resid_post", tuple([1.0] + [0.0] * (d - 1)), 0.5, "each")
    fixes = [
        [Intervention("blocks.0.mlp", "scale", value=0.5)],
        [Intervention("blocks.0.mlp", "scale", value=0.3)],
        [Intervention("blocks.0.resid_post", "steer", value=tuple((-5.0, 5.0)[k % 2] for k in range(d)), gate=gate)],
    ]
    bound = load_config(None).modules.cca.max_side_effect_kl
    for fix in fixes:
        for batch in session.benign():
            flips.clean_run(session, batch)  # the clean answers, once per prompt (earlier phases have them)
        before = session.counter.rows
        generated = measure(session, fix, bound, screen=False)
        generating = session.counter.rows - before
        screened = measure(session, fix, bound, screen=True)
        assert session.counter.rows - before - generating < generating  # fewer model rows
        got, expected = screened.to_json(), generated.to_json()
        # the first step's KL is read from the teacher-forced pass there: float rounding apart
        assert got.pop("first_step_kl") == pytest.approx(expected.pop("first_step_kl"), rel=1e-4, abs=1e-9)
        assert got == expected
    kept = [measure(session, fix, bound, screen=True).answers_unchanged for fix in fixes]
    assert all(0 < k < 1 for k in kept) and kept[0] > kept[1]  # some answers kept, some changed
    fired = measure(session, fixes[2], bound, screen=True).gate_fired
    assert fired is not None and 0 < fired < 1  # the gate opens on some prompts only


def test_where_the_screen_pays_the_failing_variants_come_from_the_clean_runs(
    sessions: dict[str, Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The screen reads every variant's full clean run; the search's failing variants are read
    # from those runs there (no batched verdict sweep besides), and they are the same variants.
    session = sessions["gpt2-injection"]
    cfg = load_config(None).modules.cca
    expected = [v.key for v in FixSearch(session, cfg).failing]
    monkeypatch.setattr(flips, "SCREEN_MIN_PARAMS", 0)
    for variant in session.variants():
        flips.clean_run(session, variant)
    passes = session.forward_passes
    assert [v.key for v in FixSearch(session, cfg).failing] == expected
    assert session.forward_passes == passes  # every verdict read from a kept clean run
    assert 0 < len(expected) <= len(session.variants())


def test_the_prefix_cache_holds_the_latest_prefixes_that_fit_its_budget(sessions: dict[str, Session]) -> None:
    from model_forensics.replay.sweep import PrefixCache, _prefix_for

    session = sessions["gpt2-toxic"]
    a, b, c = (session.encode(v) for v in session.extras["variants"][:3])
    held = PrefixCache()
    prefixes = [_prefix_for(session, held, x) for x in (a, b, c)]
    assert all(p is not None for p in prefixes) and len(held) == 3  # the default budget holds them all
    sizes = [p.nbytes for p in prefixes if p is not None]
    assert all(size > 0 for size in sizes)
    tight = PrefixCache(max_mb=(sizes[1] + sizes[2]) / 2**20)
    for x, p in zip((a, b, c), prefixes, strict=True):
        assert p is not None
        tight.add(x.key, p)
    assert [tight.get(x.key) is not None for x in (a, b, c)] == [False, True, True]  # the oldest went first
