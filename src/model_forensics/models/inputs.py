"""ModelInputs: the tensors a model is called with, and the few questions asked of them.

A ``dict[str, Tensor]`` (so ``model(**inputs)`` and ``inputs["input_ids"]`` keep working)
that knows its prompt length, its cache key and the subset ``generate()`` takes::

    inputs = ModelInputs.of_ids(torch.tensor([[5, 9, 3]]))   # input_ids (1, 3) + attention_mask
    inputs.length, inputs.key                                # 3, (5, 9, 3)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

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
    def length(self) -> int:
        """Tokens per row (T of ``input_ids``; 0 when there are no ids)."""
        return int(self["input_ids"].shape[1]) if "input_ids" in self else 0

    @property
    def key(self) -> tuple[int, ...]:
        """A cache key: the token ids of row 0 (empty without ids)."""
        return tuple(self["input_ids"][0].tolist()) if "input_ids" in self else ()

    def for_generation(self) -> ModelInputs:
        """What ``model.generate`` takes: ids, mask (all ones when missing), token types.
        generate() derives positions itself; its first step sees the prompt only."""
        out = ModelInputs({k: v for k, v in self.items() if k in GENERATE_KEYS})
        if "attention_mask" not in out and "input_ids" in out:
            out["attention_mask"] = torch.ones_like(out["input_ids"])
        return out

    def expand(self, n: int) -> ModelInputs:
        """Row 0 repeated ``n`` times (a view; rows of a batch of one)."""
        return ModelInputs({k: v.expand(n, *v.shape[1:]) if v.shape[0] == 1 and n != 1 else v for k, v in self.items()})
