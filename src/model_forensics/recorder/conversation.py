"""Record a conversation: several turns in one bundle, with each turn's span, reply and calls.

A conversation is a list of user messages. Turn *k* appends message *k* to the context
(every earlier message and the model's own replies), the model replies greedily, and the
reply (up to and with its end-of-sequence token) is appended in turn. A ``between``
function may run after each reply (tools, retrieval): the external calls it logs with
``recorder.record_call`` belong to that turn, and the text it returns opens the next
message. The bundle is the last turn's recording (its input is the whole conversation up to
the last message, its output the last reply), and ``manifest.extras["conversation"]``
places every turn on that token axis::

    record_conversation(zoo.load("multiturn-false-fact"),
                        ["user: sky is purple . bot:", "user: what is sky ? bot:"], "incident",
                        predicate=contains("purple"), max_new_tokens=2)
    ConversationRecord.from_json(Bundle.open("incident").manifest["extras"]["conversation"]).turns[0].span
    # (0, 7): <bos> and the first message; turns[0].reply_span == (7, 9): "ok <eos>"

Spans are ``[start, end)`` token positions; turn 0's span starts at 0 and holds the
tokenizer's leading special tokens. Each turn keeps the digest (under the bundle's ``hash``)
of its reply's step logits (S, V), the scores at the last position of each decoding step, as replay computes them
(:mod:`model_forensics.replay.turns` verifies turn by turn against them). The record's
types and checks live in :mod:`model_forensics.core.conversation` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from model_forensics.core.bundle import check_writable_target
from model_forensics.core.conversation import ConversationRecord, TurnRecord, conversation_of
from model_forensics.core.digests import tensor_digest
from model_forensics.core.errors import ForensicsError
from model_forensics.core.predicates import Predicate
from model_forensics.models.adapters import adapter_for
from model_forensics.models.hooks import hooks, logits_of
from model_forensics.models.loading import LoadedModel
from model_forensics.recorder.hooks import RecorderHooks
from model_forensics.recorder.session import check_max_new_tokens, checked_encoding, resolved_predicate, tokenizer_of

__all__ = ["Between", "ConversationRecord", "TurnRecord", "conversation_of", "record_conversation"]

# After turn k's reply: between(k, reply_text, recorder) may log calls and return text
# that opens message k + 1 (None: nothing).
Between = Callable[[int, str, RecorderHooks], "str | None"]


def record_conversation(
    loaded: LoadedModel,
    messages: Sequence[str],
    out: str | Path,
    *,
    recorder: RecorderHooks | None = None,
    max_new_tokens: int = 8,
    predicate: Predicate | None = None,
    between: Between | None = None,
    overwrite: bool = False,
    extras: dict[str, Any] | None = None,
    sign_key: str | Path | None = None,
) -> Path:
    """Record the conversation of ``messages`` on ``loaded`` into a bundle at ``out``.

    Args:
        messages: the user's messages, one a turn, each as the model reads it (for chat
            formats, including the cue the reply follows, e.g. ``bot:``).
        max_new_tokens: greedy reply length of every turn (a reply ends earlier at eos).
        predicate: the failure test, evaluated on the last reply.
        between: runs after each reply but the last (see :data:`Between`).
        extras: JSON data carried along; ``prompt`` (the transcript) and ``conversation``
            are set here.
    Returns:
        The bundle's path: the last turn's recording, with ``extras["conversation"]``.
    Raises:
        ForensicsError: no messages, a model without a tokenizer, a conversation longer
            than the model's context, or ``max_new_tokens`` outside the bundle limits.
        BundleError: ``out`` exists (without ``overwrite``).
    """
    if not messages or not all(isinstance(m, str) and m.strip() for m in messages):
        raise ForensicsError("a conversation needs at least one message, each a non-empty string")
    if max_new_tokens < 1:
        raise ForensicsError(f"max_new_tokens={max_new_tokens}: every turn needs a reply of at least one token")
    target = Path(out)
    check_writable_target(target, overwrite)
    rec = recorder or RecorderHooks()
    check_max_new_tokens(rec, max_new_tokens)
    predicate = resolved_predicate(loaded, predicate)
    tok = tokenizer_of(loaded)
    steps: list[torch.Tensor] = []

    def keep_last(_module: Any, _args: Any, _kwargs: Any, output: Any) -> None:
        logits = logits_of(output)
        if logits is not None:
            steps.append(logits.detach()[0, -1].clone())  # (V,) the last position's scores

    turns: list[TurnRecord] = []
    context = torch.zeros((1, 0), dtype=torch.long)
    opening = ""
    with rec.install_hooks(loaded.model, tok), hooks(adapter_for(loaded.model), after={"": keep_last}):
        for k, message in enumerate(messages):
            text = f"{opening} {message}".strip() if opening else message
            ids = tok(text, add_special_tokens=k == 0, return_tensors="pt")["input_ids"]
            start = context.shape[1]
            context = torch.cat([context, ids], dim=1)
            batch = checked_encoding(loaded, {"input_ids": context, "attention_mask": torch.ones_like(context)})
            steps.clear()
            torch.manual_seed(0)
            pad = getattr(tok, "eos_token_id", None)
            sequence = rec.generate(batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            reply_ids = sequence[0, context.shape[1] :]
            calls_before = len(rec.calls.entries)
            reply = str(tok.decode(reply_ids, skip_special_tokens=True))
            opening = (between(k, reply, rec) or "") if between is not None and k < len(messages) - 1 else ""
            turns.append(
                TurnRecord(
                    index=k,
                    message=text,
                    span=(start, context.shape[1]),
                    reply_span=(context.shape[1], sequence.shape[1]),
                    reply=reply,
                    reply_ids=tuple(int(i) for i in reply_ids),
                    logits_sha256=tensor_digest(torch.stack(steps[: len(reply_ids)]), rec.hash_algorithm),
                    calls=tuple(range(calls_before, len(rec.calls.entries))),
                )
            )
            context = sequence[:, :].clone()
        record = ConversationRecord(tuple(turns))
        transcript = str(tok.decode(context[0, : turns[-1].span[1]], skip_special_tokens=False))
        info = {"prompt": transcript, "conversation": record.to_json(), **(extras or {})}
        if predicate is not None and predicate.name is not None:
            info = {"predicate_name": predicate.name, **info}
        return rec.create_bundle(
            target, predicate=predicate, overwrite=overwrite, extras=info, seed=0, sign_key=sign_key
        )
