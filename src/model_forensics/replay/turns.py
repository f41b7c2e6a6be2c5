"""Replay a recorded conversation turn by turn, and aim interventions at one turn.

A conversation bundle (:mod:`model_forensics.recorder.conversation`) holds every turn's
span on the token axis and the digest of its reply. Turn *k* is replayed on the recorded
context up to its message (earlier messages and the replies the model gave then), greedy
as recorded; its reply ids and step logits (S, V) must equal the recording bit for bit::

    session = SandboxReplayer().load_bundle("incident")
    report = replay_turns(session)               # every turn; upto=k stops after turn k
    assert report.bit_identical, report.summary()

    fix = [Intervention("blocks.0.attn.head.1", "zero")]
    at_turn(fix, conversation_of(session.manifest).turns[1])   # positions of turn 1 only
    turn_effects(session, fix)                   # which turn's positions the fix needs

An intervention restricted to turn *j* (:func:`at_turn`) cannot act on turns before *j*
(their replays do not reach its positions, so they stay as recorded); it changes turn *j*'s
own reply and the later ones. Later turns are replayed on the *recorded* context, so each
turn's result shows the intervention's effect on that turn alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from model_forensics.core.conversation import ConversationRecord, TurnRecord, conversation_of
from model_forensics.core.digests import algorithm_of, tensor_digest
from model_forensics.core.errors import ForensicsError
from model_forensics.replay.interventions import Intervention
from model_forensics.replay.session import InterventionLike, Session, as_intervention


@dataclass(frozen=True)
class TurnReplay:
    """One replayed turn beside its recording.

    Attributes:
        index: the turn.
        reply / reply_ids: what the replay produced (ids with end-of-sequence).
        logits_sha256: digest of the replay's step logits (S, V), under the bundle's ``hash``.
        recorded: the turn as recorded.
        failed: the bundle's predicate on this reply (None: no predicate).
    """

    index: int
    reply: str
    reply_ids: tuple[int, ...]
    logits_sha256: str
    recorded: TurnRecord
    failed: bool | None

    @property
    def same_reply(self) -> bool:
        return self.reply_ids == self.recorded.reply_ids

    @property
    def bit_identical(self) -> bool:
        """Reply ids and step logits equal the recording's exactly."""
        return self.same_reply and self.logits_sha256 == self.recorded.logits_sha256

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "reply": self.reply,
            "recorded_reply": self.recorded.reply,
            "reply_ids": list(self.reply_ids),
            "logits_sha256": self.logits_sha256,
            "bit_identical": self.bit_identical,
            "failed": self.failed,
        }


@dataclass(frozen=True)
class TurnsReport:
    """The turns replayed by :func:`replay_turns`, in order."""

    turns: tuple[TurnReplay, ...]
    interventions: tuple[Intervention, ...] = ()

    @property
    def bit_identical(self) -> bool:
        return all(t.bit_identical for t in self.turns)

    @property
    def digests(self) -> list[str]:
        """Each replayed turn's step-logits digest (compare runs in different processes)."""
        return [t.logits_sha256 for t in self.turns]

    def summary(self) -> str:
        lines = [
            f"turn {t.index}: {'bit-identical' if t.bit_identical else 'differs'} "
            f"(replay '{t.reply}', recorded '{t.recorded.reply}')"
            for t in self.turns
        ]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "bit_identical": self.bit_identical,
            "interventions": [iv.to_json() for iv in self.interventions],
            "turns": [t.to_json() for t in self.turns],
        }


def conversation_ids(session: Session) -> torch.Tensor:
    """The conversation's token ids (1, T): the recorded input (every turn up to the last
    message) followed by the last reply."""
    prompt = session.bundle.inputs["input_ids"]  # (1, T_prompt)
    last = conversation_of(session.manifest).turns[-1]
    return torch.cat([prompt, torch.tensor([last.reply_ids], dtype=prompt.dtype)], dim=1)


