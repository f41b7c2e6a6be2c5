"""What a circuits analysis runs on: a model, its adapter and tokenizer, the environment its
passes run in, and the scalar it explains.

A :class:`Subject` is built from a plain model (with its tokenizer) or from a replay
:class:`~model_forensics.replay.session.Session` (an incident bundle: the session's
environment then wraps every pass, so they are sandboxed and counted). An
:class:`Objective` is the output being explained: one token's logit or log-probability at
one output position (causal LMs, scores (B, T, V)), or one class of a classifier
(scores (B, C)).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from model_forensics.core.errors import ForensicsError
from model_forensics.models.adapters import Adapter, adapter_for
from model_forensics.models.hooks import SiteCall, hooks, logits_of
from model_forensics.models.inputs import ModelInputs, last_logits_only
from model_forensics.replay.interventions import Clock, Prepared, intervening
from model_forensics.replay.session import Session

MEASURES = ("logprob", "logit")


@dataclass
class Subject:
    """A model to analyse.

    Attributes:
        model / adapter / tokenizer: the model, its site mapping, its tokenizer (or None).
        environment: a context manager factory every pass runs in (the session's replay
            environment, or a no-op for a plain model).
        session: the replay session, when the subject is a bundle.
    """

    model: nn.Module
    adapter: Adapter
    tokenizer: Any
    environment: Callable[[], AbstractContextManager[Any]]
    session: Session | None = None
    passes: int = 0

    def call(self, inputs: ModelInputs, rows: int = 1, last_only: bool = False) -> torch.Tensor:
        """Scores (rows, T, V) or (rows, C) of ``rows`` copies of ``inputs``: one counted
        pass. ``last_only``: scores (rows, 1, V) of the last position only, where the model's
        forward can skip the others (``logits_to_keep``). The caller sets hooks, the
        environment and autograd."""
        self.passes += 1
        keep = last_logits_only(self.model) if last_only else {}
        logits = logits_of(self.model(**inputs.expand(rows), **keep))
        if logits is None:
            raise ForensicsError(f"{type(self.model).__name__} returned no scores to explain")
        return logits

    def run(
        self, inputs: ModelInputs, rows: Sequence[Sequence[Prepared]], batch_size: int, last_only: bool = False
    ) -> torch.Tensor:
        """Scores (N, T, V) or (N, C): row i of ``inputs`` run with ``rows[i]`` applied, in
        batches of ``batch_size`` rows, without autograd (``last_only``: see :meth:`call`)."""
        out = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            clock = Clock(0, inputs.length)
            with self.environment(), torch.no_grad(), intervening(self.adapter, chunk, clock):
                out.append(self.call(inputs, len(chunk), last_only))
        return torch.cat(out)

    def capture(self, inputs: ModelInputs, sites: Sequence[str]) -> dict[str, torch.Tensor]:
        """Each site's activation on a clean run of ``inputs``, row 0: (T, *per-token)."""
        kept: dict[str, torch.Tensor] = {}

        def keep(tensor: torch.Tensor, call: SiteCall) -> None:
            kept.setdefault(call.site, tensor[0].detach().clone())

        with self.environment(), torch.no_grad(), hooks(self.adapter, dict.fromkeys(sites, keep)):
            self.call(inputs)
        return kept

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompt: str | torch.Tensor | None) -> ModelInputs:
        """Inputs (batch of one) for a prompt string or ids (T,) / (1, T); None: the
        session's incident prompt."""
        if prompt is None:
            if self.session is None:
                raise ForensicsError("no prompt given; pass the text to analyse (or a bundle, whose prompt is used)")
            return ModelInputs.of_ids(self.session.inputs["input_ids"])
        if isinstance(prompt, torch.Tensor):
            ids = prompt if prompt.dim() == 2 else prompt.unsqueeze(0)
            if ids.shape[0] != 1 or ids.shape[1] == 0:
                raise ForensicsError(f"pass one prompt as ids of shape (T,) or (1, T), got {tuple(prompt.shape)}")
            return ModelInputs.of_ids(ids.to(self.device))
        if self.session is not None:
            return ModelInputs.of_ids(self.session.encode(prompt)["input_ids"])
        if self.tokenizer is None:
            raise ForensicsError("the model has no tokenizer; pass token ids instead of text")
        if not prompt.strip():
            raise ForensicsError("the prompt is empty; pass the text to analyse")
        ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if limit is not None and ids.shape[1] > int(limit):
            raise ForensicsError(f"the prompt is {ids.shape[1]} tokens long but the model reads at most {limit}")
        return ModelInputs.of_ids(ids.to(self.device))

    def recorded_output(self) -> int | None:
        """The token (or class) the incident's recording produced after its prompt: the
        first generated token of a ``generate`` bundle, the recorded prediction of a
        ``forward`` one; None for a plain model or a bundle that recorded neither."""
        if self.session is None:
            return None
        ids = self.session.bundle.outputs.get("generated_ids")  # (1, T + new tokens)
        length = self.session.prompt_len
        prompt = self.session.inputs["input_ids"]
        if (
            ids is not None
            and ids.dim() == 2
            and ids.shape[1] > length
            and torch.equal(ids[:1, :length].to(prompt.device), prompt)
        ):
            return int(ids[0, length])
        if self.session.mode == "generate":
            return None
        prediction = (self.session.manifest.get("output") or {}).get("prediction")
        return prediction if isinstance(prediction, int) and not isinstance(prediction, bool) else None

    def tokens(self, ids: torch.Tensor) -> list[str]:
        """Readable token strings for ids (T,)."""
        values = [int(i) for i in ids.tolist()]
        if self.tokenizer is None:
            return [str(i) for i in values]
        return [str(t) for t in self.tokenizer.convert_ids_to_tokens(values)]


