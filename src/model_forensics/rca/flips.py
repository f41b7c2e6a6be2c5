"""Which intervention sets flip a generation incident, screened by one teacher-forced pass.

Greedy decoding picks the argmax at every step, so a set under which the argmax at every
step of the clean answer is still the clean token generates that answer again, and its
verdict is the clean one (still failing): nothing needs generating. One teacher-forced
forward pass of the clean answer (prompt + answer, every set a row of one batch, scores
only at the answer's positions) tells which sets keep every argmax; only the others are
generated, as :func:`~model_forensics.rca.runs.flip_table` generates every set.

The same pass tells more: a set whose first changed argmax is at step d generates the
clean answer's first d tokens. Where those already settle the verdict (the predicate
:meth:`~model_forensics.core.predicates.Predicate.settles`, and the clean answer's first
``settle`` tokens show what it looks for: "HACKED" in "The secret word is HACKED"), no
continuation can change it, so a set with d ≥ ``settle`` keeps the clean verdict too and
is not generated either.

The screen applies when it is exact: a generation incident whose predicate reads the text
alone, decoded greedily with no logits processor that could change an argmax (no
sampling, beams, repetition penalties, minimum lengths or banned tokens), and a variant
whose own teacher-forced argmax path reproduces its clean answer (checked once per
variant; one that does not, a near-tie the two kernel paths round apart, is generated
set by set as before). It is used where it pays: on models large enough that a forward
call's cost grows with its rows (``SCREEN_MIN_PARAMS``); on tiny models a call costs the
same whatever its rows, and the screen's extra call per variant costs more than it saves.
Everywhere else :func:`flip_table` is the straightforward one.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from model_forensics.models.hooks import logits_of
from model_forensics.models.inputs import ModelInputs, last_logits_only
from model_forensics.rca import runs
from model_forensics.rca.runs import Inputs
from model_forensics.replay import Intervention, RunResult, Session
from model_forensics.replay.interventions import Clock, gates_opened, intervening
from model_forensics.replay.sweep import forced_picks, rows_per_batch

# Below this, a forward call costs about the same whatever its rows (the zoo's 0.3M-parameter
# models: the screen's extra call per variant cost more CPU than the rows it saved;
# benchmarks/results/rca_speed_screen.md); SmolLM2 (135M) is far above it.
SCREEN_MIN_PARAMS = 10_000_000
# generate options that leave greedy decoding a plain argmax (anything else: no screen)
_PLAIN = {"max_new_tokens", "max_length", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id"}
# generation_config values under which a logits processor would run
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "do_sample": (None, False),
    "num_beams": (None, 1),
    "num_beam_groups": (None, 1),
    "penalty_alpha": (None,),
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "bad_words_ids": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,),
    "guidance_scale": (None, 1.0),
    "renormalize_logits": (None, False),
    "num_return_sequences": (None, 1),
    "stop_strings": (None,),
}


@dataclass
class CleanAnswer:
    """A variant's clean answer: prompt + answer ids (to the first EOS), the clean verdict,
    whether its own teacher-forced argmax path reproduces the answer, and how many of the
    answer's first tokens settle the verdict (None: no start of it does)."""

    ids: torch.Tensor
    failed: bool
    screens: bool
    settle: int | None


@dataclass(frozen=True)
class Answer:
    """What the measurements read of one generation: its text, the predicate's verdict, its
    prediction (the last step's argmax) and whether any gate of its set opened."""

    text: str | None
    failed: bool | None
    prediction: int
    opened: bool

    @staticmethod
    def of(result: RunResult) -> Answer:
        return Answer(result.text, result.failed, result.prediction, any(result.gates.values()))


_CLEAN: weakref.WeakKeyDictionary[Session, dict[tuple[Any, ...], CleanAnswer]] = weakref.WeakKeyDictionary()
_RUNS: weakref.WeakKeyDictionary[Session, dict[tuple[Any, ...], RunResult]] = weakref.WeakKeyDictionary()


def flip_table(
    session: Session,
    variants: Sequence[Inputs],
    sets: Sequence[Sequence[Intervention]],
    tick: Callable[[int, int], None] | None = None,
    *,
    screen: bool | None = None,
) -> list[list[bool]]:
    """flips[set][variant], as :func:`~model_forensics.rca.runs.flip_table` gives it, with
    the sets that keep a variant's clean answer screened out by one teacher-forced pass
    (``screen``: None, where :func:`screens` says so; True, wherever it is exact)."""
    return runs.by_set(flips_each(session, [(v, sets) for v in variants], tick, screen=screen), len(sets))


