"""Ray for every ``--ray`` entry point: connect within a bounded time, run tasks, disconnect.

``batch``/``triage`` (one task per bundle), ``ModelInspector.run(ray=…)`` (one task per
shard of inputs) and ``evaluate_claim(ray=…)`` (one task per shard of prompts) all run
through :func:`map_tasks`::

    results = map_tasks(work, jobs, "local", shared=model)   # work(model, job), in job order

Addresses:

* ``local`` — a private cluster on this machine, started for the call and stopped after;
* ``auto`` — the cluster ``RAY_ADDRESS`` names or ``ray start`` started on this machine;
  a private local one when there is none;
* ``HOST:PORT`` or ``ray://HOST:PORT`` — a running cluster. Before Ray is asked, the
  address must accept a connection and answer the HTTP/2 preface as a gRPC server does
  within ``timeout_s`` (default 10 s), and ``ray.init`` then gets the same bound: Ray
  itself retries an unreachable address for a minute or more, and its client can abort
  the process on an endpoint that is not Ray.

A Ray that is already initialised in this process (a test's fixture, a notebook, a
benchmark that chose the worker count) is used as it is and left running. A local
cluster starts with token authentication off (``RAY_AUTH_MODE=disabled``) unless the
environment says otherwise: it listens on this machine only, for this process.

Failures map onto :class:`ForensicsError`: Ray not installed, an address that cannot be
reached (one line naming it and what to do), and a task that raised one (re-raised as
is, without Ray's wrapping).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any, TypeVar

import torch

from model_forensics.core.errors import ForensicsError

CONNECT_TIMEOUT_S = 10.0
LOCAL_ADDRESSES = ("local", "auto")
# HTTP/2 client connection preface + an empty SETTINGS frame (RFC 9113 §3.4)
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])

Job = TypeVar("Job")
Result = TypeVar("Result")


class RayUnavailable(ForensicsError):
    """Ray is not installed, or the cluster cannot be reached."""


def import_ray() -> ModuleType:
    """The ``ray`` module, or a :class:`RayUnavailable` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise RayUnavailable("--ray needs the optional extra: pip install 'model-forensics[ray]'") from None
    return ray


def check_address(address: str) -> None:
    """Reject an empty address early (the CLI passes the option value through)."""
    if not address or not address.strip():
        raise RayUnavailable("the Ray address is empty; pass 'auto', 'local' or HOST:PORT of a running cluster")


def host_port(address: str) -> tuple[str, int]:
    """``HOST:PORT`` of a cluster address (``ray://`` prefix allowed).

    Raises:
        RayUnavailable: the address has no port number.
    """
    bare = address.removeprefix("ray://").rstrip("/")
    host, _, port = bare.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RayUnavailable(f"Ray address '{address}' is not HOST:PORT; pass e.g. 10.0.0.5:6379 (or 'local' / 'auto')")
    return host.strip("[]"), int(port)