def incident_prompt_set(model: nn.Module | Session) -> tuple[list[str], int | None]:
    """A bundle's own prompt set and target: the incident prompt, then its recorded failing
    variants (``extras.variants``, the text ones), and the recorded output token.

    Raises:
        ForensicsError: not a bundle, or the bundle carries no text prompt.
    """
    if not isinstance(model, Session):
        raise ForensicsError(
            "no prompt set given; pass a prompt file (--prompts), or a bundle, whose prompt and variants are used"
        )
    extras = model.extras
    texts = [extras.get("prompt"), *(extras.get("variants") or [])]
    prompts = list(dict.fromkeys(t for t in texts if isinstance(t, str) and t.strip()))  # the incident once
    if not prompts:
        raise ForensicsError("the bundle records no text prompt or variants; pass a prompt file (--prompts)")
    return prompts, subject_of(model).recorded_output()


def subject_of(model: nn.Module | Session, tokenizer: Any = None) -> Subject:
    """A :class:`Subject` for a model (with its tokenizer) or a replay session."""
    if isinstance(model, Session):
        return Subject(model.model, model.adapter, model.tokenizer, model.environment, model)
    if not isinstance(model, nn.Module):
        raise ForensicsError(f"expected a torch model or a replay Session, got {type(model).__name__}")
    model.eval()
    return Subject(model, adapter_for(model), tokenizer, nullcontext)


@dataclass(frozen=True)
class Objective:
    """The scalar an analysis explains: ``measure`` (``logprob`` or ``logit``) of token
    ``token_id`` at output ``position`` (absolute, 0 ≤ position < T), or of class
    ``token_id`` for a classifier (position unused). ``source`` says where the target came
    from: ``given``, ``top prediction`` (the clean run's) or ``recorded output`` (a
    bundle's)."""

    token_id: int
    position: int
    measure: str = "logprob"
    label: str = ""
    source: str = "given"

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """(B,) from scores (B, T, V) or (B, C)."""
        scores = logits[:, self.position] if logits.dim() == 3 else logits
        scores = scores.float()
        if self.measure == "logprob":
            scores = torch.log_softmax(scores, dim=-1)
        return scores[:, self.token_id]

    def to_json(self) -> dict[str, Any]:
        return {
            "token_id": self.token_id,
            "position": self.position,
            "measure": self.measure,
            "label": self.label,
            "source": self.source,
        }


