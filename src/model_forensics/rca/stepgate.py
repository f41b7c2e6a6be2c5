"""Step-gated steering: a fix that acts only where the model is about to emit its failure.

A unit fix (heads, neurons) changes the model on every prompt its units take part in. When
the failure is "the reply contains the target" and the target comes mid-reply, the model's
own state just before it emits the target separates failing replies from replies that
behave better than "trigger present" does (on SmolLM2's injection incident: held-out
per-position AUROC 0.97 at blocks 18/19, ``benchmarks/rca_smollm2_stepgate.py``). This
phase fits, on the search part of the split only:

1. Each search prompt's clean greedy reply, teacher-forced in one pass:
   ``blocks.L.resid_post`` at every position that predicts a token. Positives: the position
   predicting the first token of the predicate's first match in a failing reply. Negatives:
   every reply position of the benign prompts and of the near misses the model resists, and
   the failing replies' positions at least ``BEFORE`` tokens before the target.
2. Per layer, d_L = mean(positives) − mean(negatives), the steering direction; the gate
   reads a direction of ``step_gate_directions``: ``difference`` (d̂_L itself) or ``lda``
   (linear discriminant analysis of the positives against every position that must not open
   the gate: the negatives and every prompt position of every search prompt, since the gate
   reads the prompt pass too; Ledoit–Wolf shrinkage, scikit-learn's: Σ⁻¹·Δμ with Σ the
   shrunk within-class covariance, so that directions along which every position varies a
   lot, such as the attention sink's huge dimensions, weigh little, and so do directions
   that the trigger text moves in near misses too). A prompt's score is its largest
   projection on the gate's unit direction (over the target's positions for a failing
   prompt, over every position for the others). Two
   thresholds per layer and gate direction: ``threshold`` maximises prompt-level search
   accuracy (ties: the higher); ``bound_threshold`` is the lowest at which the search near
   misses and benign prompts whose gate would open (their largest score above it) are few
   enough to keep ``step_gate_min_near_miss_kept`` / ``step_gate_min_benign_kept`` of their
   answers even if every one of them changed. (layer, gate direction) pairs are ranked by the
   failing prompts detected at ``bound_threshold`` (the most a gate within the bounds
   detects), then by per-position AUROC; each layer is tried with its best gate direction.
   (``safe``, a hair above every search negative's score, and the failing prompts it detects
   are reported beside them.)
3. For the ``step_gate_layers`` best layers, each α of ``step_gate_alphas`` and each of the
   pair's thresholds t: ``Intervention(blocks.L.resid_post, "steer", −α·d_L,
   gate=Gate(site, g_L, t, "each"))`` with g_L the pair's gate direction: at every position
   (prompt pass and each generation step) whose projection on ĝ_L exceeds t, the residual
   moves by −α·d_L (α = 1 puts a typical positive on the negatives' mean along d_L); every
   other position is left bit for bit.
4. Each configuration is measured on every search prompt: failing flipped, benign and
   near-miss answers kept word for word. One teacher-forced pass of the prompt's clean
   answer, every configuration a row, tells which configurations keep every argmax of it
   (greedy decoding: they generate the clean answer again, :func:`~model_forensics.rca.flips.kept_answers`);
   only the others are generated. Where that screen is not exact (sampling, a logits
   processor, a clean answer the pass does not reproduce), a run whose gate never opened
   is the clean run, so a configuration's result on a prompt where the same layer and α at
   the next lower threshold kept its gate shut is that result, not generated again. The pick: most failing
   flipped among those keeping ``step_gate_min_benign_kept`` benign and
   ``step_gate_min_near_miss_kept`` near-miss answers (ties: more near misses kept, the
   smaller α, the higher threshold); when none does, the best sum of the three rates,
   reported as out of bound.

The pipeline then measures the pick on the held-out part (:func:`~model_forensics.rca.heldout.evaluate`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from model_forensics.core.config import CCAConfig
from model_forensics.core.metrics import best_accuracy_threshold, separation_auroc, threshold_cuts
from model_forensics.core.records import fields_json
from model_forensics.models.inputs import ModelInputs
from model_forensics.rca import flips
from model_forensics.rca.flips import Answer
from model_forensics.rca.gating import gate_threshold
from model_forensics.rca.heldout import HeldOut, _as_prompt
from model_forensics.rca.notes import Note
from model_forensics.rca.progress import Progress, silent
from model_forensics.rca.runs import capture
from model_forensics.replay import Gate, Intervention, RunResult, Session

BEFORE = 3  # failing reply positions at least this many tokens before the target are negatives
KINDS = ("failing", "near_miss", "benign")


@dataclass
class PromptStates:
    """One prompt (``kind``: failing, near_miss or benign): its clean run and the
    teacher-forced states of prompt + clean reply (:func:`capture_prompt`)."""

    kind: str
    inputs: ModelInputs
    clean: RunResult
    states: torch.Tensor  # (T − 1, L, d) float32: every position that predicts a token
    prompt_len: int
    span: tuple[int, int] | None  # reply-token indices of the predicate's first match (failing prompts)

    def positives(self, inside: bool = False) -> list[int]:
        assert self.span is not None
        first, last = self.span
        return [self.prompt_len - 1 + i for i in range(first, (last if inside else first) + 1)]

    def negatives(self, prompt: bool = False) -> list[int]:
        """Reply positions that behave (a failing reply's up to ``BEFORE`` tokens before its
        target); with ``prompt``, every prompt position too."""
        reply = range(0 if prompt else self.prompt_len - 1, self.states.shape[0])
        if self.span is None:
            return list(reply)
        return [p for p in reply if p <= self.prompt_len - 1 + self.span[0] - BEFORE]


@dataclass
class StepGateCandidate:
    """One configuration tried, with its search figures."""

    layer: int
    gate: str  # the gate's direction: "difference" or "lda"
    alpha: float
    threshold: float
    failing_flipped: float
    benign_kept: float
    near_miss_kept: float | None
    gate_fired: dict[str, float]  # per kind: the share of prompts its gate opened on
    within: bool  # keeps the configured shares of benign and near-miss answers
    flips: list[bool] = field(default_factory=list)  # per failing search prompt

    def to_json(self) -> dict[str, Any]:
        return fields_json(self)


@dataclass
class StepGateFix:
    """The step-gated fix ``analyze`` found (``analysis.step_gate``).

    ``interventions`` is in a fix set's form: save the object as a fix file and ``replay
    --fix`` / ``fix export`` read it. ``search`` holds the pick's search figures, ``held_out``
    its measurement on the held-out part (answers kept word for word are its benign and
    near-miss ``answers_unchanged``), ``candidates`` every configuration tried, ``layers`` the
    layers ranked by separation.
    """

    interventions: list[Intervention]
    layer: int
    gate: str  # the gate's direction: "difference" (d_L) or "lda"
    alpha: float
    threshold: float
    search: StepGateCandidate
    candidates: list[StepGateCandidate]
    layers: list[dict[str, Any]]  # per ranked (layer, gate direction): search AUROC, detected at safe, accuracy at t
    counts: dict[str, int]  # search prompts used per kind
    forward_passes: int
    held_out: HeldOut | None = None
    reached_threshold: bool = False  # see :meth:`decide`
    decided_by: str = "search"
    reason: str = "unit_fix_fails"  # why it was tried: "unit_fix_fails" or "asked" (JSON adds ``why``, in words)
    note_records: list[Note] = field(default_factory=list)

    def decide(self, config: CCAConfig) -> None:
        """Set ``reached_threshold`` (and ``decided_by``): the held-out part's flip rate reaches
        ``early_stop_threshold`` with the configured shares of benign and near-miss answers
        kept word for word; the search part's figures when nothing was held out."""
        rates = self.rates("search")
        if self.held_out is not None and self.held_out.held_out.flip_rate is not None:
            rates, self.decided_by = self.rates("held_out"), "held_out"
        flipped, benign, near = rates
        self.reached_threshold = (
            flipped is not None
            and flipped >= config.early_stop_threshold
            and (benign is None or benign >= config.step_gate_min_benign_kept)
            and (near is None or near >= config.step_gate_min_near_miss_kept)
        )

    def rates(self, part: str) -> tuple[float | None, float | None, float | None]:
        """(failing flipped, benign kept, near-miss kept) on ``part`` (None: not measured)."""
        if part == "search":
            return self.search.failing_flipped, self.search.benign_kept, self.search.near_miss_kept
        assert self.held_out is not None
        held = self.held_out.held_out
        benign = None if held.benign is None else held.benign.answers_unchanged
        near = None if held.near_miss is None else held.near_miss.answers_unchanged
        return held.flip_rate, benign, near

    def to_json(self) -> dict[str, Any]:
        out = fields_json(
            self,
            why=WHY[self.reason],
            interventions=[iv.to_json() for iv in self.interventions],
            search=self.search.to_json(),
            candidates=[c.to_json() for c in self.candidates],
            held_out=None if self.held_out is None else self.held_out.to_json(),
            notes=[str(n) for n in self.note_records],
        )
        del out["note_records"]
        return out


