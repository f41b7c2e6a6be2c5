"""Turning what a user or a bundle's extras give as an input into model inputs, checked.

::

    encode_input(loaded, "a prompt")                                  # the recording's encoding
    encode_input(loaded, [{"role": "user", "content": "hi"}])         # the chat template
    encode_input(loaded, {"input_ids": [[1, 2, 3]]})                  # ids, checked
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from model_forensics.core.errors import ForensicsError
from model_forensics.models.inputs import ModelInputs, chat_messages, pixel_values, token_ids
from model_forensics.models.loading import LoadedModel
from model_forensics.recorder.session import encode_messages, encode_prompt

Inputs = dict[str, torch.Tensor]
InputLike = str | Inputs | torch.Tensor | Sequence[dict[str, str]] | Sequence[Sequence[int]] | None


def encode_input(loaded: LoadedModel, entry: InputLike | dict[str, Any]) -> ModelInputs:
    """Model inputs for a prompt string, chat messages (``[{"role": "user", "content":
    …}]``, through the tokenizer's chat template), ``{"prompt": …}``,
    ``{"input_ids": [[…]]}``, ``{"pixel_values": [[[…]]]}`` (an image (C, H, W)), token
    ids (a (1, T) tensor or ``[[…]]``), or an input dict (copied).

    Raises:
        ForensicsError: anything else (named), ids outside the vocabulary, messages
            for a model without a chat template.
    """
    if isinstance(entry, str):
        return ModelInputs(encode_prompt(loaded, entry))
    if isinstance(entry, torch.Tensor):
        return ModelInputs.of_ids(token_ids(entry, vocab_size(loaded.model)))
    if isinstance(entry, dict):
        if "prompt" in entry:
            if not isinstance(entry["prompt"], str):
                raise ForensicsError(
                    f"{{'prompt': …}} holds a {type(entry['prompt']).__name__}; the prompt must be a string"
                )
            return encode_input(loaded, entry["prompt"])
        if entry and all(isinstance(v, torch.Tensor) for v in entry.values()):
            return ModelInputs(entry)
        if "input_ids" in entry:
            return encode_input(loaded, token_ids(entry["input_ids"], vocab_size(loaded.model)))
        if "pixel_values" in entry:  # an image (C, H, W), checked: docs/recording.md
            return ModelInputs(pixel_values=pixel_values(entry["pixel_values"]))
        raise ForensicsError(
            f"cannot turn a dict with keys {sorted(map(str, entry))} into model inputs; "
            "give {'prompt': …}, {'input_ids': [[…]]}, {'pixel_values': [[[…]]]} or a dict of tensors"
        )
    if isinstance(entry, list | tuple):
        messages = chat_messages(entry)
        if messages is not None:
            return ModelInputs(encode_messages(loaded, messages))
        return ModelInputs.of_ids(token_ids(entry, vocab_size(loaded.model)))
    raise ForensicsError(
        f"cannot turn a {type(entry).__name__} into model inputs; give a prompt string, chat messages "
        "[{'role': 'user', 'content': …}], token ids ((1, T) tensor or [[…]]) or an input dict"
    )


def vocab_size(model: nn.Module) -> int | None:
    """The size of the model's token embedding (None for models without one)."""
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    return int(embeddings.num_embeddings) if isinstance(embeddings, nn.Embedding) else None
