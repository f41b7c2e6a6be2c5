"""Reading a run's raw outputs: its scores per step, its ids and text, and the verdict of
the failure predicate on them.

A batched generation pads rows that finished early, so a row's outcome ends at its first
EOS token; a forward pass's text is its decoded next token (for token models). A
generation whose verdicts are all that is wanted may stop once every row's is settled
(:func:`settled_stop`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from model_forensics.core.predicates import Predicate


@dataclass
class Outcome:
    """One batch row's output, read.

    Attributes:
        steps: last-position scores per forward call (S, V); S = 1 for a forward pass.
        ids: prompt and generated ids up to the first EOS (T_prompt + S,), or None
            (forward pass).
        text: the generated continuation or decoded next token (None without a tokenizer).
    """

    steps: torch.Tensor
    ids: torch.Tensor | None
    text: str | None


class Readout:
    """Turns raw outputs into :class:`Outcome`\\ s and evaluates the failure predicate.

    Args:
        model: the replayed model (its ``generation_config`` names the EOS tokens).
        tokenizer: decodes ids to text (None: no text).
        predicate: the bundle's failure predicate (None: no verdicts).
        has_tokens: the model scores tokens (the recording's logits are (B, T, V)), so a
            forward pass's next token is decoded.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, predicate: Predicate | None, has_tokens: bool):
        self.model = model
        self.tokenizer = tokenizer
        self.predicate = predicate
        self.has_tokens = has_tokens

    def outcome(self, prompt_len: int, steps: torch.Tensor, sequence: torch.Tensor | None) -> Outcome:
        """Read one row: ``steps`` (S, V) and, for generation, its sequence (T_prompt + S,)."""
        if sequence is None:
            token = torch.tensor([int(steps[-1].argmax())])
            return Outcome(steps, None, self.decode(token) if self.has_tokens else None)
        new = sequence[prompt_len:]
        cut = self.reply_end(new)
        cut = len(new) if cut is None else cut
        return Outcome(steps[:cut], sequence[: prompt_len + cut], self.decode(sequence[prompt_len : prompt_len + cut]))

    def failed(self, text: str | None, logits: torch.Tensor) -> bool | None:
        """The predicate on one output (None: no predicate, or it reads text there is none of)."""
        if self.predicate is None:
            return None
        if self.predicate.needs_text and text is None:
            return None
        return self.predicate.evaluate(text=text, logits=logits)

    def decode(self, ids: torch.Tensor) -> str | None:
        if self.tokenizer is None:
            return None
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def settled(self, new: torch.Tensor) -> bool:
        """Whether the reply start ``new`` (generated ids) already has a verdict no continuation
        can change (:meth:`~model_forensics.core.predicates.Predicate.settled`; False when the
        predicate cannot settle before a reply ends, or there is no text to read)."""
        predicate = self.predicate
        if predicate is None or not predicate.settles:
            return False
        text = self.decode(new)
        return text is not None and predicate.settled(text)

    def reply_end(self, new: torch.Tensor) -> int | None:
        """The length of a reply whose generated ids are ``new``: up to and including its
        first EOS token (None: no EOS yet)."""
        eos = self.eos_ids()
        return next((j + 1 for j, t in enumerate(new.tolist()) if t in eos), None)

    def eos_ids(self) -> set[int]:
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids = eos if isinstance(eos, list | tuple) else [eos]
        return {int(i) for i in ids if i is not None}


def settled_stop(readout: Readout, prompt_len: int) -> Any:
    """A ``StoppingCriteriaList`` that ends a batched greedy generation once every row is
    settled: finished (an EOS token) or with a verdict no continuation can change
    (:meth:`~model_forensics.core.predicates.Predicate.settled`). All rows stop together,
    so no row is padded early: each row's tokens, and so its verdict, are those of the full
    generation; only its text and scores end sooner. None when the predicate cannot settle
    before a reply ends, or there is no text to read."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    predicate = readout.predicate
    if predicate is None or not predicate.settles or readout.tokenizer is None:
        return None

    class Settled(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            rows = input_ids[:, prompt_len:]
            done = all(readout.reply_end(row) is not None or readout.settled(row) for row in rows)
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Settled()])