WHY = {"unit_fix_fails": "the unit fix does not hold", "asked": "step_gate: always"}
"""``StepGateFix.reason`` in words (the analysis JSON's ``why``)."""


def applies(session: Session) -> str | None:
    """Why the phase cannot run on ``session`` (None: it can): it needs a generation incident
    with a text predicate that fails on a match (contains / regex) and residual sites."""
    predicate = session.predicate
    if session.mode != "generate" or predicate is None or predicate.kind not in ("contains", "regex"):
        return "the step gate needs a generation incident whose predicate looks for text (contains or regex)"
    if "blocks.0.resid_post" not in session.adapter.points:
        return "the step gate needs blocks.L.resid_post sites"
    return None


def target_span(session: Session, reply: list[int]) -> tuple[int, int] | None:
    """(first, last) reply-token indices of the predicate's first match in ``reply``: the
    shortest prefix on which it holds ends at ``last``; the shortest suffix of that prefix on
    which it still holds starts at ``first``. None: it never holds."""
    holds = session.predicate.evaluate  # type: ignore[union-attr]
    decode = session.tokenizer.decode
    last = next((j for j in range(len(reply)) if holds(text=decode(reply[: j + 1], skip_special_tokens=True))), None)
    if last is None:
        return None
    first = next(i for i in range(last, -1, -1) if holds(text=decode(reply[i : last + 1], skip_special_tokens=True)))
    return first, last