def probe(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail within ``timeout_s`` when nothing accepts a connection at ``address``.

    Raises:
        RayUnavailable: refused, unresolvable or silent for ``timeout_s`` seconds.
    """
    host, port = host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as conn:
            # Ray's GCS (and the Ray Client server) speak gRPC: HTTP/2 answers the client
            # preface with a SETTINGS frame. Anything else (a proxy, another service) would
            # leave Ray retrying for minutes, or crash its client.
            conn.sendall(HTTP2_PREFACE)
            reply = conn.recv(9)
            if len(reply) == 9 and reply[3] == 0x04:
                return
            why = "it accepts connections but does not answer as a Ray (gRPC) server"
    except TimeoutError:
        why = f"no answer within {timeout_s:g} s"
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
    raise RayUnavailable(
        f"cannot reach the Ray cluster at '{address}' ({why}); start one there with `ray start --head`, "
        "check the address and firewall, or use --ray local"
    )


@contextmanager
def ray_session(
    address: str, *, timeout_s: float = CONNECT_TIMEOUT_S, num_cpus: int | None = None
) -> Iterator[ModuleType]:
    """Ray, connected to ``address`` (see the module docstring) for the block.

    Args:
        address: ``local``, ``auto`` or ``HOST:PORT`` / ``ray://HOST:PORT``.
        timeout_s: how long a remote address may take to accept a connection.
        num_cpus: the CPUs of a local cluster started here (default: all of this machine).
    Yields:
        the ``ray`` module, initialised; shut down on exit if this call started it.
    Raises:
        RayUnavailable: Ray missing, or the address unreachable.
    """
    check_address(address)
    ray = import_ray()
    if ray.is_initialized():
        if address.strip() not in LOCAL_ADDRESSES:
            probe(address.strip(), timeout_s)  # a wrong address fails even when Ray is already up
        yield ray
        return
    _connect(ray, address.strip(), timeout_s, num_cpus)
    try:
        yield ray
    finally:
        ray.shutdown()


def _connect(ray: ModuleType, address: str, timeout_s: float, num_cpus: int | None) -> None:
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if address == "auto":
        env = os.environ.get("RAY_ADDRESS", "").strip()
        if env and env not in LOCAL_ADDRESSES:
            probe(env, timeout_s)
        try:
            ray.init(address="auto", **options)
            return
        except ConnectionError:
            if env:
                raise RayUnavailable(
                    f"RAY_ADDRESS='{env}' names no running Ray cluster; unset it or start one with `ray start --head`"
                ) from None
        address = "local"
    if address == "local":
        with _local_auth():
            ray.init(address="local", num_cpus=num_cpus, **options)
        return
    probe(address, timeout_s)
    _init_within(ray, address, timeout_s, options)


def _init_within(ray: ModuleType, address: str, timeout_s: float, options: dict[str, Any]) -> None:
    # Something accepts connections there, but it may not be a Ray cluster (a proxy, another
    # service): Ray would retry for minutes, so the connection gets ``timeout_s`` in a thread.
    outcome: dict[str, BaseException | None] = {}

    def connect() -> None:
        try:
            ray.init(address=address, **options)
            outcome["error"] = None
        except BaseException as exc:  # handed to the caller's thread below
            outcome["error"] = exc

    worker = threading.Thread(target=connect, name="ray-connect", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if "error" not in outcome:
        raise RayUnavailable(
            f"cannot reach the Ray cluster at '{address}' (it accepts connections, but no Ray cluster answered "
            f"within {timeout_s:g} s); check the address and port (the GCS port, 6379 by default)"
        )
    error = outcome["error"]
    if error is not None:
        raise RayUnavailable(f"cannot reach the Ray cluster at '{address}': {error}") from None


@contextmanager
def _local_auth() -> Iterator[None]:
    # Ray ≥ 2.5x turns on token authentication for new clusters; a private cluster on this
    # machine does not need it, and workers inherit the setting from the environment at start.
    old = os.environ.get("RAY_AUTH_MODE")
    if old is None:
        os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RAY_AUTH_MODE", None)


def cluster_cpus(ray: ModuleType) -> int:
    """CPUs the connected cluster offers (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def map_tasks(
    work: Callable[[Any, Job], Result],
    jobs: Sequence[Job],
    address: str,
    *,
    shared: Any = None,
    on_done: Callable[[int, Result], None] | None = None,
    timeout_s: float = CONNECT_TIMEOUT_S,
) -> list[Result]:
    """Run ``work(shared, job)`` for every job as a Ray task; return the results in job order.
    Each task runs at the driver's torch thread count, so it computes what the local run does.

    Args:
        work: a module-level function (workers import it by name).
        jobs: one task each; small values (paths, index ranges).
        address: where to run (see the module docstring).
        shared: one object every task reads (a model, the inputs), stored once in the
            cluster's object store rather than sent with each task.
        on_done: called as ``on_done(job_index, result)`` as each task finishes.
    Raises:
        RayUnavailable: Ray missing or the address unreachable.
        ForensicsError: what a task raised, as it raised it.
    """
    threads = torch.get_num_threads()
    with ray_session(address, timeout_s=timeout_s) as ray:
        remote = ray.remote(num_cpus=1)(_at_threads)
        ref = ray.put(shared)
        pending = {remote.remote(threads, work, ref, job): i for i, job in enumerate(jobs)}
        results: dict[int, Result] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for done in ready:
                i = pending.pop(done)
                results[i] = _get(ray, done)
                if on_done is not None:
                    on_done(i, results[i])
        return [results[i] for i in range(len(jobs))]


def _at_threads(threads: int, work: Callable[[Any, Job], Result], shared: Any, job: Job) -> Result:
    """One task, at the driver's torch thread count: some kernels' results depend on the
    count (docs/replay.md, Threads), and a task must give what the local run gives."""
    torch.set_num_threads(threads)
    return work(shared, job)


def _get(ray: ModuleType, ref: Any) -> Any:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, BaseException):
            raise cause from None
        raise


def shard_spans(n: int, shards: int, align: int = 1) -> list[tuple[int, int]]:
    """``shards`` contiguous ``(start, stop)`` ranges covering ``0..n``, each boundary a
    multiple of ``align`` (micro-batches stay whole, so a shard runs exactly the batches
    the local path runs); fewer when there are fewer aligned blocks than shards."""
    blocks = -(-n // max(1, align))
    shards = max(1, min(shards, blocks))
    out, start = [], 0
    for k in range(shards):
        stop = min(n, (blocks * (k + 1) // shards) * align)
        if stop > start:
            out.append((start, stop))
        start = stop
    return out