def replay_turns(
    session: Session, upto: int | None = None, interventions: Sequence[InterventionLike] = ()
) -> TurnsReport:
    """Replay turns 0..``upto`` (default: all) of the session's conversation, each on the
    recorded context up to its message, with ``interventions`` applied (positions are
    conversation positions; those a turn's replay does not reach are left out).

    Raises:
        BundleError: the bundle holds no conversation.
        ForensicsError: ``upto`` is not a turn of the conversation.
    """
    conversation = conversation_of(session.manifest)
    last = len(conversation) - 1 if upto is None else _turn_index(conversation, upto)
    ids = conversation_ids(session)
    ivs = tuple(as_intervention(i) for i in interventions)
    out = []
    for turn in conversation.turns[: last + 1]:
        active = [iv for iv in (_within(iv, turn.reply_span[1]) for iv in ivs) if iv is not None]
        context = ids[:, : turn.span[1]]  # (1, T_k): the recorded conversation up to turn k's message
        result = session.run(active, inputs={"input_ids": context, "attention_mask": torch.ones_like(context)})
        new = result.outputs.get("generated_ids")
        reply_ids = () if new is None else tuple(int(i) for i in new[turn.span[1] :])
        steps = result.outputs["logits"]  # (S, V)
        digest = tensor_digest(steps, algorithm_of(session.manifest))  # as the turn was recorded
        out.append(TurnReplay(turn.index, result.text or "", reply_ids, digest, turn, result.failed))
    return TurnsReport(tuple(out), ivs)


def at_turn(interventions: Sequence[InterventionLike], turn: TurnRecord) -> list[Intervention]:
    """``interventions`` restricted to the positions of ``turn`` (message and reply);
    an intervention already narrowed to positions keeps those inside the turn."""
    out = []
    for item in interventions:
        iv = as_intervention(item)
        inside = turn.positions if iv.positions is None else tuple(p for p in iv.positions if p in turn.positions)
        if inside:
            out.append(dataclasses.replace(iv, positions=inside))
    return out


@dataclass(frozen=True)
class TurnEffect:
    """The last turn's outcome with a fix restricted to one turn's positions.

    ``flipped``: the failure recorded on the last turn no longer holds.
    """

    index: int
    failed: bool | None
    flipped: bool | None
    reply: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def turn_effects(session: Session, interventions: Sequence[InterventionLike]) -> list[TurnEffect]:
    """Which turn's positions a fix needs: the incident (the last turn) replayed once per
    turn *k* with ``interventions`` restricted to turn *k*'s positions.

    A turn whose restricted fix flips the failure carries what the fix removes there
    (e.g. the turn that planted a false fact, or the question whose answer repeats it).
    """
    conversation = conversation_of(session.manifest)
    effects = []
    for turn in conversation.turns:
        result = session.run(at_turn(interventions, turn))
        effects.append(TurnEffect(turn.index, result.failed, result.flipped, result.text or ""))
    return effects


def turns_needed(effects: Sequence[TurnEffect]) -> list[int]:
    """The turns whose restricted fix alone flips the failure."""
    return [e.index for e in effects if e.flipped]


def source_turns(session: Session, source: str, site: str = "embed") -> list[TurnEffect]:
    """Which turn the failure comes from: the incident replayed once per turn *k* with
    ``site`` patched from ``source`` (a clean counterpart whose tokens line up with the
    conversation's: a bundle path or ``prompt:TEXT``) at turn *k*'s positions only.

    The turn whose patch alone flips the failure is where the conversation went wrong (the
    turn that planted the false fact), whatever units carry it to the answer.
    """
    conversation = conversation_of(session.manifest)
    effects = []
    for turn in conversation.turns:
        # The last reply is generated, so the source has no tokens there: patch its message only.
        last = turn.index == len(conversation) - 1
        positions = tuple(range(*turn.span)) if last else turn.positions
        result = session.run([Intervention(site, "patch", source=source, positions=positions)])
        effects.append(TurnEffect(turn.index, result.failed, result.flipped, result.text or ""))
    return effects


def _within(iv: Intervention, reach: int) -> Intervention | None:
    """``iv`` limited to positions before ``reach`` (None: none left; unrestricted ones stay)."""
    if iv.positions is None:
        return iv
    kept = tuple(p for p in iv.positions if p < reach)
    return dataclasses.replace(iv, positions=kept) if kept else None


def _turn_index(conversation: ConversationRecord, k: int) -> int:
    if not 0 <= k < len(conversation):
        raise ForensicsError(f"turn {k} does not exist; the conversation has turns 0–{len(conversation) - 1}")
    return k
