"""ModelInputs: the tensors a model is called with, and the few questions asked of them.

A ``dict[str, Tensor]`` (so ``model(**inputs)`` and ``inputs["input_ids"]`` keep working)
that knows its prompt length, its cache key and the subset ``generate()`` takes::

    inputs = ModelInputs.of_ids(torch.tensor([[5, 9, 3]]))   # input_ids (1, 3) + attention_mask
    inputs.length, inputs.key                                # 3, (5, 9, 3)
    ModelInputs(pixel_values=pixel_values([[[0.0, 1.0], [1.0, 0.0]]]))  # an image (1, 1, 2, 2)
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from model_forensics.core.errors import ForensicsError

GENERATE_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class ModelInputs(dict[str, torch.Tensor]):
    """Model inputs: ``input_ids`` (B, T) and ``attention_mask`` (B, T), or whatever the
    model was recorded with (``token_type_ids``, ``position_ids``, ``inputs_embeds`` …)."""

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> ModelInputs:
        """The same tensors, as ModelInputs (no copy of the tensors)."""
        return tensors if isinstance(tensors, ModelInputs) else cls(tensors)

    @classmethod
    def of_ids(cls, ids: torch.Tensor) -> ModelInputs:
        """``input_ids`` (T,) or (B, T) with an all-ones attention mask."""
        ids = ids if ids.dim() == 2 else ids.unsqueeze(0)
        return cls(input_ids=ids, attention_mask=torch.ones_like(ids))

    @property
    def one_row(self) -> bool:
        """Every tensor holds one row (one prompt; a batch of copies is ``expand``-ed from it)."""
        return bool(self) and all(v.shape[0] == 1 for v in self.values())

    @property
    def length(self) -> int:
        """Tokens per row (T of ``input_ids``; 0 when there are no ids)."""
        return int(self["input_ids"].shape[1]) if "input_ids" in self else 0

    @property
    def key(self) -> tuple[int, ...]:
        """A cache key: the token ids of row 0; for images, a 64-bit digest of row 0's
        ``pixel_values`` (outside any token id's range); empty without either."""
        if "input_ids" in self:
            return tuple(self["input_ids"][0].tolist())
        if "pixel_values" in self:
            raw = self["pixel_values"][0].detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            return (int.from_bytes(hashlib.sha256(raw.numpy().tobytes()).digest()[:8], "big") + 2**63,)
        return ()

    def for_generation(self) -> ModelInputs:
        """What ``model.generate`` takes: ids, mask (all ones when missing), token types.
        generate() derives positions itself; its first step sees the prompt only."""
        out = ModelInputs({k: v for k, v in self.items() if k in GENERATE_KEYS})
        if "attention_mask" not in out and "input_ids" in out:
            out["attention_mask"] = torch.ones_like(out["input_ids"])
        return out

    @classmethod
    def left_padded(cls, rows: Sequence[ModelInputs], pad_id: int) -> tuple[ModelInputs, list[int]]:
        """One batch of one-row token inputs of any lengths: ``input_ids`` padded on the left
        with ``pad_id`` to the longest, ``attention_mask`` 0 on the padding (each row's own
        mask, or ones, elsewhere); and the pad tokens of each row. Only ``input_ids`` and
        ``attention_mask`` may be present (a generation's prompt)."""
        width = max(r.length for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        pads = []
        for i, r in enumerate(rows):
            if not r.one_row or set(r) - {"input_ids", "attention_mask"}:
                raise ValueError(f"left padding takes one-row input_ids and attention_mask, got {sorted(r)}")
            pad = width - r.length
            ids[i, pad:] = r["input_ids"][0]
            mask[i, pad:] = r["attention_mask"][0] if "attention_mask" in r else 1
            pads.append(pad)
        return cls(input_ids=ids, attention_mask=mask), pads

    def expand(self, n: int) -> ModelInputs:
        """Row 0 repeated ``n`` times (a view; rows of a batch of one)."""
        return ModelInputs({k: v.expand(n, *v.shape[1:]) if v.shape[0] == 1 and n != 1 else v for k, v in self.items()})


def chat_messages(value: object) -> list[dict[str, str]] | None:
    """``value`` as chat messages (``[{"role": "user", "content": "…"}, …]``), or None when
    it is not a non-empty list of dicts at all (it may still be token ids).

    Raises:
        ForensicsError: a list of dicts that are not messages; the message names the first
            bad entry.
    """
    if not isinstance(value, list | tuple) or not value or not all(isinstance(m, dict) for m in value):
        return None
    messages: list[dict[str, str]] = []
    for i, message in enumerate(value):
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role or not isinstance(content, str):
            raise ForensicsError(
                f"chat message {i} is not {{'role': str, 'content': str}} (it has keys {sorted(map(str, message))}); "
                "give messages such as [{'role': 'user', 'content': 'Hello'}]"
            )
        messages.append({"role": role, "content": content})
    return messages


def token_ids(value: Any, vocab_size: int | None) -> torch.Tensor:
    """Token ids (T,) or (B, T) from a tensor or nested list of ints, checked: an integer
    dtype, 1 or 2 dimensions, at least one token, every id in ``0 .. vocab_size - 1``.

    Returns:
        A long tensor (B, T).
    Raises:
        ForensicsError: anything else, named.
    """
    if isinstance(value, torch.Tensor):
        ids = value
    else:
        try:
            ids = torch.tensor(value)
        except (TypeError, ValueError, RuntimeError):
            raise ForensicsError(
                "token ids must be a (B, T) list of ints or an integer tensor; got a ragged or non-numeric list"
            ) from None
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ForensicsError(f"token ids must be integers, got dtype {str(ids.dtype).removeprefix('torch.')}")
    if ids.dim() not in (1, 2) or ids.numel() == 0:
        raise ForensicsError(f"token ids must be (T,) or (B, T) with T ≥ 1, got shape {tuple(ids.shape)}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        bound = f"0 .. {vocab_size - 1}" if vocab_size is not None else "≥ 0"
        raise ForensicsError(f"token ids must be in {bound} (the model's vocabulary), got {low} .. {high}")
    ids = ids.long()
    return ids if ids.dim() == 2 else ids.unsqueeze(0)


MAX_PIXELS = 16 * 1024 * 1024  # values in one image input (C·H·W), whatever its source


def pixel_values(value: Any) -> torch.Tensor:
    """An image input (B = 1) from a tensor or nested list of numbers, checked: (H, W),
    (C, H, W) or (1, C, H, W), every value finite, at most :data:`MAX_PIXELS` values.

    Returns:
        A float32 tensor (1, C, H, W).
    Raises:
        ForensicsError: anything else, named.
    """
    if isinstance(value, torch.Tensor):
        pixels = value
    else:
        try:
            pixels = torch.tensor(value, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise ForensicsError(
                "pixel_values must be a (C, H, W) nested list of numbers or a float tensor; got a ragged or "
                "non-numeric list"
            ) from None
    if pixels.dtype == torch.bool or pixels.dtype.is_complex:
        raise ForensicsError(f"pixel_values must be real numbers, got dtype {str(pixels.dtype).removeprefix('torch.')}")
    if pixels.dim() not in (2, 3, 4) or (pixels.dim() == 4 and pixels.shape[0] != 1) or pixels.numel() == 0:
        raise ForensicsError(
            f"pixel_values must be one image (H, W), (C, H, W) or (1, C, H, W), got shape {tuple(pixels.shape)}"
        )
    if pixels.numel() > MAX_PIXELS:
        raise ForensicsError(f"pixel_values hold {pixels.numel()} values, over the limit of {MAX_PIXELS}")
    pixels = pixels.float()
    if not bool(torch.isfinite(pixels).all()):
        raise ForensicsError("pixel_values hold NaN or infinite values; give finite numbers")
    while pixels.dim() < 4:
        pixels = pixels.unsqueeze(0)
    return pixels


def last_logits_only(model: nn.Module, steps: int = 1) -> dict[str, int]:
    """``{"logits_to_keep": steps}`` when ``model.forward`` takes it, so that the model
    computes scores for the last ``steps`` positions only (the activations before them are
    the same); {} when it does not."""
    try:
        takes = "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes = False
    return {"logits_to_keep": steps} if takes else {}
