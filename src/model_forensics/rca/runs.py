"""Running a replay session's model: capturing sites (for CF, ranking, gates and directions),
the benign reference set, the incident's failing variants and which of them a set of
interventions flips."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch

from model_forensics.core.bundle import Bundle
from model_forensics.core.errors import BundleError, ForensicsError
from model_forensics.core.sites import block_index
from model_forensics.models.hooks import hooks
from model_forensics.models.inputs import GENERATE_KEYS, ModelInputs, last_logits_only
from model_forensics.rca.progress import Progress, silent
from model_forensics.recorder.hooks import RecorderHooks
from model_forensics.replay import Intervention, RunResult, Session

Inputs = dict[str, torch.Tensor]


def capture(
    session: Session,
    batch: Inputs,
    granularity: str = "head",
    sites: list[str] | None = None,
    only_sites: bool = False,
) -> dict[str, torch.Tensor]:
    """Every site of ``granularity`` for one input, batch dim dropped: (T, …) per site.

    Runs one forward pass of the prompt (no generation) inside the session's sandboxed,
    deterministic environment and counts it in ``session.forward_passes``. Nothing reads
    its scores, so the model computes them at the last position only where it can
    (``logits_to_keep``). With ``only_sites`` (the caller reads ``sites`` and nothing else)
    the pass ends after the last block they sit in (:func:`last_block`), and the sites after
    it are not recorded. Neither changes a recorded tensor.
    """
    if not session.adapter.n_layers:
        sites = None  # canonical selectors (blocks.*.attn.z) name nothing on a generic model
    through = last_block(sites) if only_sites and sites else None
    recorder = RecorderHooks(granularity=granularity, sites=sites, sketch="full", max_bundle_size_mb=1e9)
    with (
        session.environment(),
        recorder.install_hooks(session.model),
        torch.no_grad(),
        _ending_after(session, through),  # after the recorder's hooks, so its hook on the block runs first
    ):
        session.model(**{**last_logits_only(session.model), **batch})
    return {site: t[0] for site, t in recorder.recorded().items() if site != "final"}


def last_block(sites: Sequence[str]) -> int | None:
    """The last block ``sites`` sit in (None: one sits outside the blocks, or there are none)."""
    blocks = [block_index(site) for site in sites]
    return None if not blocks or None in blocks else max(b for b in blocks if b is not None)


class _Captured(Exception):
    """Ends a capture's forward pass after the last block it reads."""


