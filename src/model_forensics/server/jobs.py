"""Background analysis jobs: ``analyze`` on one bundle, in a child process, with progress,
cancel and a time limit.

Each job runs :func:`~model_forensics.rca.pipeline.analyze_bundle` in its own process
(from a fork server, :func:`process_context`: the server's threads and sockets are never
inside the replay sandbox, and a cancelled or overrunning job is killed outright, not asked
to stop).
The child sends ``(phase, done, total)`` progress (:mod:`model_forensics.rca.progress`)
over a queue and writes the analysis JSON itself, atomically, beside the bundle
(``NAME.analysis.json``, what ``analyze --out`` would write) or, when that folder is not
writable, into the manager's own folder. At most ``max_running`` jobs run at once (one by
default); the rest wait in order.

States: queued → running → done | failed | cancelled. ``Job.version`` grows on every
change, so a listener can wait for the next one.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import multiprocessing.forkserver
import os
import queue
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_forensics.core.errors import ForensicsError
from model_forensics.core.workers import worker_environment
from model_forensics.server.data import analysis_file_name
from model_forensics.server.responses import ENDED_STATES, Job, JobProgress, JobState
from model_forensics.server.security import BadParameter, NotFound

DEFAULT_TIME_LIMIT_S = 600.0
MAX_JOBS_KEPT = 200  # ended jobs beyond this are forgotten, oldest first
POLL_S = 0.1
CHOICES = {
    "strategy": ("greedy", "exhaustive"),
    "directions": ("auto", "always", "never"),
    "gating": ("auto", "always", "never"),
}
OPTION_KEYS = (*CHOICES, "search", "baseline", "time_limit_s")


PRELOAD = ["model_forensics.rca.pipeline", "model_forensics.replay", "model_forensics.circuits"]


def process_context() -> Any:
    """Where jobs and the replay worker start their processes: a fork server that imported
    torch and the analysis code once (``forkserver``: each child is a fork of that clean,
    single-threaded process, never of the server with its threads and sockets), so only the
    first child pays for the imports.

    The fork server is started here, in the worker environment (:mod:`model_forensics.core.workers`):
    its children inherit its OpenMP runtime, which read ``OMP_WAIT_POLICY`` when the fork
    server imported torch (a fork server already running is used as it is)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    with worker_environment():
        multiprocessing.forkserver.ensure_running()
    return context


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def check_options(options: dict[str, Any], max_time_limit_s: float) -> dict[str, Any]:
    """The ``analyze`` options a job may set, checked (``baseline``: bundle ids, resolved by
    the caller; ``time_limit_s``: at most the server's limit).

    Raises:
        BadParameter: an unknown option or a value outside its choices.
    """
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise BadParameter(f"unknown job option(s) {', '.join(unknown)}; use {', '.join(OPTION_KEYS)}")
    out: dict[str, Any] = {}
    for key, allowed in CHOICES.items():
        value = options.get(key)
        if value is not None and value not in allowed:
            raise BadParameter(f"option {key}={value!r} is not one of {', '.join(allowed)}")
        if value is not None:
            out[key] = value
    if "search" in options:
        if not isinstance(options["search"], bool):
            raise BadParameter("option search must be true or false")
        out["search"] = options["search"]
    baseline = options.get("baseline", [])
    if not isinstance(baseline, list) or not all(isinstance(b, str) for b in baseline) or len(baseline) > 16:
        raise BadParameter("option baseline must be a list of at most 16 bundle ids")
    out["baseline"] = list(baseline)
    limit = options.get("time_limit_s", max_time_limit_s)
    if isinstance(limit, bool) or not isinstance(limit, int | float) or not 0 < float(limit) <= max_time_limit_s:
        raise BadParameter(f"option time_limit_s must be a number in (0, {max_time_limit_s:g}] seconds")
    out["time_limit_s"] = float(limit)
    return out


@dataclass
class _Run:
    job: Job
    path: Path
    options: dict[str, Any]
    out: Path
    version: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)


