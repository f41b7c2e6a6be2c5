"""The analysis pipelines behind ``analyze``, ``batch`` and ``triage``.

``analyze_bundle``: replay → CF → attribution ranking → CausalCCA → a JSON-able result.
Triage (``search=False``) is cheap — CF + attribution only, no fix-set search; incidents
whose top root-cause sites overlap (Jaccard ≥ 0.4 of their top-5 attributed sites) are
grouped, and groups are ranked by severity = the largest CF anomaly score (robust z) of
any member. Both map over bundles with a local process pool or, with ``ray``, Ray tasks (one
task per bundle); every worker loads its own model, so results equal the serial ones. With
``results_dir``, each result is written there as it finishes (one JSON per bundle, written
atomically), and ``resume`` reads those back instead of recomputing them.
"""

from __future__ import annotations

import concurrent.futures as cf_futures
import json
import multiprocessing
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_forensics.core.bundle import MANIFEST
from model_forensics.core.distributed import map_tasks
from model_forensics.core.errors import ForensicsError
from model_forensics.core.files import write_text_atomic
from model_forensics.core.records import fields_json
from model_forensics.core.workers import worker_environment
from model_forensics.rca.conversation import conversation_findings
from model_forensics.rca.explain import ranker_choice
from model_forensics.rca.heldout import PartFigures, PromptSplit, evaluate, held_out_notes, searching, split_prompts
from model_forensics.rca.notes import distinct
from model_forensics.rca.progress import Progress, silent, step
from model_forensics.rca.runs import add_baseline_bundles

if TYPE_CHECKING:
    from model_forensics.core.config import CCAConfig
    from model_forensics.rca.cca import FixSet
    from model_forensics.rca.stepgate import StepGateFix
    from model_forensics.replay import Session


@dataclass
class Analysis:
    bundle: str
    anomalies: dict[str, Any]
    ranking: dict[str, Any]
    fix_set: dict[str, Any] | None
    forward_passes: int
    seconds: float
    # what happened: prompt, output, predicate, model, variants and benign prompts carried
    incident: dict[str, Any] = field(default_factory=dict)
    # a conversation bundle: which turn the failure and the fix belong to (rca/conversation.py)
    conversation: dict[str, Any] | None = None
    # the CF ranker used (modules.cf.ranker, ``auto`` resolved) and the configured value
    cf_ranker: dict[str, str] = field(default_factory=dict)
    # the --baseline bundles added to the search part's baselines (what mean ablations were fitted on)
    baseline_bundles: list[str] = field(default_factory=list)
    # a step-gated steering fix (rca/stepgate.py), tried when the unit fix does not hold
    step_gate: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return fields_json(self)


