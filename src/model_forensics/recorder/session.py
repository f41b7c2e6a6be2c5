"""Record one prompt end to end: tokenize, run (forward or greedy generation), write a bundle.

This is what ``model-forensics record`` and ``demo`` call; it is plain library code so
the same recording can be made from Python.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from model_forensics.core.bundle import check_writable_target
from model_forensics.core.errors import ForensicsError
from model_forensics.core.predicates import Predicate
from model_forensics.models.loading import LoadedModel
from model_forensics.recorder.hooks import RecorderHooks


def encode_prompt(loaded: LoadedModel, prompt: str, chat: bool | None = None) -> dict[str, torch.Tensor]:
    """Token ids for ``prompt``; chat models get their chat template (``chat=None``: auto).

    Raises:
        ForensicsError: the model has no tokenizer, or the prompt exceeds its context.
    """
    tok = loaded.tokenizer
    if tok is None:
        raise ForensicsError(f"model '{loaded.ref.name}' has no tokenizer; pass token ids from Python instead")
    use_chat = bool(getattr(tok, "chat_template", None)) if chat is None else chat
    if use_chat:
        enc = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        enc = tok(prompt, return_tensors="pt")
    batch = {k: v for k, v in dict(enc).items() if isinstance(v, torch.Tensor)}
    limit = getattr(getattr(loaded.model, "config", None), "max_position_embeddings", None)
    n = int(batch["input_ids"].shape[1])
    if limit is not None and n > int(limit):
        raise ForensicsError(
            f"the prompt is {n} tokens long but '{loaded.ref.name}' reads at most {limit}; shorten the prompt"
        )
    return batch


def record_prompt(
    loaded: LoadedModel,
    prompt: str,
    out: str | Path,
    *,
    recorder: RecorderHooks | None = None,
    max_new_tokens: int = 0,
    predicate: Predicate | None = None,
    overwrite: bool = False,
    chat: bool | None = None,
    extras: dict[str, Any] | None = None,
    sign_key: str | Path | None = None,
) -> Path:
    """Record ``prompt`` on ``loaded`` into a bundle at ``out``.

    ``max_new_tokens > 0`` records a greedy generation (prompt + generated positions);
    0 records a single forward pass. ``out`` is checked before the model runs.

    Raises:
        BundleError: ``out`` exists (without ``overwrite``), or is anything but a bundle.
        ForensicsError: the prompt cannot be encoded, or nothing could be recorded.
    """
    target = Path(out)
    check_writable_target(target, overwrite)
    rec = recorder or RecorderHooks()
    limit = rec.config_tree.bundle.max_new_tokens
    if not 0 <= max_new_tokens <= limit:
        raise ForensicsError(
            f"max_new_tokens={max_new_tokens} is outside 0..{limit}: readers refuse bundles that ask for more "
            "(bundle.max_new_tokens in the config)"
        )
    batch = encode_prompt(loaded, prompt, chat)
    with rec.install_hooks(loaded.model, loaded.tokenizer):
        torch.manual_seed(0)
        if max_new_tokens > 0:
            pad = getattr(loaded.tokenizer, "eos_token_id", None)
            rec.generate(batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        else:
            with torch.no_grad():
                loaded.model(**batch)
        return rec.create_bundle(
            target,
            predicate=predicate,
            overwrite=overwrite,
            extras={"prompt": prompt, **(extras or {})},
            seed=0,
            sign_key=sign_key,
        )