@contextmanager
def _ending_after(session: Session, block: int | None) -> Iterator[None]:
    """Raise :class:`_Captured` once block ``block`` has run, and swallow it (no block, or
    one the adapter has no output point for: the pass runs to its end)."""
    point = session.adapter.points.get(f"blocks.{block}.resid_post") if block is not None else None
    if point is None or point.io != "output":
        yield
        return

    def end(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        raise _Captured

    with hooks(session.adapter, after={point.module: end}), suppress(_Captured):
        yield


def bundle_inputs(session: Session, bundles: Sequence[str | Path]) -> list[Inputs]:
    """The recorded inputs of baseline bundles, each checked to come from the incident's model.

    Raises:
        BundleError: a path is a prompt file, or a bundle was recorded with other weights.
    """
    found: list[Inputs] = []
    mine = session.manifest["model"]["weights_sha256"]
    for path in bundles:
        if Path(path).suffix.lower() in (".jsonl", ".json", ".txt"):
            raise BundleError(
                f"baseline bundle '{path}' is a prompt file, not a bundle; store clean prompts in the incident "
                f"(model-forensics record ... --baseline {Path(path).name}) or pass bundles recorded on the incident's model"
            )
        other = Bundle.open(path)
        theirs = other.manifest["model"]["weights_sha256"]
        if theirs != mine:
            raise BundleError(
                f"baseline bundle '{path}' was recorded with model {other.manifest['model']['name']} "
                f"(weights {theirs[:12]}…), the incident with {session.manifest['model']['name']} ({mine[:12]}…); "
                "record the baseline with the incident's model"
            )
        # token models: what the prompt encoded to (ids, mask, types; generate() adds the
        # rest); other models (images: pixel_values (1, C, H, W)): every recorded input.
        recorded = dict(other.inputs)
        found.append(session.encode({k: v for k, v in recorded.items() if k in GENERATE_KEYS} or recorded))
    return found


def add_baseline_bundles(session: Session, bundles: Sequence[str | Path]) -> None:
    """Add baseline bundles' inputs to the session's baseline set, so that ``mean``,
    ``resample`` and ``patch`` ablations (and every analysis reading the set) use them."""
    extra = bundle_inputs(session, bundles)
    if extra:
        session.set_baseline([*session.baselines, *extra])


def baseline_inputs(session: Session, bundles: Sequence[str | Path] = (), limit: int | None = None) -> list[Inputs]:
    """The benign reference set: the session's benign prompts and clean baselines, plus the
    inputs of any baseline bundles (which must come from the same model).

    Raises:
        BundleError: a baseline bundle was recorded with other weights.
    """
    found: list[Inputs] = [*session.benign(), *session.baselines, *bundle_inputs(session, bundles)]
    if not found:
        raise ForensicsError(
            "no benign baseline: the bundle carries no extras.benign / extras.baseline prompts and no --baseline "
            "bundle was given; record baselines (model-forensics scenarios run, or record clean prompts) and pass them"
        )
    return found[:limit] if limit else found


def failing_variants(
    session: Session,
    progress: Progress = silent,
    clean_runs: Callable[[Session, list[ModelInputs]], list[RunResult]] | None = None,
) -> list[Inputs]:
    """The incident's variants on which the model fails (the incident first), one clean run
    each (``progress``: ("failing variants", done, variants)): batched sweeps stopped once
    the verdicts are settled, or ``clean_runs(session, variants)`` where given (the full
    clean runs the caller keeps for other uses: :func:`~model_forensics.rca.flips.clean_runs`).

    Raises:
        ForensicsError: the bundle has no predicate, or nothing fails (nothing to fix).
    """
    if session.predicate is None:
        raise ForensicsError(
            "the bundle has no failure predicate, so there is nothing to fix; record one with --predicate"
        )
    variants = session.variants()
    fails = [False] * len(variants)
    if clean_runs is not None:
        progress("failing variants", 0, len(variants))
        fails = [bool(run.failed) for run in clean_runs(session, variants)]
    else:
        for done, (i, swept) in enumerate(session.sweep_each(variants, [[]], verdicts_only=True)):
            progress("failing variants", done, len(variants))
            fails[i] = bool(swept[0].failed)
    progress("failing variants", len(variants), len(variants))
    failing: list[Inputs] = [v for v, fails_here in zip(variants, fails, strict=True) if fails_here]
    if not failing:
        raise ForensicsError("the model does not fail on this incident (the predicate does not hold): nothing to fix")
    return failing


def flip_table(
    session: Session,
    variants: Sequence[Inputs],
    sets: Sequence[Sequence[Intervention]],
    tick: Callable[[int, int], None] | None = None,
) -> list[list[bool]]:
    """flips[set][variant]: whether each intervention set removes the failure on each
    variant, from batched sweeps (:meth:`Session.sweep_each`; ``tick(variants done, variants)``
    after each)."""
    return by_set(flips_each(session, [(v, sets) for v in variants], tick), len(sets))


def by_set(per_variant: Sequence[Sequence[bool]], n_sets: int) -> list[list[bool]]:
    """flips[variant][set] turned into flips[set][variant] (``n_sets`` sets, whatever the variants)."""
    return [[flips[i] for flips in per_variant] for i in range(n_sets)]


def flips_each(
    session: Session,
    work: Sequence[tuple[Inputs, Sequence[Sequence[Intervention]]]],
    tick: Callable[[int, int], None] | None = None,
) -> list[list[bool]]:
    """flips[variant][set] for (variant, its own sets) pairs: whether each set removes the
    failure on its variant, the variants' sweeps batched together where they are small
    (:meth:`Session.sweep_each` with ``per_prompt``; ``tick(variants done, variants)``)."""
    flips = [[False] * len(sets) for _, sets in work]
    swept = session.sweep_each([v for v, _ in work], [s for _, s in work], verdicts_only=True, per_prompt=True)
    for done, (v, results) in enumerate(swept, 1):
        flips[v] = [not result.failed for result in results]
        if tick is not None:
            tick(done, len(work))
    return flips


def flip_rate(flips: Sequence[bool]) -> float:
    """The fraction of variants flipped."""
    return sum(flips) / len(flips)