def analyze_bundle(
    path: str | Path,
    *,
    model: str | None = None,
    baseline: Sequence[str | Path] = (),
    config: str | Path | None = None,
    search: bool = True,
    strategy: str | None = None,
    directions: str | None = None,
    gating: str | None = None,
    step_gate: str | None = None,
    progress: Progress | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> Analysis:
    """Full root-cause analysis of one bundle (``search=False``: triage only, no CCA;
    ``strategy``, ``directions``, ``gating``, ``step_gate``: override the config's
    ``modules.cca`` values, see :class:`~model_forensics.rca.cca.CausalCCA` and
    :mod:`~model_forensics.rca.stepgate`; ``device``, ``dtype``: where and in
    which dtype to replay, see :meth:`~model_forensics.replay.SandboxReplayer.load_bundle`).
    ``progress(phase, done, total)`` is called as each phase advances
    (:mod:`~model_forensics.rca.progress` lists the phases)."""
    from model_forensics.core.config import load_config
    from model_forensics.rca.attribution import attribution_ranking
    from model_forensics.rca.cca import CausalCCA
    from model_forensics.rca.compression import CompressionForensics
    from model_forensics.replay import SandboxReplayer

    report = progress or silent
    # bad options fail before any work
    settings = load_config(config)
    cca = CausalCCA(settings, search_strategy=strategy, directions=directions, gating=gating, step_gate=step_gate)
    start = time.perf_counter()
    replayed = step(report, "replay")
    session = SandboxReplayer(settings).load_bundle(path, model=model, device=device, dtype=dtype)
    replayed()
    if session.predicate is None:
        raise ForensicsError(f"bundle '{path}' has no failure predicate; there is nothing to analyse")
    if not session.recorded_failed:
        raise NothingToFix(f"bundle '{path}': the predicate does not hold on the recorded output; nothing to fix")
    fraction = cca.config.held_out_fraction if search else 0.0
    split = split_prompts(session.extras, fraction, cca.config.split_seed)
    # Everything below is fitted on the search part; the held-out part is only measured.
    with searching(session, split) if fraction else nullcontext():
        add_baseline_bundles(session, baseline)  # checked; mean ablations read them from here on
        anomalies = CompressionForensics(settings).analyze(session, progress=report)
        ranking = attribution_ranking(session, progress=report, positions=cca.config.positions)
        fix, stepped = None, None
        if search:
            fix = cca.search_fix_set(session, guided_by=anomalies, ranking=ranking, progress=report)
            if fraction:
                add_held_out(session, fix, split, cca.config, report)
            stepped = add_step_gate(session, fix, split, cca.config, report)
        findings = conversation_findings(session, [] if fix is None else fix.interventions, report)
    ranking_json = ranking.to_json()
    ranking_json["units"] = ranking_json["units"][:200]
    return Analysis(
        bundle=str(path),
        anomalies=anomalies.to_json(),
        ranking=ranking_json,
        fix_set=None if fix is None else fix.to_json(),
        forward_passes=session.forward_passes,
        seconds=time.perf_counter() - start,
        incident=incident_recap(session),
        conversation=findings,
        cf_ranker=cf_ranker(anomalies.ranker, settings.modules.cf.ranker),
        baseline_bundles=[str(b) for b in baseline],
        step_gate=None if stepped is None else stepped.to_json(),
    )


def cf_ranker(used: str, configured: str) -> dict[str, str]:
    """The CF ranker of an analysis: the one used, the configured value, and why."""
    return {"used": used, "configured": configured, "why": ranker_choice(used, configured)}


def add_held_out(session: Session, fix: FixSet, split: PromptSplit, config: CCAConfig, progress: Progress) -> None:
    """Measure ``fix`` on the held-out part of ``split`` (inside :func:`searching`) and
    record it in ``fix``: ``held_out``, notes, and ``reached_threshold`` decided by the
    held-out flip rate when failing variants were held out."""
    search = PartFigures(len(fix.flips), fix.total_flip_rate, list(fix.flips), fix.side_effects, None)
    held = evaluate(
        session, fix.interventions, split, search, config.max_side_effect_kl, config.max_accuracy_drop, progress
    )
    fix.held_out = held
    if held.flip_rate is not None:
        fix.reached_threshold = held.flip_rate >= config.early_stop_threshold
    threshold, rate = config.early_stop_threshold, fix.total_flip_rate
    fix.note_records = distinct([*fix.note_records, *held_out_notes(held, threshold, rate)])


def add_step_gate(
    session: Session, fix: FixSet | None, split: PromptSplit, config: CCAConfig, progress: Progress
) -> StepGateFix | None:
    """The step-gated steering fix (:mod:`~model_forensics.rca.stepgate`), fitted on the
    search part (inside :func:`searching`) and measured on the held-out part: with
    ``step_gate="always"``, or ``"auto"`` when the unit fix does not hold; None when it is not
    tried (a note on ``fix`` says why when it was asked for but cannot run)."""
    from model_forensics.rca.notes import Note
    from model_forensics.rca.stepgate import applies, fit_step_gate, unit_fix_holds

    holds = unit_fix_holds(fix)
    if config.step_gate == "never" or (config.step_gate == "auto" and holds):
        return None
    why = applies(session)
    found = None if why else fit_step_gate(session, config, progress)
    if found is None:
        if config.step_gate == "always" and fix is not None:
            note = Note("step_gate_not_applicable", {"why": why}) if why else Note("step_gate_no_fit")
            fix.note_records = distinct([*fix.note_records, note])
        return None
    if split.fraction:
        pick = found.search
        search = PartFigures(len(pick.flips), pick.failing_flipped, list(pick.flips), None, None)
        found.held_out = evaluate(
            session,
            found.interventions,
            split,
            search,
            config.max_side_effect_kl,
            config.max_accuracy_drop,
            progress,
            search_near_misses=False,
        )
    found.decide(config)
    if holds:
        found.reason = "asked"
    return found


def incident_recap(session: Session) -> dict[str, Any]:
    """What the incident was, from the bundle (strings as recorded: hostile until rendered
    safely): prompt, output, predicate, mode, model, and how many variants, benign prompts
    and clean baselines the bundle carries."""
    manifest, extras, predicate = session.manifest, session.extras, session.predicate
    return {
        "prompt": manifest["input"].get("text"),
        "output": manifest["output"].get("text"),
        "prediction": manifest["output"].get("prediction"),
        "predicate": None if predicate is None else predicate.describe(),
        "predicate_spec": None if predicate is None else predicate.to_json(),
        "mode": session.mode,
        "model": manifest["model"].get("name"),
        "variants": len(extras.get("variants") or []),
        "benign": len(extras.get("benign") or []),
        "baselines": len(extras.get("baseline") or []),
        "near_misses": len(extras.get("near_miss") or []),
    }


class NothingToFix(ForensicsError):
    """The incident does not fail; analysis has nothing to find (CLI exit code 1)."""


def find_bundles(directory: str | Path) -> list[Path]:
    """Bundle directories and .mfb.zip files directly under ``directory`` (or it, if one)."""
    root = Path(directory)
    if not root.is_dir():
        raise ForensicsError(f"'{root}' is not a directory of bundles")
    if (root / MANIFEST).is_file():
        return [root]
    found = sorted(p for p in root.iterdir() if (p / MANIFEST).is_file() or p.name.endswith(".mfb.zip"))
    if not found:
        raise ForensicsError(f"'{root}' holds no bundles (directories with manifest.json or .mfb.zip files)")
    return found


@dataclass
class BatchReport:
    """What ``run_many`` found: the results (in bundle order), the bundles skipped with their
    error, incident groups, and which results were read back from ``results_dir`` (resume)
    rather than computed."""

    results: list[dict[str, Any]]
    skipped: list[dict[str, str]] = field(default_factory=list)
    groups: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    backend: str = "process-pool"
    computed: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return fields_json(self)


Job = tuple[str, str | None, str | None, bool]
RESULT_FORMAT = "model-forensics-batch-result"


def _work(job: Job) -> dict[str, Any]:
    path, model, config, search = job
    try:
        return {"ok": True, **analyze_bundle(path, model=model, config=config, search=search).to_json()}
    except ForensicsError as exc:
        return {"ok": False, "bundle": path, "error": str(exc)}


def result_path(results_dir: Path, bundle: str | Path) -> Path:
    """Where ``run_many`` keeps one bundle's result: ``results_dir/NAME.json``."""
    return Path(results_dir) / f"{Path(bundle).name}.json"


def _job_json(job: Job) -> dict[str, Any]:
    path, model, config, search = job
    return {"bundle": path, "model": model, "config": config, "search": search}


def _write_result(results_dir: Path, job: Job, result: dict[str, Any]) -> None:
    """One finished result, atomically (a kill leaves the old file or the new, never half)."""
    write_json_atomic(result_path(results_dir, job[0]), {"format": RESULT_FORMAT, "job": _job_json(job), **result})


def _read_result(results_dir: Path, job: Job) -> dict[str, Any] | None:
    """A result written by an earlier run of the same job (bundle, model, config, search), or
    None: missing, unreadable, from another job, or not a finished analysis."""
    try:
        data = json.loads(result_path(results_dir, job[0]).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("format") != RESULT_FORMAT or data.get("job") != _job_json(job):
        return None
    if data.get("ok") is not True or not {"anomalies", "ranking", "fix_set"} <= set(data):
        return None
    return {k: v for k, v in data.items() if k not in ("format", "job")}


def write_json_atomic(path: Path, value: Any) -> None:
    """Write ``value`` as JSON to ``path`` through a temporary sibling, fsynced and renamed,
    with the permissions the umask gives a new file."""
    write_text_atomic(path, json.dumps(value, indent=1))


def run_many(
    paths: Sequence[Path],
    *,
    model: str | None = None,
    config: str | None = None,
    search: bool = True,
    workers: int = 1,
    ray: str | None = None,
    on_done: Callable[[dict[str, Any]], None] | None = None,
    results_dir: str | Path | None = None,
    resume: bool = False,
) -> BatchReport:
    """Analyse many bundles: serially (workers=1), with a process pool, or on Ray.

    Args:
        results_dir: write each bundle's result there as it finishes
            (``NAME.json``, atomically; see :func:`result_path`).
        resume: with ``results_dir``, read back the results an interrupted run of the same
            job (bundle, model, config, search) already wrote, and compute only the others.
    """
    start = time.perf_counter()
    jobs = [(str(p), model, config, search) for p in paths]
    done = on_done or (lambda _r: None)
    folder = None if results_dir is None else Path(results_dir)
    if resume and folder is None:
        raise ForensicsError("resume needs a results directory to resume from (--results DIR)")
    if folder is not None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ForensicsError(f"cannot create the results directory '{folder}': {exc.strerror}") from None
    found = {job[0]: _read_result(folder, job) for job in jobs} if resume and folder is not None else {}
    kept = {path: result for path, result in found.items() if result is not None}
    todo = [job for job in jobs if job[0] not in kept]

    def finished(job: Job, result: dict[str, Any]) -> None:
        if folder is not None and result["ok"]:
            _write_result(folder, job, result)
        done(result)

    for result in kept.values():
        done(result)
    computed, backend = _run(todo, workers, ray, finished)
    by_path = {**kept, **computed}
    outputs = [by_path[job[0]] for job in jobs]
    report = BatchReport(
        results=[r for r in outputs if r["ok"]],
        skipped=[{"bundle": r["bundle"], "error": r["error"]} for r in outputs if not r["ok"]],
        seconds=time.perf_counter() - start,
        backend=backend,
        computed=[job[0] for job in todo],
        resumed=[job[0] for job in jobs if job[0] in kept],
    )
    report.groups = group_incidents(report.results)
    return report


def _run(
    jobs: list[Job], workers: int, ray: str | None, finished: Callable[[Job, dict[str, Any]], None]
) -> tuple[dict[str, dict[str, Any]], str]:
    """Run ``jobs``, calling ``finished`` as each one ends; their results by bundle path."""
    results: dict[str, dict[str, Any]] = {}

    def record(job: Job, result: dict[str, Any]) -> None:
        results[job[0]] = result
        finished(job, result)

    if ray:
        _run_ray(jobs, ray, record)
        return results, f"ray ({ray})"
    if workers > 1 and len(jobs) > 1:
        ctx = multiprocessing.get_context("spawn")
        with cf_futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            with worker_environment():  # a spawn pool starts its workers on submit
                futures = {pool.submit(_work, job): job for job in jobs}
            for future in cf_futures.as_completed(futures):
                record(futures[future], future.result())
        return results, f"process pool ({workers} workers)"
    for job in jobs:
        record(job, _work(job))
    return results, "serial" if workers == 1 else f"process pool ({workers} workers)"


def _run_ray(jobs: list[Job], address: str, record: Callable[[Job, dict[str, Any]], None]) -> None:
    """One Ray task per bundle (:func:`~model_forensics.core.distributed.map_tasks`); every
    task loads its own model, as a pool worker does."""
    map_tasks(_ray_work, jobs, address, on_done=lambda i, result: record(jobs[i], result))


def _ray_work(_shared: None, job: Job) -> dict[str, Any]:
    return _work(job)


def group_incidents(results: list[dict[str, Any]], top: int = 5, jaccard: float = 0.4) -> list[dict[str, Any]]:
    """Group incidents that share root-cause sites; rank groups by severity."""
    import networkx as nx

    tops: dict[str, set[str]] = {}
    severity: dict[str, float] = {}
    for r in results:
        sites = [u["unit"] for u in r["ranking"]["units"] if u["level"] == "site"][:top]
        tops[r["bundle"]] = set(sites)
        # severity: how far the most anomalous site is from benign behaviour (robust z)
        severity[r["bundle"]] = max((a["score"] for a in r["anomalies"]["anomalies"]), default=0.0)
    graph = nx.Graph()
    graph.add_nodes_from(tops)
    names = list(tops)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            union = tops[a] | tops[b]
            if union and len(tops[a] & tops[b]) / len(union) >= jaccard:
                graph.add_edge(a, b)
    groups = []
    for component in nx.connected_components(graph):
        members = sorted(component, key=lambda m: -severity[m])
        shared = set.intersection(*(tops[m] for m in members)) if members else set()
        groups.append(
            {
                "incidents": members,
                "shared_sites": sorted(shared),
                "severity": max(severity[m] for m in members),
            }
        )
    groups.sort(key=lambda g: -float(g["severity"]))  # type: ignore[arg-type]
    return groups
