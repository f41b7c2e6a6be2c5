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
from model_forensics.rca.progress import Progress, silent
from model_forensics.replay import Intervention, RunResult, Session


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
    """KL of each intervention set on each benign prompt: [set][benign] (one sweep per prompt)."""
    out: list[list[float]] = [[] for _ in sets]
    for batch in session.benign():
        with session.first_steps(1):  # only the first decoding step is compared
            results = session.sweep([[], *sets], inputs=batch)
        clean = _first_step(results[0])
        for i in range(len(sets)):
            out[i].append(float(kl_divergence(clean, _first_step(results[i + 1]))))
    return out


def measure(
    session: Session,
    fix: Sequence[Intervention],
    bound: float,
    benign: Sequence[Any] | None = None,
    progress: Progress = silent,
    max_accuracy_drop: float = 0.02,
) -> SideEffects:
    """Side effects of ``fix`` on the session's benign set, or on ``benign`` (entries as in a
    bundle's ``extras.benign``: a prompt, or ``{"prompt": …, "expected": …}``), e.g. prompts
    held out from whatever the fix was fitted on (``progress``: ("side effects", done, prompts))."""
    entries = list(session.extras.get("benign", []) if benign is None else benign)
    changed, right_clean, right_fixed, same, failing = 0, 0, 0, 0, 0
    benign = [session.encode(entry) for entry in entries]
    gates = any(iv.gate is not None for iv in fix)
    fired = 0  # prompts on which a gate opened in the fixed run (any pass: prompt or a generation step)
    first: list[float] = [0.0] * len(entries)  # per prompt, in the order given (the sums below add in it)
    kls: list[float] = [0.0] * len(entries)
    for done, (i, (clean, fixed)) in enumerate(session.sweep_each(benign, [[], list(fix)])):
        progress("side effects", done, len(entries))
        entry, batch = entries[i], benign[i]
        first[i] = float(kl_divergence(_first_step(clean), _first_step(fixed)))
        sequence = clean.outputs.get("generated_ids")
        kls[i] = first[i] if sequence is None else _answer_kl(session, fix, batch, sequence)
        changed += clean.failed != fixed.failed
        fired += any(fixed.gates.values())
        failing += bool(clean.failed)
        same += clean.text == fixed.text and clean.prediction == fixed.prediction
        expected = entry.get("expected") if isinstance(entry, dict) else None
        right_clean += _correct(clean, expected, clean)
        right_fixed += _correct(fixed, expected, clean)
    progress("side effects", len(entries), len(entries))
    n = len(kls)
    return SideEffects(
        mean_kl=sum(kls) / n if n else 0.0,
        max_kl=max(kls) if kls else 0.0,
        predicate_changed=changed / n if n else 0.0,
        accuracy_clean=right_clean / n if n else 1.0,
        accuracy_fixed=right_fixed / n if n else 1.0,
        n_benign=n,
        bound=bound,
        first_step_kl=sum(first) / n if n and session.mode == "generate" else None,
        answers_unchanged=same / n if n else 1.0,
        max_accuracy_drop=max_accuracy_drop,
        gate_fired=fired / n if gates and n else None,
        failing_clean=failing,
    )


def _answer_kl(
    session: Session, fix: Sequence[Intervention], batch: dict[str, torch.Tensor], sequence: torch.Tensor
) -> float:
    """Mean KL(clean ‖ fixed) over the steps of the clean answer ``sequence`` (prompt +
    generated ids), teacher-forced: one forward pass of two rows (clean, fixed)."""
    prompt_len = ModelInputs.of(batch).length
    ids = sequence.reshape(1, -1)[:, :-1]  # (1, T_prompt + S − 1): the answer's last token predicts nothing
    if ids.shape[1] < prompt_len:
        return 0.0
    forced = ModelInputs.of_ids(ids)
    logits = session.forced(forced, [[], session.prepare(list(fix), forced)], prompt_len)  # (2, T, V)
    return float(kl_divergence(logits[0, prompt_len - 1 :], logits[1, prompt_len - 1 :]).mean())


def _first_step(result: RunResult) -> torch.Tensor:
    steps = result.outputs.get("logits")
    if steps is not None and steps.dim() == 2:
        return steps[0]
    return result.logits


def _correct(result: RunResult, expected: Any, clean: RunResult) -> bool:
    if expected is None:
        return bool(result.prediction == clean.prediction and result.text == clean.text)
    if isinstance(expected, int):
        return bool(result.prediction == expected)
    return str(expected) in (result.text or "")