def flips_each(
    session: Session,
    work: Sequence[tuple[Inputs, Sequence[Sequence[Intervention]]]],
    tick: Callable[[int, int], None] | None = None,
    *,
    screen: bool | None = None,
) -> list[list[bool]]:
    """flips[variant][set] for (variant, its own sets) pairs, as
    :func:`~model_forensics.rca.runs.flips_each` gives them, screened as :func:`flip_table`
    is: each variant's screen runs first, then the sets no screen decided are generated,
    every variant's in one :meth:`Session.sweep_each`."""
    if not (screens(session) if screen is None else screen and exact(session)):
        return runs.flips_each(session, work, tick)
    flips: list[list[bool]] = []
    rest: list[list[int]] = []
    for batch, sets in work:
        if not sets:  # nothing asked of this variant (the search measured it all before)
            flips.append([])
            rest.append([])
            continue
        clean = clean_answer(session, batch)
        # only steps before the settle point can change the verdict: the screen stops there
        ids = clean.ids if clean.settle is None else clean.ids[: ModelInputs.of(batch).length + clean.settle]
        steps = divergences(session, batch, ids, sets) if clean.screens else [0 if s else None for s in sets]
        flips.append([not clean.failed] * len(sets))
        rest.append([i for i, d in enumerate(steps) if not _keeps_verdict(d, clean.settle)])
    generated = runs.flips_each(
        session, [(batch, [sets[i] for i in todo]) for (batch, sets), todo in zip(work, rest, strict=True)], tick
    )
    for v, todo in enumerate(rest):
        for i, flipped in zip(todo, generated[v], strict=True):
            flips[v][i] = flipped
    return flips


def screens(session: Session) -> bool:
    """Whether to screen: it is exact (:func:`exact`) and the model is large enough that a
    forward call's cost grows with its rows (:func:`rows_cost`)."""
    return exact(session) and rows_cost(session)


def rows_cost(session: Session) -> bool:
    """Whether the model is large enough that a forward call's cost grows with its rows (at
    least ``SCREEN_MIN_PARAMS`` parameters): there, rows that skip blocks save time."""
    return sum(p.numel() for p in session.model.parameters()) >= SCREEN_MIN_PARAMS


def exact(session: Session) -> bool:
    """Whether the screen is exact for this session's incident (see the module docstring)."""
    predicate = session.predicate
    if session.mode != "generate" or predicate is None or not predicate.needs_text or session.tokenizer is None:
        return False
    if not all(key in _PLAIN or value in _NEUTRAL.get(key, ()) for key, value in session.generation.items()):
        return False
    config = getattr(session.model, "generation_config", None)
    values = {**({} if config is None else config.to_dict()), **session.generation}
    return all(values.get(key) in allowed for key, allowed in _NEUTRAL.items())


def _keeps_verdict(step: int | None, settle: int | None) -> bool:
    """Whether a set whose first changed argmax is at ``step`` (None: none) keeps the clean
    verdict: it generates the clean answer, or a start of it that settles the verdict."""
    return step is None or (settle is not None and step >= settle)


def divergences(
    session: Session,
    batch: Inputs,
    ids: torch.Tensor,
    sets: Sequence[Sequence[Intervention]],
    share_prefix: bool = True,
) -> list[int | None]:
    """With each set applied, the first step of the answer ``ids`` (prompt + answer,
    (T + S,)) whose argmax is not the answer's token (None: every argmax is): the steps of
    :func:`forced_answers`."""
    return [step for step, _ in forced_answers(session, batch, ids, sets, share_prefix)]


def forced_answers(
    session: Session,
    batch: Inputs,
    ids: torch.Tensor,
    sets: Sequence[Sequence[Intervention]],
    share_prefix: bool = True,
) -> list[tuple[int | None, bool]]:
    """With each set applied along the answer ``ids`` (prompt + answer, (T + S,)): the first
    step whose argmax is not the answer's token (None: every argmax is), and whether any of
    the set's gates opened along it. One teacher-forced pass of T + S − 1 tokens per chunk
    of sets, scores kept at the S answer positions only. With ``share_prefix``, each set's
    rows start at the first block it changes, on the clean computation of the earlier blocks
    (:func:`~model_forensics.replay.sweep.forced_picks`)."""
    prompt_len = ModelInputs.of(batch).length
    answer = ids[prompt_len:]
    steps = len(answer)
    if steps == 0:
        return [(None, False)] * len(sets)
    rows = session.prepare_sets(sets, batch)
    forced = ModelInputs.of_ids(ids[:-1].reshape(1, -1))
    per_batch = rows_per_batch(session, batch)
    picked = (
        forced_picks(session, rows, forced, steps, prompt_len, session.prefixes, per_batch) if share_prefix else None
    )
    if picked is None:
        keep = last_logits_only(session.model, steps)
        picked = []
        for lo in range(0, len(rows), per_batch):
            chunk = rows[lo : lo + per_batch]
            with session.environment(), intervening(session.adapter, chunk, Clock(0, prompt_len)):
                logits = logits_of(session.model(**forced.expand(len(chunk)), **keep))
            assert logits is not None
            picked += list(logits[:, -steps:].argmax(-1))  # (S,) per row
    return [
        (_first_false(p.reshape(-1) == answer.to(p.device)), any(gates_opened(r).values()))
        for p, r in zip(picked, rows, strict=True)
    ]


