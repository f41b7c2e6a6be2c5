"""The analysis pipelines behind ``analyze``, ``batch`` and ``triage``.

``analyze_bundle``: replay → CF → attribution ranking → CausalCCA → a JSON-able result.
Triage (``search=False``) is cheap — CF + attribution only, no fix-set search; incidents
whose top root-cause sites overlap (Jaccard ≥ 0.4 of their top-5 attributed sites) are
grouped, and groups are ranked by severity = the largest CF anomaly score (robust z) of
any member. Both map over bundles with a local process pool or, with ``ray``, Ray tasks (one
task per bundle); every worker loads its own model, so results equal the serial ones.
"""

from __future__ import annotations

import concurrent.futures as cf_futures
import multiprocessing
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_forensics.core.bundle import MANIFEST
from model_forensics.core.errors import ForensicsError
from model_forensics.core.records import fields_json


@dataclass
class Analysis:
    bundle: str
    anomalies: dict[str, Any]
    ranking: dict[str, Any]
    fix_set: dict[str, Any] | None
    forward_passes: int
    seconds: float

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
    progress: Callable[[str], None] | None = None,
) -> Analysis:
    """Full root-cause analysis of one bundle (``search=False``: triage only, no CCA;
    ``strategy``, ``directions``, ``gating``: override the config's ``modules.cca`` values,
    see :class:`~model_forensics.rca.cca.CausalCCA`)."""
    from model_forensics.core.config import load_config
    from model_forensics.rca.attribution import attribution_ranking
    from model_forensics.rca.cca import CausalCCA
    from model_forensics.rca.compression import CompressionForensics
    from model_forensics.replay import SandboxReplayer

    say = progress or (lambda _msg: None)
    # bad options fail before any work
    settings = load_config(config)
    cca = CausalCCA(settings, search_strategy=strategy, directions=directions, gating=gating)
    start = time.perf_counter()
    say("replaying and verifying")
    session = SandboxReplayer(settings).load_bundle(path, model=model)
    if session.predicate is None:
        raise ForensicsError(f"bundle '{path}' has no failure predicate; there is nothing to analyse")
    if not session.recorded_failed:
        raise NothingToFix(f"bundle '{path}': the predicate does not hold on the recorded output; nothing to fix")
    say("compression forensics")
    anomalies = CompressionForensics(settings).analyze(session, baseline=baseline)
    say("attribution ranking")
    ranking = attribution_ranking(session)
    fix = None
    if search:
        say("searching a minimal fix set")
        fix = cca.search_fix_set(session, guided_by=anomalies, ranking=ranking)
    ranking_json = ranking.to_json()
    ranking_json["units"] = ranking_json["units"][:200]
    return Analysis(
        bundle=str(path),
        anomalies=anomalies.to_json(),
        ranking=ranking_json,
        fix_set=None if fix is None else fix.to_json(),
        forward_passes=session.forward_passes,
        seconds=time.perf_counter() - start,
    )


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
    results: list[dict[str, Any]]
    skipped: list[dict[str, str]] = field(default_factory=list)
    groups: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    backend: str = "process-pool"

    def to_json(self) -> dict[str, Any]:
        return fields_json(self)


def _work(job: tuple[str, str | None, str | None, bool]) -> dict[str, Any]:
    path, model, config, search = job
    try:
        return {"ok": True, **analyze_bundle(path, model=model, config=config, search=search).to_json()}
    except ForensicsError as exc:
        return {"ok": False, "bundle": path, "error": str(exc)}


def run_many(
    paths: Sequence[Path],
    *,
    model: str | None = None,
    config: str | None = None,
    search: bool = True,
    workers: int = 1,
    ray: str | None = None,
    on_done: Callable[[dict[str, Any]], None] | None = None,
) -> BatchReport:
    """Analyse many bundles: serially (workers=1), with a process pool, or on Ray."""
    start = time.perf_counter()
    jobs = [(str(p), model, config, search) for p in paths]
    done = on_done or (lambda _r: None)
    outputs: list[dict[str, Any]] = []
    if ray:
        outputs = _run_ray(jobs, ray, done)
        backend = f"ray ({ray})"
    elif workers > 1:
        ctx = multiprocessing.get_context("spawn")
        with cf_futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            for result in pool.map(_work, jobs):
                done(result)
                outputs.append(result)
        backend = f"process pool ({workers} workers)"
    else:
        for job in jobs:
            result = _work(job)
            done(result)
            outputs.append(result)
        backend = "serial"
    report = BatchReport(
        results=[r for r in outputs if r["ok"]],
        skipped=[{"bundle": r["bundle"], "error": r["error"]} for r in outputs if not r["ok"]],
        seconds=time.perf_counter() - start,
        backend=backend,
    )
    report.groups = group_incidents(report.results)
    return report


def _run_ray(
    jobs: list[tuple[str, str | None, str | None, bool]], address: str, done: Callable[[dict[str, Any]], None]
) -> list[dict[str, Any]]:
    try:
        import ray
    except ImportError:
        raise ForensicsError("--ray needs the optional extra: pip install 'model-forensics[ray]'") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=None if address == "local" else address, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(_work)
        refs = [remote.remote(job) for job in jobs]
        outputs = []
        for ref in refs:
            result = ray.get(ref)
            done(result)
            outputs.append(result)
        return outputs
    finally:
        if started:
            ray.shutdown()


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