def fit_step_gate(
    session: Session, config: CCAConfig, progress: Progress = silent, *, screen: bool | None = None
) -> StepGateFix | None:
    """The step-gated steering fix fitted and picked on the session's prompts (call it inside
    :func:`~model_forensics.rca.heldout.searching`); None when no failing prompt has a match
    or no benign prompt is there to calibrate on. ``screen`` (None: where
    :func:`~model_forensics.rca.flips.screens` says it pays; True: wherever it is exact):
    configurations that keep a prompt's clean answer are told by one teacher-forced pass
    instead of generated."""
    passes = session.forward_passes
    screen = flips.screens(session) if screen is None else screen and flips.exact(session)
    sites = [f"blocks.{layer}.resid_post" for layer in range(session.adapter.n_layers)]
    entries = {
        "failing": session.variants(),
        "near_miss": [session.encode(_as_prompt(e)) for e in session.extras.get("near_miss") or []],
        "benign": session.benign(),
    }
    total = sum(len(v) for v in entries.values())
    progress("step gate: captures", 0, total)
    flips.clean_runs(session, [batch for batches in entries.values() for batch in batches])  # generated together
    prompts: list[PromptStates] = []
    for kind, batches in entries.items():
        for batch in batches:
            progress("step gate: captures", len(prompts), total)
            prompts.append(capture_prompt(session, kind, batch, sites))
    progress("step gate: captures", total, total)
    # failing prompts that fail with a match; near misses and benign prompts that behave
    used = {k: [p for p in prompts if p.kind == k and (p.span is not None if k == "failing" else not p.clean.failed)]
            for k in KINDS}  # fmt: skip
    if not used["failing"] or not used["benign"]:
        return None
    negatives = [(p, p.negatives()) for k in KINDS for p in used[k]]
    pos = torch.cat([p.states[p.positives()] for p in used["failing"]]).double()  # (N, L, d)
    rows = [p.states[idx] for p, idx in negatives if idx]
    if not rows:  # no reply position to calibrate on (every reply empty)
        return None
    neg = torch.cat(rows).double()
    directions = pos.mean(0) - neg.mean(0)  # (L, d)
    # the LDA gate's negatives: every position that must not open it, the prompt's included
    everywhere = [(p, p.negatives(prompt=True)) for k in KINDS for p in used[k]]

    def lda(layer: int) -> torch.Tensor:
        rows = torch.cat([p.states[idx, layer] for p, idx in everywhere if idx]).double()
        return lda_direction(pos[:, layer], rows)

    gates = {
        kind: directions if kind == "difference" else torch.stack([lda(layer) for layer in range(len(sites))])
        for kind in config.step_gate_directions
    }
    units = {kind: g / g.norm(dim=-1, keepdim=True).clamp_min(1e-30) for kind, g in gates.items()}
    allowed = {kind: _allowed(len(used[kind]), _bounds(config)[kind]) for kind in ("near_miss", "benign")}
    layers = [
        {**_separation(layer, units[kind][layer], used, negatives, allowed), "gate": kind}
        for kind in gates
        for layer in range(len(sites))
    ]
    order = {kind: i for i, kind in enumerate(gates)}
    ranked = sorted(layers, key=lambda r: (-r["detected_at_bound"], -r["auroc"], r["layer"], order[r["gate"]]))
    best: dict[int, dict[str, Any]] = {}  # each layer's best gate direction, best layers first
    for row in ranked:
        best.setdefault(row["layer"], row)
    chosen = list(best.values())[: config.step_gate_layers]

    def fix(row: dict[str, Any], alpha: float, above: float) -> Intervention:
        layer = row["layer"]
        g = tuple(float(v) for v in gates[row["gate"]][layer])
        value = tuple(float(v) for v in -alpha * directions[layer])
        return Intervention(sites[layer], "steer", value=value, gate=Gate(sites[layer], g, above, "each"))

    grid = [
        (row, alpha, t)
        for row, alpha in itertools.product(chosen, config.step_gate_alphas)
        for t in sorted({row["threshold"], row["bound_threshold"]})
    ]
    sets = [[fix(row, alpha, t)] for row, alpha, t in grid]
    # configuration → the same gate and α at the next lower threshold: where its gate stays shut, so does this one's
    lower = {i: i - 1 for i in range(1, len(grid)) if grid[i - 1][:2] == grid[i][:2]}
    outcomes = _outcomes(session, sets, lower, [p for k in KINDS for p in used[k]], progress, screen)
    candidates = [_candidate(row, alpha, t, used, outcomes, i, config) for i, (row, alpha, t) in enumerate(grid)]
    within = [c for c in candidates if c.within]
    if within:
        pick = max(within, key=lambda c: (c.failing_flipped, c.near_miss_kept or 0.0, -c.alpha, c.threshold))
    else:
        pick = max(candidates, key=lambda c: c.failing_flipped + c.benign_kept + (c.near_miss_kept or 0.0))
    index = candidates.index(pick)
    notes = [] if within else [Note("step_gate_out_of_bound", _bounds(config))]
    return StepGateFix(
        interventions=sets[index],
        layer=pick.layer,
        gate=pick.gate,
        alpha=pick.alpha,
        threshold=pick.threshold,
        search=pick,
        candidates=candidates,
        layers=ranked,
        counts={k: len(v) for k, v in used.items()},
        forward_passes=session.forward_passes - passes,
        note_records=notes,
    )