def _first_false(same: torch.Tensor) -> int | None:
    """The first index of a (S,) bool tensor that is False (None: all are True)."""
    wrong = (~same).nonzero()
    return None if len(wrong) == 0 else int(wrong[0, 0])


def kept_answers(session: Session, batch: Inputs, sets: Sequence[Sequence[Intervention]]) -> list[Answer | None] | None:
    """Per set, its answer on ``batch`` where one teacher-forced pass of the clean answer
    (:func:`forced_answers`) shows it is the clean answer word for word: every argmax is the
    clean token, so greedy decoding generates that answer again (its gates: whether they
    opened along it); None where it is not (generate that set). None instead of the list,
    where the clean answer's own teacher-forced path does not reproduce it
    (:func:`clean_answer`): the pass decides nothing there."""
    clean = clean_answer(session, batch)
    if not clean.screens:
        return None
    result = clean_run(session, batch)
    return [
        Answer(result.text, result.failed, result.prediction, opened) if step is None else None
        for step, opened in forced_answers(session, batch, clean.ids, sets)
    ]


def clean_run(session: Session, batch: Inputs) -> RunResult:
    """``session.run(inputs=batch)``: the unchanged run on one input, run once per session,
    input and generation options (attribution, exact patching and the screen all read it)."""
    cache = _RUNS.setdefault(session, {})
    key = _key(session, batch)
    if key not in cache:
        cache[key] = session.run(inputs=batch)
    return cache[key]


def known_run(session: Session, batch: Inputs) -> RunResult | None:
    """The clean run of ``batch`` this session holds already (:func:`clean_run`,
    :func:`clean_runs`, :func:`keep_run`); None: none yet."""
    return _RUNS.setdefault(session, {}).get(_key(session, batch))


def keep_run(session: Session, batch: Inputs, result: RunResult) -> None:
    """Keep ``result``, the clean row of a sweep on ``batch`` (generated to its end, not
    stopped at the verdict), as ``batch``'s :func:`clean_run`."""
    _RUNS.setdefault(session, {}).setdefault(_key(session, batch), result)


def clean_runs(session: Session, batches: Sequence[Inputs]) -> list[RunResult]:
    """:func:`clean_run` of each of ``batches``; those not run yet are generated together
    (:meth:`Session.sweep_each`: prompts share generations, same tokens and verdicts,
    scores to float tolerance)."""
    cache = _RUNS.setdefault(session, {})
    keys = [_key(session, batch) for batch in batches]
    first: dict[tuple[Any, ...], int] = {}  # each input not run yet → the first of batches that holds it
    for i, key in enumerate(keys):
        if key not in cache:
            first.setdefault(key, i)
    todo = list(first.values())
    for j, (result,) in session.sweep_each([batches[i] for i in todo], [[]]):
        cache[keys[todo[j]]] = result
    return [cache[key] for key in keys]


def _key(session: Session, batch: Inputs) -> tuple[Any, ...]:
    return ModelInputs.of(batch).key, tuple(sorted((k, repr(v)) for k, v in session.generation.items()))


def clean_answer(session: Session, batch: Inputs) -> CleanAnswer:
    """The variant's clean answer (:func:`clean_run`) and whether the screen reproduces it
    (one teacher-forced pass), computed once per session, variant and generation options."""
    cache = _CLEAN.setdefault(session, {})
    key = _key(session, batch)
    if key not in cache:
        result = clean_run(session, batch)
        ids = result.outputs["generated_ids"].reshape(-1)
        (own,) = divergences(session, batch, ids, [[]])
        cache[key] = CleanAnswer(
            ids, bool(result.failed), own is None, _settle(session, ids[ModelInputs.of(batch).length :])
        )
    return cache[key]


def _settle(session: Session, answer: torch.Tensor) -> int | None:
    """How many of ``answer``'s first tokens settle the predicate's verdict (None: no start
    of the answer does, or the predicate cannot settle before a reply ends)."""
    return next((k for k in range(1, len(answer) + 1) if session.readout.settled(answer[:k])), None)
