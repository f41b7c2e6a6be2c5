"""Which turn of a conversation an analysis points at.

For a conversation bundle (:mod:`model_forensics.core.conversation`), ``analyze`` says

- ``failing_turn``: the turn whose reply holds the failing output (the bundle's output is
  the last turn's reply, so it is the last turn);
- ``top_positions``: the incident's prompt positions that attribution ranks highest
  (first-order Δ of the failure metric when one position's token embedding is
  mean-ablated; one gradient pass on the incident), each with its token and the turn whose
  span holds it; ``turn_shares``: each turn's share of that positive attribution. Embedding
  positions, because that is where a planted fact enters the model: the residual stream of
  the last position, which reads the answer, would top any ranking of later sites;
- ``fix_turns``: the turns whose positions the fix needs: the incident replayed once per
  turn with the fix restricted to that turn's positions (:func:`~model_forensics.replay.turns.turn_effects`);
  a turn listed there flips the failure on its own;
- ``source_turns``: where the failure comes from, when the bundle carries the incident's
  clean counterpart (``extras.baseline[0]``, the same tokens but the planted statement):
  the incident replayed once per turn with that turn's embeddings patched from the
  counterpart (:func:`~model_forensics.replay.turns.source_turns`); the turn whose patch
  alone flips the failure is the one that planted it (None: no counterpart that lines up).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from model_forensics.core.conversation import ConversationRecord, check_conversation
from model_forensics.rca.attribution import attribution_ranking
from model_forensics.rca.progress import Progress, silent
from model_forensics.replay import Intervention, Session
from model_forensics.replay.turns import source_turns, turn_effects, turns_needed

TOP_POSITIONS = 5


def conversation_findings(
    session: Session, fix: Sequence[Intervention] = (), progress: Progress = silent
) -> dict[str, Any] | None:
    """Where the failure of ``session``'s conversation sits, by turn (see the module
    docstring); None for a bundle that holds one prompt.

    Args:
        session: the incident's replay session.
        fix: the fix set found (empty: ``fix_turns`` is not measured).
    Returns:
        ``{"turns", "failing_turn", "top_positions": [{"unit", "position", "token", "turn",
        "score"}], "turn_shares": {turn: share}, "fix_turns", "fix_effects", "source_turns"}``.
    """
    record = check_conversation(session.manifest)
    if record is None:
        return None
    ranking = attribution_ranking(session, inputs=[session.inputs], positions=True, progress=progress)
    positions = [u for u in ranking.level("position") if u.score > 0 and u.unit.split("@", 1)[0] == "embed"]
    ids = session.inputs["input_ids"][0].tolist()  # (T,) the conversation up to its last message
    top = [_position(record, ids, session, u.unit, u.score) for u in positions[:TOP_POSITIONS]]
    effects = turn_effects(session, fix) if fix else []
    return {
        "turns": len(record),
        "failing_turn": record.turns[-1].index,
        "top_positions": top,
        "turn_shares": _shares(record, [(int(u.unit.rsplit("=", 1)[1]), u.score) for u in positions]),
        "fix_turns": turns_needed(effects) if fix else None,
        "fix_effects": [e.to_json() for e in effects],
        "source_turns": _source_turns(session),
    }


def _source_turns(session: Session) -> list[int] | None:
    """The turns whose embeddings, patched from the clean counterpart, alone flip the
    failure (None: the bundle carries no counterpart whose tokens line up)."""
    counterparts = session.extras.get("baseline") or []
    if not counterparts:
        return None
    entry = counterparts[0]
    text = entry.get("prompt") if isinstance(entry, dict) else entry
    if not isinstance(text, str) or session.encode(text).length != session.inputs.length:
        return None
    return turns_needed(source_turns(session, f"prompt:{text}"))


def _position(record: ConversationRecord, ids: list[int], session: Session, unit: str, score: float) -> dict[str, Any]:
    position = int(unit.rsplit("=", 1)[1])
    token = None
    if session.tokenizer is not None and position < len(ids):
        token = str(session.tokenizer.decode([ids[position]]))
    return {"unit": unit, "position": position, "token": token, "turn": record.turn_at(position), "score": score}


def _shares(record: ConversationRecord, scored: list[tuple[int, float]]) -> dict[str, float]:
    """Each turn's share of the positive embedding attribution (turns as strings: JSON keys)."""
    total = sum(score for _, score in scored)
    shares = {str(t.index): 0.0 for t in record.turns}
    for position, score in scored:
        turn = record.turn_at(position)
        if turn is not None and total > 0:
            shares[str(turn)] += score / total
    return shares