def objective_for(
    subject: Subject,
    inputs: ModelInputs,
    target: str | int | None,
    *,
    position: int = -1,
    measure: str = "logprob",
    clean_logits: torch.Tensor | None = None,
    recorded: int | None = None,
) -> Objective:
    """Resolve ``target`` (a token string such as ``" HACKED"``, a token id, or None for
    ``recorded``, a bundle's recorded output at the last position, else the model's own
    top prediction) and ``position`` (negative: from the end) against the prompt.

    A target text that tokenizes to several tokens is refused (the message lists the
    pieces): an objective reads one token's score, so name the first piece, or its id.

    Raises:
        ForensicsError: the position lies outside the sequence, the target is not one
            token of the vocabulary, or the measure is unknown.
    """
    if measure not in MEASURES:
        raise ForensicsError(f"measure '{measure}' is unknown; use one of {', '.join(MEASURES)}")
    length = inputs.length
    if not -length <= position < length:
        raise ForensicsError(
            f"output position {position} is outside the sequence of {length} tokens; use -{length}…{length - 1}"
        )
    absolute = position % length
    vocab = _vocab_size(subject)
    if target is None and recorded is not None and absolute == length - 1:
        if not 0 <= recorded < vocab:
            raise ForensicsError(
                f"the bundle's recorded output {recorded} is not in the vocabulary (0–{vocab - 1}); pass --target"
            )
        return Objective(recorded, absolute, measure, _label(subject, recorded), "recorded output")
    if target is None:
        if clean_logits is None:
            raise ForensicsError("no target given; name the output token to explain, e.g. target=' HACKED'")
        scores = clean_logits[0, absolute] if clean_logits.dim() == 3 else clean_logits[0]
        token = int(scores.argmax())
        return Objective(token, absolute, measure, _label(subject, token), "top prediction")
    if isinstance(target, int) and not isinstance(target, bool):
        if not 0 <= target < vocab:
            raise ForensicsError(f"target id {target} is not in the vocabulary (0–{vocab - 1})")
        return Objective(target, absolute, measure, _label(subject, target))
    return Objective(_token_id(subject, str(target), vocab), absolute, measure, str(target))


def _vocab_size(subject: Subject) -> int:
    point = subject.adapter.points.get("logits")
    head = subject.adapter.modules.get(point.module) if point is not None else None
    out = getattr(head, "out_features", None)
    if out is not None:
        return int(out)
    return int(getattr(getattr(subject.model, "config", None), "vocab_size", 0) or 0)


def _token_id(subject: Subject, text: str, vocab: int) -> int:
    tok = subject.tokenizer
    if tok is None:
        raise ForensicsError(f"target {text!r} is text but the model has no tokenizer; pass the token id")
    ids = list(tok.encode(text, add_special_tokens=False))
    if len(ids) != 1:
        pieces = tok.convert_ids_to_tokens(ids) if ids else []
        raise ForensicsError(
            f"target {text!r} is {len(ids)} tokens {pieces}, not one; name a single token (or pass its id)"
        )
    unk = getattr(tok, "unk_token_id", None)
    if (unk is not None and ids[0] == unk and text.strip() != tok.unk_token) or not 0 <= ids[0] < vocab:
        raise ForensicsError(f"target {text!r} is not in the model's vocabulary; name a token the tokenizer knows")
    return int(ids[0])


def _label(subject: Subject, token: int) -> str:
    if subject.tokenizer is None:
        return str(token)
    return str(subject.tokenizer.convert_ids_to_tokens([token])[0])
