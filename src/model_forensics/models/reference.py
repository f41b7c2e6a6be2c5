"""What a loaded model is and where it came from.

A :class:`LoadedModel` is a model, its tokenizer and the :class:`ModelRef` that obtains
it again. Every loader (packaged, zoo, local directory, GGUF) tags the model it creates
with its reference (:func:`tag_model`), so :func:`model_ref` can name the model later,
in a bundle manifest or a replay; :func:`weights_sha256` identifies its exact weights.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from model_forensics.core.errors import ModelLoadError

_TAG = "_forensics_ref"


@dataclass(frozen=True)
class ModelRef:
    """How a model was obtained, so a replay can obtain it again."""

    name: str
    source: str  # "zoo" | "local" | "gguf" | "module"
    reference: str | None
    revision: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    """A model, its tokenizer (None for models fed tensors, such as the zoo's image
    classifier) and the reference that loads it again."""

    model: nn.Module
    tokenizer: Any
    ref: ModelRef


def tag_model(model: nn.Module, ref: ModelRef) -> None:
    """Record on ``model`` the reference it was loaded from (read back by :func:`model_ref`).

    Only loaders call this, on models they created; foreign models are never touched.
    """
    object.__setattr__(model, _TAG, ref)


def model_ref(model: nn.Module) -> ModelRef:
    """The reference a model was loaded from, or a ``module`` reference for foreign models."""
    ref = getattr(model, _TAG, None)
    if isinstance(ref, ModelRef):
        return ref
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    return ModelRef(name=str(name), source="module", reference=None)


def weights_sha256(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, exact bytes). Layers that
    accelerate keeps on disk (``device_map`` with offload) are read from the offload, one
    tensor at a time, so the digest is the one the same weights give loaded whole."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = (_offloaded(model, name) if tensor.is_meta else tensor).detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _offloaded(model: nn.Module, name: str) -> torch.Tensor:
    """The tensor accelerate keeps on disk for the state-dict entry ``name``: looked up in the
    weights map of the nearest module above it that holds one."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        module = model.get_submodule(".".join(parts[:depth]))
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or [hook]:
            weights = getattr(h, "weights_map", None)
            key = ".".join(parts[depth:])
            if weights is not None and key in weights:
                return torch.as_tensor(weights[key])
    raise ModelLoadError(f"weight '{name}' is offloaded but accelerate's offload does not hold it")
