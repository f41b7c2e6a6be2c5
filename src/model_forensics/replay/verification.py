"""Verification: does the replay compute what the recording did, bit for bit?

:func:`verify` replays the incident unchanged with the recorder's hooks on the recorded
sites and compares, by digest of the exact tensors under the bundle's ``hash`` (blake3 from
format 1.3, sha256 before): every recorded site, the full logits
of every forward call (one per generation step), the generated ids, and the manifest's
recorded verdict (``output.text`` and ``predicate.holds``) against the replay's own.
When ``replay.threads`` differs from the recorded thread count, the report's notes say so
and whether bit-identity held at the chosen count (reductions split across threads may
round differently; see docs/replay.md, "Threads").
:func:`check_weights` compares the model's weights sha256 with the recording's first.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from model_forensics.core.bundle import Bundle
from model_forensics.core.digests import tensor_digest
from model_forensics.core.errors import BundleError, WeightMismatchWarning
from model_forensics.core.provenance import package_versions
from model_forensics.models.loading import weights_sha256
from model_forensics.recorder.hooks import RecorderHooks
from model_forensics.replay.results import SiteCheck, VerifyReport

if TYPE_CHECKING:
    from model_forensics.replay.session import Session


def check_weights(bundle: Bundle, model: nn.Module, allow: bool) -> bool:
    """Whether ``model``'s weights differ from the recording's (only possible with ``allow``).

    Raises:
        BundleError: they differ and ``allow`` is False.
    Warns:
        WeightMismatchWarning: they differ and ``allow`` is True.
    """
    recorded = bundle.manifest["model"].get("weights_sha256")
    actual = weights_sha256(model)
    if not recorded or actual == recorded:
        return False
    message = (
        f"the model's weights (sha256 {actual[:12]}…) differ from those bundle '{bundle.name}' was recorded "
        f"with (sha256 {recorded[:12]}…)"
    )
    if not allow:
        raise BundleError(
            message + "; pass the model it was recorded with, or allow_weight_mismatch=True "
            "(--allow-weight-mismatch) to replay anyway (results will not be a faithful replay)"
        )
    warnings.warn(
        "WEIGHT MISMATCH: " + message + "; replaying anyway, results are NOT a faithful replay",
        WeightMismatchWarning,
        stacklevel=3,
    )
    return True


def verify(session: Session) -> VerifyReport:
    """Replay ``session``'s incident unchanged, recording the same sites, and compare the
    digest (the bundle's ``hash``) of every recorded site's exact tensor and of the outputs
    with the recording.

    Returns:
        A :class:`VerifyReport`; ``bit_identical`` is True when every hash matches.
    """
    start = time.perf_counter()
    passes = session.forward_passes
    manifest = session.manifest
    rec = RecorderHooks(
        granularity=manifest["recorder"].get("granularity", "layer"),
        sites=list(manifest["sites"]),
        sketch="full",
        max_bundle_size_mb=1e12,
    )
    recording = rec.install_hooks(session.model, session.tokenizer)
    with session.environment(), recording:
        if session.mode == "generate":
            sequences = rec.generate(session.inputs, **session.generation)
        else:
            session.model(**session.inputs, **session.kwargs)
            sequences = None
    full_logits = rec.logits()  # per forward call: the model's whole output scores, kept by the recorder
    replayed = rec.recorded()
    sites = [_check_site(session.bundle, site, info, replayed.get(site)) for site, info in manifest["sites"].items()]
    outputs = _check_outputs(session.bundle, full_logits, sequences)
    verdict = _check_verdict(session, full_logits, sequences)
    identical = all(c.identical for c in sites + outputs + verdict)
    notes = _environment_notes(manifest, session.weight_mismatch)
    notes += _thread_notes(session, identical)
    seconds = time.perf_counter() - start
    return VerifyReport(identical, sites, outputs, session.forward_passes - passes, seconds, notes, verdict)


def _check_site(bundle: Bundle, site: str, info: dict[str, Any], tensor: torch.Tensor | None) -> SiteCheck:
    if tensor is None:
        return SiteCheck(site, False, info["sha256"], None, note="the replay did not produce this site")
    digest = tensor_digest(tensor, bundle.hash)
    if digest == info["sha256"]:
        return SiteCheck(site, True, info["sha256"], digest)
    if list(tensor.shape) != list(info["shape"]):
        return SiteCheck(
            site, False, info["sha256"], digest, note=f"shape {list(tensor.shape)} vs recorded {info['shape']}"
        )
    stored = bundle.activation(site)
    diff = float((tensor.double() - stored.double()).abs().max())
    note = "" if info["sketch"] == "full" else f"max |Δ| measured against the {info['sketch']} sketch (approximate)"
    return SiteCheck(site, False, info["sha256"], digest, diff, note)


def _check_outputs(bundle: Bundle, full_logits: list[torch.Tensor], sequences: torch.Tensor | None) -> list[SiteCheck]:
    out = bundle.manifest["output"]
    checks: list[SiteCheck] = []
    stored = bundle.outputs.get("logits")
    expected = [out.get("logits_sha256"), *(out.get("step_logits_sha256") or [])]
    if expected[0] is None:
        return checks
    for step, digest in enumerate(expected):
        name = "logits" if step == 0 else f"logits[step {step}]"
        if step >= len(full_logits):
            checks.append(SiteCheck(name, False, digest, None, note="the replay made fewer forward calls"))
            continue
        got = full_logits[step]
        mine = tensor_digest(got, bundle.hash)
        diff = None
        if mine != digest and stored is not None:
            last = got[:, -1] if got.dim() == 3 else got
            ref = stored[:, step] if stored.dim() == 3 else stored
            if last.shape == ref.shape:
                diff = float((last.double() - ref.double()).abs().max())
        checks.append(SiteCheck(name, mine == digest, digest, mine, diff))
    if len(full_logits) > len(expected):
        extra = f"{len(full_logits) - len(expected)} more forward calls than recorded"
        checks.append(SiteCheck("logits[extra steps]", False, None, None, note=extra))
    if sequences is not None and "generated_ids" in bundle.outputs:
        rec_ids = bundle.outputs["generated_ids"]
        same = rec_ids.shape == sequences.shape and torch.equal(rec_ids, sequences)
        digests = tensor_digest(rec_ids, bundle.hash), tensor_digest(sequences, bundle.hash)
        checks.append(SiteCheck("generated_ids", same, *digests))
    return checks


def _check_verdict(
    session: Session, full_logits: list[torch.Tensor], sequences: torch.Tensor | None
) -> list[SiteCheck]:
    """The manifest's ``output.text`` and ``predicate.holds`` against the replay's own: a
    bundle whose stored verdict was edited does not replay bit-identical."""
    if not full_logits:
        return []
    # (S, V) last-position scores of row 0 per call
    steps = torch.stack([(out[:, -1] if out.dim() == 3 else out)[0] for out in full_logits])
    sequence = None if sequences is None else sequences[0]
    text = session.readout.outcome(session.inputs.length, steps, sequence).text
    checks = []
    recorded_text = session.manifest["output"].get("text")
    if recorded_text is not None and text is not None:
        checks.append(SiteCheck("output.text", text == recorded_text, None, None, note=f"replayed {text!r:.80}"))
    holds = (session.manifest.get("predicate") or {}).get("holds")
    replayed = session.readout.failed(text, steps[-1])
    if holds is not None and replayed is not None:
        note = f"replay: {replayed}, manifest: {holds}"
        checks.append(SiteCheck("predicate.holds", replayed == holds, None, None, note=note))
    return checks


def thread_counts(session: Session) -> tuple[int | None, int]:
    """(recorded, replayed) CPU thread counts of ``session``'s replays."""
    env = session._environment
    return env.recorded_threads, env.effective_threads


def _thread_notes(session: Session, identical: bool) -> list[str]:
    """Say at which thread count the replay ran and whether bit-identity held there."""
    recorded, replayed = thread_counts(session)
    if recorded is None or recorded == replayed:
        return []
    held = "holds" if identical else "does NOT hold"
    hint = "" if identical else f"; replay at the recorded count (--threads {recorded}) for a faithful replay"
    return [f"replayed at {replayed} threads (recorded at {recorded}): bit-identity {held} at this count{hint}"]


def _environment_notes(manifest: dict[str, Any], weight_mismatch: bool) -> list[str]:
    notes = []
    prov = manifest.get("provenance") or {}
    now = package_versions()
    for name, version in (prov.get("package_versions") or {}).items():
        if name in now and now[name] != version:
            notes.append(f"{name} {now[name]} now, {version} when recorded")
    recorded_threads = ((manifest.get("determinism") or {}).get("torch") or {}).get("num_threads")
    if recorded_threads and recorded_threads > (os.cpu_count() or 1):
        notes.append(f"recorded with {recorded_threads} threads; this machine has {os.cpu_count()} CPUs")
    if weight_mismatch:
        notes.append("weights differ from the recording (allow_weight_mismatch)")
    return notes