class JobManager:
    """Queues, runs, cancels and reports analysis jobs.

    Args:
        time_limit_s: the longest a job may run (a job may ask for less).
        max_running: jobs run at once.
        out_dir: where results go when a bundle's folder is not writable (default: a
            temporary folder removed by :meth:`close`).
    """

    def __init__(self, time_limit_s: float = DEFAULT_TIME_LIMIT_S, max_running: int = 1, out_dir: Path | None = None):
        self.time_limit_s = float(time_limit_s)
        self._tmp = None if out_dir is not None else tempfile.TemporaryDirectory(prefix="mf-jobs-")
        self.out_dir = Path(out_dir) if out_dir is not None else Path(self._tmp.name)  # type: ignore[union-attr]
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Condition()
        self._slots = threading.Semaphore(max_running)
        self._closed = False
        self._context = process_context()

    # -- public ------------------------------------------------------------------------------
    def submit(self, path: Path, bundle_id: str, options: dict[str, Any]) -> Job:
        """Queue ``analyze`` on the bundle at ``path`` (options checked by :func:`check_options`)."""
        checked = check_options(options, self.time_limit_s)
        job_id = uuid.uuid4().hex[:12]
        folder = path.parent
        if os.access(folder, os.W_OK):
            out, result = folder / analysis_file_name(path), analysis_file_name(path).removesuffix(".json")
        else:
            out, result = self.out_dir / f"{job_id}.json", f"jobs/{job_id}"
        job = Job(
            id=job_id,
            bundle=bundle_id,
            kind="analyze",
            state="queued",
            progress=JobProgress(),
            result=None,
            created=_now(),
            time_limit_s=checked.pop("time_limit_s"),
        )
        run = _Run(job, path, checked, out)
        run.job.result = None
        with self._lock:
            if self._closed:
                raise ForensicsError("the server is shutting down; no new jobs")
            self._runs[job_id] = run
            self._forget_old()
        threading.Thread(target=self._run, args=(run, result), name=f"job-{job_id}", daemon=True).start()
        return job.model_copy(deep=True)

    def get(self, job_id: str) -> Job:
        return self._find(job_id).job.model_copy(deep=True)

    def version(self, job_id: str) -> int:
        return self._find(job_id).version

    def list(self) -> list[Job]:
        with self._lock:
            return [r.job.model_copy(deep=True) for r in self._runs.values()]

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job (a running one is killed); an ended job is left as it is."""
        run = self._find(job_id)
        run.cancel.set()
        with self._lock:
            if run.job.state == "queued":
                self._update(run, state="cancelled", finished=_now(), error="cancelled before it started")
        return self.get(job_id)

    def wait(self, job_id: str, version: int, timeout_s: float) -> Job:
        """The job once its version differs from ``version`` (or after ``timeout_s``)."""
        run = self._find(job_id)
        with self._lock:
            self._lock.wait_for(lambda: run.version != version, timeout=timeout_s)
        return self.get(job_id)

    def results(self) -> dict[Path, dict[str, Path]]:
        """Per bundle path, results written outside the bundle's folder: {name: file}."""
        out: dict[Path, dict[str, Path]] = {}
        with self._lock:
            for run in self._runs.values():
                if run.job.state == "done" and run.job.result and run.job.result.startswith("jobs/"):
                    out.setdefault(run.path, {})[run.job.result] = run.out
        return out

    def close(self) -> None:
        """Cancel every job, wait for their processes to end, remove the temporary folder."""
        with self._lock:
            self._closed = True
            runs = list(self._runs.values())
        for run in runs:
            run.cancel.set()
        deadline = time.monotonic() + 10
        for run in runs:
            while run.job.state not in ENDED_STATES and time.monotonic() < deadline:
                time.sleep(POLL_S)
        if self._tmp is not None:
            self._tmp.cleanup()

    # -- running ---------------------------------------------------------------------------
    def _find(self, job_id: str) -> _Run:
        with self._lock:
            run = self._runs.get(job_id)
        if run is None:
            raise NotFound(f"job {job_id!r} does not exist (or was forgotten); list jobs with GET /api/jobs")
        return run

    def _update(self, run: _Run, **changes: Any) -> None:
        """Change a job's fields and wake listeners (call with the lock held)."""
        for key, value in changes.items():
            setattr(run.job, key, value)
        run.version += 1
        self._lock.notify_all()

    def _set(self, run: _Run, **changes: Any) -> None:
        with self._lock:
            self._update(run, **changes)

    def _forget_old(self) -> None:
        ended = [k for k, r in self._runs.items() if r.job.state in ENDED_STATES]
        for key in ended[: max(0, len(self._runs) - MAX_JOBS_KEPT)]:
            del self._runs[key]

    def _run(self, run: _Run, result: str) -> None:
        while not self._slots.acquire(timeout=POLL_S):
            if run.cancel.is_set():
                return
        try:
            if run.cancel.is_set():
                return
            self._set(run, state="running", started=_now())
            state, error = self._supervise(run)
            self._set(run, state=state, error=error, finished=_now(), result=result if state == "done" else None)
        finally:
            self._slots.release()

    def _supervise(self, run: _Run) -> tuple[JobState, str | None]:
        """Start the child, relay its progress, kill it on cancel or time limit."""
        messages = self._context.Queue()
        child = self._context.Process(
            target=analysis_child, args=(str(run.path), run.options, str(run.out), messages), daemon=True
        )
        child.start()
        deadline = time.monotonic() + run.job.time_limit_s
        try:
            while True:
                try:
                    message = messages.get(timeout=POLL_S)
                except queue.Empty:
                    message = None
                if message is not None:
                    kind = message[0]
                    if kind == "progress":
                        self._progress(run, *message[1:])
                        continue
                    if kind == "done":
                        return "done", None
                    return "failed", str(message[1])
                if run.cancel.is_set():
                    return "cancelled", "cancelled by the user"
                if time.monotonic() > deadline:
                    return (
                        "failed",
                        f"the analysis ran past its time limit of {run.job.time_limit_s:g} s and was stopped",
                    )
                if not child.is_alive() and messages.empty():
                    return "failed", f"the analysis process ended unexpectedly (exit code {child.exitcode})"
        finally:
            _stop(child)
            messages.close()

    def _progress(self, run: _Run, phase: str, done: int, total: int) -> None:
        from model_forensics.rca.progress import describe

        self._set(run, progress=JobProgress(phase=phase, done=done, total=total, line=describe(phase, done, total)))


def _stop(child: Any) -> None:
    if child.is_alive():
        child.terminate()
        child.join(5)
    if child.is_alive():
        child.kill()
    child.join(5)


def analysis_child(path: str, options: dict[str, Any], out: str, messages: Any) -> None:
    """The job's process: analyse, write the result to ``out`` atomically, report."""
    try:
        from model_forensics.rca.pipeline import NothingToFix, analyze_bundle, write_json_atomic

        def progress(phase: str, done: int, total: int) -> None:
            messages.put(("progress", phase, int(done), int(total)))

        try:
            result = analyze_bundle(path, progress=progress, **options)
        except NothingToFix as exc:
            messages.put(("failed", f"nothing to fix: {exc}"))
            return
        write_json_atomic(Path(out), result.to_json())
        messages.put(("done",))
    except ForensicsError as exc:
        messages.put(("failed", str(exc)))
    except Exception as exc:  # one line for the UI, whatever broke
        messages.put(("failed", f"the analysis failed: {type(exc).__name__}: {exc}"))
