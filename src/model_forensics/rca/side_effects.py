"""Side effects of an intervention set on the benign prompt set.

mean KL = (1/N) Σ_b KL(p_clean(b) ‖ p_fixed(b)) in nats, over the scores the predicate
reads (the next-token distribution, or a classifier's classes). For generation incidents
it is averaged over every step of the clean answer, teacher-forced (the fixed model reads
the clean answer's tokens, so damage late in the answer counts too); ``first_step_kl``
keeps the first decoding step alone, which is what the search's cheap per-candidate
checks (:func:`benign_kls`) compare. Predicate changes = fraction of benign prompts whose predicate
outcome differs from the clean run. Accuracy uses each benign entry's ``expected``
(text the output must contain, or the expected class) when the bundle provides it, and
agreement with the clean prediction otherwise. Answers unchanged = fraction of benign prompts
whose fixed answer (text and prediction) is exactly the clean one. For a gated fix, gate fired =
fraction of the prompts on which a gate opened in the fixed run (``RunResult.gates``: the prompt
pass or any generation step). The same measurement
on near misses (prompts with the trigger on which the model behaves; given without
``expected``) makes accuracy the share of answers kept word for word.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from model_forensics.core.metrics import kl_divergence
from model_forensics.core.records import fields_json
from model_forensics.models.inputs import ModelInputs
from model_forensics.rca import flips
from model_forensics.rca.flips import Answer
from model_forensics.rca.progress import Progress, silent
from model_forensics.replay import Intervention, RunResult, Session
from model_forensics.replay.interventions import gates_opened
from model_forensics.replay.sweep import forced_scores


@dataclass
class SideEffects:
    mean_kl: float
    max_kl: float
    predicate_changed: float
    accuracy_clean: float
    accuracy_fixed: float
    n_benign: int
    bound: float
    first_step_kl: float | None = None  # generation incidents: KL at the first decoding step
    answers_unchanged: float = 1.0  # fraction of benign prompts whose answer (text and prediction) is the clean one
    max_accuracy_drop: float = 0.02  # the bound on accuracy (or predicate) change, read with the KL bound
    gate_fired: float | None = None  # gated fixes: fraction of the prompts the gate fires on
    failing_clean: int = 0  # prompts on which the predicate holds without the fix (near misses that fail)

    @property
    def accuracy_drop(self) -> float:
        return self.accuracy_clean - self.accuracy_fixed

    @property
    def out_of_bound(self) -> list[str]:
        """Which bounds the fix breaks: "kl" (mean benign KL over ``bound``), "accuracy"
        (benign accuracy falls, or the predicate changes on benign prompts, by more than
        ``max_accuracy_drop``). One bound: a fix is within it only when it keeps both."""
        over = []
        if self.mean_kl > self.bound:
            over.append("kl")
        if max(self.accuracy_drop, self.predicate_changed) > self.max_accuracy_drop + 1e-12:
            over.append("accuracy")
        return over

    @property
    def within_bound(self) -> bool:
        return not self.out_of_bound

    def to_json(self) -> dict[str, Any]:
        return fields_json(
            self, accuracy_drop=self.accuracy_drop, within_bound=self.within_bound, out_of_bound=self.out_of_bound
        )


def benign_kls(session: Session, sets: Sequence[Sequence[Intervention]]) -> list[list[float]]:
    """KL of each intervention set on each benign prompt: [set][benign] (every prompt's sweep
    batched together, :meth:`Session.sweep_each`)."""
    benign = session.benign()
    out: list[list[float]] = [[0.0] * len(benign) for _ in sets]
    with session.first_steps(1):  # only the first decoding step is compared
        for j, results in session.sweep_each(benign, [[], *sets]):
            clean = _first_step(results[0])
            for i in range(len(sets)):
                out[i][j] = float(kl_divergence(clean, _first_step(results[i + 1])))
    return out


def measure(
    session: Session,
    fix: Sequence[Intervention],
    bound: float,
    benign: Sequence[Any] | None = None,
    progress: Progress = silent,
    max_accuracy_drop: float = 0.02,
    *,
    screen: bool | None = None,
) -> SideEffects:
    """Side effects of ``fix`` on the session's benign set, or on ``benign`` (entries as in a
    bundle's ``extras.benign``: a prompt, or ``{"prompt": …, "expected": …}``), e.g. prompts
    held out from whatever the fix was fitted on (``progress``: ("side effects", done, prompts)).

    ``screen`` (None: where :func:`~model_forensics.rca.flips.screens` says it pays; True:
    wherever it is exact): on a prompt whose clean run the session holds, the fixed answer is
    generated only where the teacher-forced pass the KL reads shows it is not the clean answer
    word for word (:func:`_pairs`)."""
    entries = list(session.extras.get("benign", []) if benign is None else benign)
    prompts = [session.encode(entry) for entry in entries]
    pairs = _pairs(
        session, fix, prompts, progress, flips.screens(session) if screen is None else screen and flips.exact(session)
    )
    expected = [entry.get("expected") if isinstance(entry, dict) else None for entry in entries]
    n = len(pairs)

    def share(counts: Any, empty: float) -> float:
        return sum(counts) / n if n else empty

    kls = [p.kl for p in pairs]
    return SideEffects(
        mean_kl=share(kls, 0.0),
        max_kl=max(kls, default=0.0),
        predicate_changed=share((p.clean.failed != p.fixed.failed for p in pairs), 0.0),
        accuracy_clean=share((_correct(p.clean, e, p.clean) for p, e in zip(pairs, expected, strict=True)), 1.0),
        accuracy_fixed=share((_correct(p.fixed, e, p.clean) for p, e in zip(pairs, expected, strict=True)), 1.0),
        n_benign=n,
        bound=bound,
        first_step_kl=share((p.first for p in pairs), 0.0) if n and session.mode == "generate" else None,
        answers_unchanged=share(
            (p.clean.text == p.fixed.text and p.clean.prediction == p.fixed.prediction for p in pairs), 1.0
        ),
        max_accuracy_drop=max_accuracy_drop,
        gate_fired=share((p.fixed.opened for p in pairs), 0.0)
        if n and any(iv.gate is not None for iv in fix)
        else None,
        failing_clean=sum(bool(p.clean.failed) for p in pairs),
    )


@dataclass(frozen=True)
class _Pair:
    """One prompt's clean and fixed answers, the KL at the first decoding step and the mean
    KL over the clean answer's steps (nats)."""

    clean: Answer
    fixed: Answer
    first: float
    kl: float


