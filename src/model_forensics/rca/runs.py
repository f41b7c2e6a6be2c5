"""Running a replay session's model on inputs while capturing sites (for CF and ranking)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from model_forensics.core.bundle import Bundle
from model_forensics.core.errors import BundleError, ForensicsError
from model_forensics.recorder.hooks import RecorderHooks

Inputs = dict[str, torch.Tensor]


def capture(
    session: Any, batch: Inputs, granularity: str = "head", sites: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """Every site of ``granularity`` for one input, batch dim dropped: (T, …) per site.

    Runs one forward pass of the prompt (no generation) inside the session's sandboxed,
    deterministic environment and counts it in ``session.forward_passes``.
    """
    recorder = RecorderHooks(granularity=granularity, sites=sites, sketch="full", max_bundle_size_mb=1e9)
    with session.environment(), recorder.install_hooks(session.model), torch.no_grad():
        session.model(**batch)
    session.forward_passes += 1
    return {site: t[0] for site, t in recorder.recorded().items() if site != "final"}


def baseline_inputs(session: Any, bundles: Sequence[str | Path] = (), limit: int | None = None) -> list[Inputs]:
    """The benign reference set: the session's benign prompts and clean baselines, plus the
    inputs of any baseline bundles (which must come from the same model).

    Raises:
        BundleError: a baseline bundle was recorded with other weights.
    """
    found = list(session.benign()) + list(session.baselines)
    mine = session.manifest["model"]["weights_sha256"]
    for path in bundles:
        other = Bundle.open(path)
        theirs = other.manifest["model"]["weights_sha256"]
        if theirs != mine:
            raise BundleError(
                f"baseline bundle '{path}' was recorded with model {other.manifest['model']['name']} "
                f"(weights {theirs[:12]}…), the incident with {session.manifest['model']['name']} ({mine[:12]}…); "
                "record the baseline with the incident's model"
            )
        found.append(
            session.encode(
                {k: v for k, v in other.inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            )
        )
    if not found:
        raise ForensicsError(
            "no benign baseline: the bundle carries no extras.benign / extras.baseline prompts and no --baseline "
            "bundle was given; record baselines (model-forensics scenarios run, or record clean prompts) and pass them"
        )
    return found[:limit] if limit else found
