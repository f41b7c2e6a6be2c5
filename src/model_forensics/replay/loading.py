"""Opening a bundle for replay: :class:`SandboxReplayer` and the model it replays with.

``SandboxReplayer(config).load_bundle(path)`` opens the bundle, resolves its model
(:func:`resolve_model`: the manifest's reference, loaded with the recorded dtype and
attention implementation, or an override) and returns a :class:`Session`, which checks
the weights against the recording's sha256.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model_forensics.core.bundle import Bundle
from model_forensics.core.config import ForensicsConfig, ReplayConfig, load_config
from model_forensics.core.errors import BundleError, ForensicsError, ModelLoadError
from model_forensics.core.manifest import attn_implementation, bundle_relative
from model_forensics.models import loading as model_loading
from model_forensics.models.loading import LoadedModel, model_ref
from model_forensics.replay.session import Session

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


class SandboxReplayer:
    """Opens incident bundles as replay :class:`Session`\\ s.

    Args:
        config: YAML path, :class:`ForensicsConfig`, mapping, or None for defaults
            (its ``replay`` section: seed, deterministic, max_batch_size, memory_budget_mb,
            allow_network, allow_subprocess).
        **overrides: any ``replay`` option, e.g. ``max_batch_size=32``, ``allow_network=True``.
    """

    def __init__(self, config: str | Path | ForensicsConfig | dict[str, Any] | None = None, **overrides: Any):
        base = load_config(config).replay
        unknown = sorted(set(overrides) - set(ReplayConfig.model_fields))
        if unknown:
            raise ForensicsError(f"unknown replay options {unknown}; known: {sorted(ReplayConfig.model_fields)}")
        self.config = ReplayConfig.model_validate(
            {**base.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
        )

    def load_bundle(
        self,
        path: str | Path | Bundle,
        *,
        model: str | nn.Module | LoadedModel | None = None,
        tokenizer: Any = None,
        allow_weight_mismatch: bool = False,
        verify: bool = False,
    ) -> Session:
        """Open a bundle and load its model, ready to replay.

        Args:
            path: bundle directory, ``.mfb.zip`` or an opened :class:`Bundle`.
            model: override the manifest's model: a reference (``smollm2``, ``zoo:NAME``,
                a directory, a .gguf), an ``nn.Module`` or a :class:`LoadedModel`.
            tokenizer: tokenizer for an ``nn.Module`` override (for text outputs).
            allow_weight_mismatch: replay even if the weights sha256 differs from the
                recording (warns loudly; results are then not a faithful replay).
            verify: run :meth:`Session.verify` now and warn if it is not bit-identical.
        Raises:
            BundleError: unreadable bundle, newer format, failed checksums, or weights that
                differ from the recording (without ``allow_weight_mismatch``).
            ModelLoadError: the model cannot be found; pass ``model=``.
        Warns:
            WeightMismatchWarning: the weights differ and ``allow_weight_mismatch`` is set.
        """
        bundle = path if isinstance(path, Bundle) else Bundle.open(path)
        loaded = resolve_model(bundle, model, tokenizer)
        session = Session(bundle, loaded, self.config, allow_weight_mismatch=allow_weight_mismatch)
        if verify:
            report = session.verify()
            if not report.bit_identical:
                warnings.warn(f"replay of '{bundle.name}' is {report.summary()}", stacklevel=2)
        return session


def resolve_model(bundle: Bundle, override: str | nn.Module | LoadedModel | None, tokenizer: Any) -> LoadedModel:
    """The model to replay ``bundle`` with: ``override`` (a reference, an ``nn.Module`` with
    ``tokenizer``, or a :class:`LoadedModel`), else the manifest's model reference.

    Raises:
        ModelLoadError: the model cannot be found (the message says to pass ``model=``).
        BundleError: the manifest names a model inside the bundle itself.
    """
    info = bundle.manifest["model"]
    if isinstance(override, LoadedModel):
        return override
    if isinstance(override, nn.Module):
        return LoadedModel(override.eval(), tokenizer, model_ref(override))
    dtype = DTYPES.get(str(info.get("dtype")), torch.float32)
    attn = attn_implementation(bundle.manifest)
    # Loads go through the module attribute, so a test (or an embedding tool) that replaces
    # models.loading.load sees replay's loads too.
    if isinstance(override, str):
        return model_loading.load(override, dtype=dtype, attn_implementation=attn, progress=False)
    reference = info.get("reference")
    if not reference:
        raise ModelLoadError(
            f"bundle '{bundle.name}' was recorded from an in-memory model ({info.get('class')}) with no reference to "
            "load it from; pass the model: load_bundle(path, model=...) or --model PATH"
        )
    if info.get("source") != "zoo" and bundle_relative(str(reference), bundle.source):
        raise BundleError(
            f"bundle '{bundle.name}' names a model inside the bundle itself ({reference!r}); a bundle may not ship "
            "the model it is replayed with. Pass the model you trust: --model / model="
        )
    if info.get("source") == "zoo" and not str(reference).startswith("zoo:"):
        reference = f"zoo:{reference}"
    try:
        return model_loading.load(str(reference), dtype=dtype, attn_implementation=attn, progress=False)
    except ModelLoadError as exc:
        raise ModelLoadError(
            f"cannot load the model bundle '{bundle.name}' was recorded with: {exc}; pass --model / model= to choose one"
        ) from None