def _pairs(
    session: Session, fix: Sequence[Intervention], prompts: list[ModelInputs], progress: Progress, screen: bool
) -> list[_Pair]:
    """Each prompt's clean and fixed answers and KLs. A prompt whose clean run the session
    holds already (with ``screen``: :func:`~model_forensics.rca.flips.known_run`) gets one
    teacher-forced pass of two rows (clean, fixed) along its answer: the KL at every step,
    the first step's included, and, where every argmax of both rows is the clean token, the
    fixed answer, which greedy decoding would generate word for word again. The other
    prompts are generated (:meth:`Session.sweep_each`): the fixed run alone where the clean
    run is held, both side by side elsewhere (with ``screen``, the clean run is kept for
    later measurements, and its KLs read from the forced pass too; without, the first
    step's KL is that of the generated scores)."""
    n = len(prompts)
    pairs: list[_Pair | None] = [None] * n
    known = [flips.known_run(session, batch) if screen else None for batch in prompts]
    kls: dict[int, torch.Tensor] = {}
    for i, clean in enumerate(known):
        if clean is not None:
            progress("side effects", sum(p is not None for p in pairs), n)
            kls[i], kept = _forced(session, fix, prompts[i], clean)
            if kept is not None:
                pairs[i] = _kl_pair(Answer.of(clean), kept, kls[i])
    todo = [i for i in range(n) if pairs[i] is None]
    sets = [[list(fix)] if known[i] is not None else [[], list(fix)] for i in todo]
    swept = session.sweep_each([prompts[i] for i in todo], sets, per_prompt=True)
    for done, (j, results) in enumerate(swept):
        progress("side effects", n - len(todo) + done, n)
        i = todo[j]
        held = known[i]
        clean, fixed = (results[0] if held is None else held), results[-1]
        if screen:
            flips.keep_run(session, prompts[i], clean)
            kl = kls[i] if i in kls else _forced(session, fix, prompts[i], clean)[0]
            pairs[i] = _kl_pair(Answer.of(clean), Answer.of(fixed), kl)
            continue
        first = float(kl_divergence(_first_step(clean), _first_step(fixed)))
        generated = clean.outputs.get("generated_ids") is not None
        mean = _mean(_forced(session, fix, prompts[i], clean)[0]) if generated else first
        pairs[i] = _Pair(Answer.of(clean), Answer.of(fixed), first, mean)
    progress("side effects", n, n)
    return pairs  # type: ignore[return-value]


def _kl_pair(clean: Answer, fixed: Answer, kl: torch.Tensor) -> _Pair:
    return _Pair(clean, fixed, float(kl[0]) if len(kl) else 0.0, _mean(kl))


def _mean(kl: torch.Tensor) -> float:
    """The mean of the per-step KLs (0 for an empty answer)."""
    return float(kl.mean()) if len(kl) else 0.0


def _forced(
    session: Session, fix: Sequence[Intervention], batch: ModelInputs, clean: RunResult, share: bool | None = None
) -> tuple[torch.Tensor, Answer | None]:
    """KL(clean ‖ fixed) at each step of ``clean``'s answer, teacher-forced (one forward pass
    of two rows, (S,)), and the fixed answer where that pass shows it is the clean one word
    for word (None: it may not be). The rows enter at the first block they change, on the
    clean computation of the blocks before it, where the session shares that prefix on a
    model whose rows cost time (:func:`~model_forensics.rca.flips.rows_cost`,
    :func:`~model_forensics.replay.sweep.forced_scores`; the clean row then runs only the
    final norm and head); elsewhere both run the whole model (``share``: force either)."""
    prompt_len = batch.length
    ids = clean.outputs["generated_ids"].reshape(-1)
    answer = ids[prompt_len:]
    if len(answer) == 0:
        return torch.zeros(0), None
    forced = ModelInputs.of_ids(ids[None, :-1])
    rows = [[], session.prepare(list(fix), forced)]
    steps = len(answer)
    share = flips.rows_cost(session) if share is None else share
    shared = forced_scores(session, rows, forced, steps, prompt_len, session.prefixes, 2) if share else None
    logits = session.forced(forced, rows, prompt_len)[:, prompt_len - 1 :] if shared is None else torch.stack(shared)
    kl = kl_divergence(logits[0], logits[1])
    if not bool((logits.argmax(-1) == answer.to(logits.device)).all()):
        return kl, None
    return kl, Answer(clean.text, clean.failed, clean.prediction, any(gates_opened(rows[1]).values()))


def _first_step(result: RunResult) -> torch.Tensor:
    steps = result.outputs.get("logits")
    if steps is not None and steps.dim() == 2:
        return steps[0]
    return result.logits


def _correct(result: Answer, expected: Any, clean: Answer) -> bool:
    if expected is None:
        return bool(result.prediction == clean.prediction and result.text == clean.text)
    if isinstance(expected, int):
        return bool(result.prediction == expected)
    return str(expected) in (result.text or "")
