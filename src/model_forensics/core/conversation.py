"""The conversation section of a bundle manifest (``extras.conversation``), typed and checked.

A conversation bundle (recorded by
:func:`~model_forensics.recorder.conversation.record_conversation`) places every turn on
the token axis of its input: turn *k*'s message is ``span = [start, end)`` and its reply
``reply_span`` directly after it; turn 0 starts at 0, each turn starts where the previous
reply ended, and the last turn's message ends where the recorded input ends (its reply is
the bundle's output)::

    input_ids  <bos> user: hello . bot: | hi <eos> | user: sky is purple . bot: | purple <eos>
    turn 0     span [0, 7)                reply [7, 9)
    turn 1                                           span [9, 17) = the input's end   reply [17, 19)

:meth:`ConversationRecord.from_json` is the one reader: a bundle's conversation is hostile
until it passes (integers that are not ints, spans out of order, overlapping or past the
input, reply ids that do not fill the reply's span: a :class:`BundleError` naming the turn).
``Bundle.open`` runs it (:func:`check_conversation`); a bundle without the section reads
as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from model_forensics.core.errors import BundleError

MAX_TURNS = 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class TurnRecord:
    """One recorded turn.

    Attributes:
        index: 0-based turn number.
        message: the text the model read in this turn (with any text ``between`` added).
        span: [start, end) of the message's tokens on the conversation's token axis.
        reply_span: [start, end) of the reply's tokens (directly after ``span``).
        reply: the decoded reply; reply_ids its token ids (end-of-sequence included).
        logits_sha256: digest of the reply's step logits (S, V), under the bundle's ``hash``
            (sha256 before format 1.3).
        calls: ``order`` of the external calls logged after this turn's reply.
    """

    index: int
    message: str
    span: tuple[int, int]
    reply_span: tuple[int, int]
    reply: str
    reply_ids: tuple[int, ...]
    logits_sha256: str
    calls: tuple[int, ...] = ()

    @property
    def positions(self) -> tuple[int, ...]:
        """Every token position of the turn: its message and its reply."""
        return tuple(range(self.span[0], self.reply_span[1]))

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "message": self.message,
            "span": list(self.span),
            "reply_span": list(self.reply_span),
            "reply": self.reply,
            "reply_ids": list(self.reply_ids),
            "logits_sha256": self.logits_sha256,
            "calls": list(self.calls),
        }

    @classmethod
    def from_json(cls, data: Any, where: str = "conversation turn") -> TurnRecord:
        """Read one turn (types only; :meth:`ConversationRecord.from_json` checks the spans).

        Raises:
            BundleError: a key is missing or of the wrong type.
        """
        if not isinstance(data, dict):
            raise BundleError(f"{where} is not a JSON object; record the conversation again")
        try:
            return cls(
                index=_int(data["index"], "index"),
                message=_str(data["message"], "message"),
                span=_pair(data["span"], "span"),
                reply_span=_pair(data["reply_span"], "reply_span"),
                reply=_str(data["reply"], "reply"),
                reply_ids=tuple(_int(i, "reply_ids") for i in _list(data["reply_ids"], "reply_ids")),
                logits_sha256=_digest(data["logits_sha256"]),
                calls=tuple(_int(c, "calls") for c in _list(data.get("calls", []), "calls")),
            )
        except KeyError as exc:
            raise BundleError(f"{where} has no {exc}; record the conversation again") from None
        except (TypeError, ValueError) as exc:
            raise BundleError(f"{where} is malformed: {exc}; record the conversation again") from None


def _int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{key} holds {type(value).__name__} {str(value)[:40]!r}, not an integer")
    if value < 0:
        raise ValueError(f"{key} holds {value}, a negative position")
    return value


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{key} is {type(value).__name__}, not a string")
    return value


def _list(value: Any, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"{key} is {type(value).__name__}, not a list")
    return value


def _pair(value: Any, key: str) -> tuple[int, int]:
    items = _list(value, key)
    if len(items) != 2:
        raise ValueError(f"{key} holds {len(items)} numbers, not [start, end)")
    start, end = (_int(v, key) for v in items)
    if not start < end:
        raise ValueError(f"{key} [{start}, {end}) is empty or reversed")
    return start, end


def _digest(value: Any) -> str:
    if not isinstance(value, str) or not _SHA256.match(value):
        raise ValueError("logits_sha256 is not a sha256 or blake3 digest (64 lowercase hex digits)")
    return value


@dataclass(frozen=True)
class ConversationRecord:
    """The turns of a recorded conversation (``manifest.extras["conversation"]``)."""

    turns: tuple[TurnRecord, ...] = field(default_factory=tuple)

    def __len__(self) -> int:
        return len(self.turns)

    def turn_at(self, position: int) -> int | None:
        """The turn that holds token ``position`` (None: past the last reply)."""
        return next((t.index for t in self.turns if t.span[0] <= position < t.reply_span[1]), None)

    def to_json(self) -> dict[str, Any]:
        return {"turns": [t.to_json() for t in self.turns]}

    @classmethod
    def from_json(cls, data: Any, input_length: int | None = None) -> ConversationRecord:
        """Read and check a conversation record.

        Args:
            data: ``manifest.extras["conversation"]``.
            input_length: tokens of the bundle's recorded input (T of ``input_ids`` (1, T)):
                the last turn's message must end there, every earlier reply before it.
        Raises:
            BundleError: the record is malformed, its turns do not follow one another on the
                token axis, a reply's ids do not fill its span, or a span lies past the input.
        """
        if not isinstance(data, dict) or not isinstance(data.get("turns"), list) or not data["turns"]:
            raise BundleError("the bundle's conversation has no turns; record it with record_conversation")
        if len(data["turns"]) > MAX_TURNS:
            raise BundleError(f"the bundle's conversation has {len(data['turns'])} turns, over {MAX_TURNS}")
        turns = tuple(TurnRecord.from_json(t, f"conversation turn {i}") for i, t in enumerate(data["turns"]))
        cursor = 0
        for i, turn in enumerate(turns):
            if turn.index != i or turn.span[0] != cursor or turn.reply_span[0] != turn.span[1]:
                raise BundleError(
                    f"conversation turn {i} does not follow turn {i - 1} on the token axis (index {turn.index}, "
                    f"span {list(turn.span)}, reply {list(turn.reply_span)}, previous reply ended at {cursor}); "
                    "the turns overlap or leave a gap: record the conversation again"
                )
            if len(turn.reply_ids) != turn.reply_span[1] - turn.reply_span[0]:
                raise BundleError(
                    f"conversation turn {i}: reply_span {list(turn.reply_span)} holds "
                    f"{turn.reply_span[1] - turn.reply_span[0]} tokens but reply_ids {len(turn.reply_ids)}; "
                    "record the conversation again"
                )
            cursor = turn.reply_span[1]
        if input_length is not None:
            _check_against_input(turns, input_length)
        return cls(turns)


def _check_against_input(turns: tuple[TurnRecord, ...], input_length: int) -> None:
    """The last message ends where the recorded input ends; everything before lies inside it."""
    last = turns[-1]
    if last.span[1] != input_length:
        raise BundleError(
            f"conversation turn {last.index} ends its message at token {last.span[1]}, but the recorded input "
            f"has {input_length} tokens (spans out of range); record the conversation again"
        )


def conversation_of(manifest: dict[str, Any]) -> ConversationRecord:
    """The conversation a bundle's manifest holds, checked against its input.

    Raises:
        BundleError: the bundle records a single prompt, not a conversation, or its
            conversation is malformed.
    """
    found = check_conversation(manifest)
    if found is None:
        raise BundleError(
            f"bundle '{manifest.get('name', '?')}' holds one prompt, not a conversation; record one with "
            "record_conversation (or `model-forensics record --turns FILE`)"
        )
    return found


def check_conversation(manifest: dict[str, Any]) -> ConversationRecord | None:
    """The manifest's conversation, checked (None: the bundle holds none, as older bundles).

    Raises:
        BundleError: the conversation is malformed, or the bundle has no ``input_ids`` for it.
    """
    data = (manifest.get("extras") or {}).get("conversation")
    if data is None:
        return None
    tensors = (manifest.get("input") or {}).get("tensors") or {}
    shape = (tensors.get("input_ids") or {}).get("shape")
    if not isinstance(shape, list) or len(shape) != 2 or not isinstance(shape[1], int):
        raise BundleError("the bundle holds a conversation but no input_ids (1, T) to place it on; record it again")
    return ConversationRecord.from_json(data, input_length=shape[1])