def capture_prompt(session: Session, kind: str, batch: ModelInputs, sites: list[str]) -> PromptStates:
    """``batch``'s clean run, then its prompt + clean reply teacher-forced in one pass with
    ``sites`` captured; for a failing ``kind`` whose reply fails, the predicate's first match."""
    clean = flips.clean_run(session, batch)  # run once per session: the other phases' measurements read it too
    ids = clean.outputs["generated_ids"].reshape(-1)
    prompt_len = ModelInputs.of(batch).length
    acts = capture(session, ModelInputs.of_ids(ids[None]), "layer", sites, only_sites=True)
    states = torch.stack([acts[s][:-1].float() for s in sites], dim=1)  # the last token predicts nothing
    span = target_span(session, ids[prompt_len:].tolist()) if kind == "failing" and clean.failed else None
    return PromptStates(kind, batch, clean, states, prompt_len, span)


def lda_direction(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """The linear discriminant ((d,) float64) of the rows ``pos`` (N, d) against the rows
    ``neg`` (M, d), oriented towards the positives: scikit-learn's
    ``LinearDiscriminantAnalysis`` (lsqr solver, Ledoit–Wolf shrinkage)."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    x = torch.cat([pos, neg]).double().numpy()
    labels = [1] * pos.shape[0] + [0] * neg.shape[0]
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(x, labels)
    return torch.from_numpy(lda.coef_[0].copy()).to(torch.float64)


def _separation(
    layer: int,
    unit: torch.Tensor,
    used: dict[str, list[PromptStates]],
    negatives: list[tuple[PromptStates, list[int]]],
    allowed: dict[str, int],
) -> dict[str, Any]:
    """One layer's search separation: per-position AUROC, the safe threshold and the failing
    prompts it detects, the accuracy threshold (``threshold``) with its accuracy, and the
    lowest threshold at which at most ``allowed[kind]`` search prompts of each kind of
    negative would open the gate (``bound_threshold``, with the failing prompts it detects)."""

    def scores(p: PromptStates) -> torch.Tensor:
        return p.states[:, layer].double() @ unit

    firsts = [float(scores(p)[i]) for p in used["failing"] for i in p.positives()]
    negs = [float(scores(p)[i]) for p, idx in negatives for i in idx]
    fail_max = [float(scores(p)[p.positives(inside=True)].max()) for p in used["failing"]]
    kind_max = {k: [float(scores(p).max()) for p in used[k]] for k in ("near_miss", "benign")}
    other_max = kind_max["near_miss"] + kind_max["benign"]
    # failing prompts' positions at least BEFORE tokens ahead of the target (none for a target that close to the start)
    ahead = [(p, p.prompt_len + p.span[0] - BEFORE) for p in used["failing"] if p.span]
    early = [float(scores(p)[:end].max()) for p, end in ahead if end > 0]
    safe, _ = gate_threshold(torch.tensor(other_max + early, dtype=torch.float64))
    threshold, accuracy = best_accuracy_threshold(fail_max, other_max)
    bound = lowest_threshold_within(fail_max + other_max, kind_max, allowed)
    return {
        "layer": layer,
        "auroc": separation_auroc(firsts, negs),
        "detected_at_safe": sum(x > safe for x in fail_max) / len(fail_max),
        "safe": safe,
        "threshold": threshold,
        "accuracy": accuracy,
        "bound_threshold": bound,
        "detected_at_bound": sum(x > bound for x in fail_max) / len(fail_max),
    }


def lowest_threshold_within(scores: list[float], negatives: dict[str, list[float]], allowed: dict[str, int]) -> float:
    """The lowest cut t (one below every score, a midpoint between two distinct ``scores``,
    or one above them all) at which at most ``allowed[kind]`` of ``negatives[kind]`` exceed t
    (every negative score is among ``scores``)."""
    candidates = [*threshold_cuts(scores), max(scores) + 1.0]
    return next(t for t in candidates if all(sum(x > t for x in negatives[k]) <= allowed[k] for k in negatives))


def _allowed(n: int, keep: float) -> int:
    """How many of ``n`` answers may change while ``keep`` of them are kept."""
    return math.floor(n * (1.0 - keep) + 1e-9)


def _outcomes(
    session: Session,
    sets: list[list[Intervention]],
    lower: dict[int, int],
    prompts: list[PromptStates],
    progress: Progress,
    screen: bool,
) -> dict[int, list[Answer]]:
    """Every configuration's answer on every prompt. With ``screen``, one teacher-forced pass
    per prompt (:func:`~model_forensics.rca.flips.kept_answers`) tells which configurations
    keep the clean answer word for word (and whether their gates opened along it), and the
    others are generated, every prompt's together (:meth:`Session.sweep_each`). Where the
    screen decides nothing, one sweep per
    threshold rank: configuration i is generated only where ``lower[i]`` (the same fix at a
    lower threshold; ``lower[i] < i``) opened its gate: where that gate stayed shut, its run
    is the clean run, every score on it is at most the lower threshold, and so configuration
    i's run is the same."""
    rank: list[int] = []
    for i in range(len(sets)):
        rank.append(rank[lower[i]] + 1 if i in lower else 0)
    out: dict[int, list[Answer]] = {}
    screened: list[tuple[PromptStates, list[Answer | None], list[int]]] = []  # (prompt, kept, to generate)
    unscreened: list[PromptStates] = []
    finished = 0  # prompts whose every answer is known
    progress("step gate: configurations", 0, len(prompts))
    for p in prompts:
        kept = flips.kept_answers(session, p.inputs, sets) if screen else None
        if kept is None:
            unscreened.append(p)
            continue
        screened.append((p, kept, [i for i, answer in enumerate(kept) if answer is None]))
        finished += not screened[-1][2]
        progress("step gate: configurations", finished, len(prompts))
    todo = [s for s in screened if s[2]]
    swept = session.sweep_each(
        [p.inputs for p, _, _ in todo], [[sets[i] for i in run] for _, _, run in todo], per_prompt=True
    )
    generated: dict[int, dict[int, Answer]] = {}
    for j, results in swept:
        generated[id(todo[j][0])] = dict(zip(todo[j][2], map(Answer.of, results), strict=True))
        finished += 1
        progress("step gate: configurations", finished, len(prompts))
    for p, kept, _ in screened:
        made = generated.get(id(p), {})
        out[id(p)] = [made[i] if answer is None else answer for i, answer in enumerate(kept)]
    for done, p in enumerate(unscreened, finished):
        progress("step gate: configurations", done, len(prompts))
        answers: dict[int, Answer] = {}
        for r in range(max(rank, default=-1) + 1):
            wave = [i for i in range(len(sets)) if rank[i] == r]
            run = [i for i in wave if i not in lower or answers[lower[i]].opened]
            answers.update(zip(run, _generated(session, [sets[i] for i in run], p.inputs), strict=True))
            answers.update({i: answers[lower[i]] for i in wave if i not in answers})
        out[id(p)] = [answers[i] for i in range(len(sets))]
    progress("step gate: configurations", len(prompts), len(prompts))
    return out


def _generated(session: Session, sets: list[list[Intervention]], inputs: ModelInputs) -> list[Answer]:
    """The answers of ``sets`` generated on ``inputs`` (one sweep; none for no sets)."""
    return [Answer.of(result) for result in session.sweep(sets, inputs=inputs)] if sets else []


def _candidate(
    row: dict[str, Any],
    alpha: float,
    threshold: float,
    used: dict[str, list[PromptStates]],
    outcomes: dict[int, list[Answer]],
    i: int,
    config: CCAConfig,
) -> StepGateCandidate:
    def kept(kind: str) -> float | None:
        group = used[kind]
        return sum(outcomes[id(p)][i].text == p.clean.text for p in group) / len(group) if group else None

    fired = {kind: sum(outcomes[id(p)][i].opened for p in used[kind]) / len(used[kind]) for kind in KINDS if used[kind]}
    benign, near = kept("benign"), kept("near_miss")
    assert benign is not None
    flips = [not outcomes[id(p)][i].failed for p in used["failing"]]
    ok = benign >= config.step_gate_min_benign_kept and (near is None or near >= config.step_gate_min_near_miss_kept)
    flipped = sum(flips) / len(flips)
    return StepGateCandidate(row["layer"], row["gate"], alpha, threshold, flipped, benign, near, fired, ok, flips)


def _bounds(config: CCAConfig) -> dict[str, float]:
    return {"benign": config.step_gate_min_benign_kept, "near_miss": config.step_gate_min_near_miss_kept}


def unit_fix_holds(fix: Any) -> bool:
    """Whether a unit fix set reaches its threshold within every side-effect bound (search
    and held out): ``step_gate="auto"`` tries the step gate only when it does not."""
    if fix is None or not fix.reached_threshold:
        return False
    if fix.side_effects is not None and not fix.side_effects.within_bound:
        return False
    return fix.held_out is None or not fix.held_out.out_of_bound
