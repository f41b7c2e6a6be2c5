"""The replay worker: one long-lived child process that holds replay Sessions and answers
token-influence and intervention requests for the server.

Why a process: a replay runs inside the sandbox guard, which is process-wide (no socket may
be created, no process started while a replay runs); in the server's own process that
would stop it accepting connections and starting jobs. The worker is started on the first
request (from the jobs' fork server), keeps the last ``max_sessions`` Sessions (loading a model is the slow
part), answers one request at a time, and is killed and restarted when a request runs past
``time_limit_s``.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from model_forensics.core.errors import ForensicsError
from model_forensics.server.jobs import process_context
from model_forensics.server.security import BadParameter, NotFound

ERRORS: dict[str, type[ForensicsError]] = {"BadParameter": BadParameter, "NotFound": NotFound}


class ReplayWorker:
    """Sends requests to the worker process and returns its answers.

    Args:
        time_limit_s: the longest one request may take (model loading included).
        max_sessions: Sessions the worker keeps loaded.
    """

    def __init__(self, time_limit_s: float = 300.0, max_sessions: int = 2):
        self.time_limit_s = time_limit_s
        self.max_sessions = max_sessions
        self._lock = threading.Lock()
        self._process: Any = None
        self._conn: Any = None

    def call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        """Run ``op`` (``influence`` or ``replay``) in the worker.

        Raises:
            ForensicsError: the request failed (its message), or ran past the time limit.
        """
        with self._lock:
            self._ensure()
            self._conn.send((op, kwargs))
            if not self._conn.poll(self.time_limit_s):
                self._kill()
                raise ForensicsError(
                    f"the {op} request ran past the server's limit of {self.time_limit_s:g} s and was stopped"
                )
            try:
                reply = self._conn.recv()
            except EOFError:
                self._kill()
                raise ForensicsError(f"the replay worker ended unexpectedly during {op}; try again") from None
        if reply[0] == "ok":
            return dict(reply[1])
        raise ERRORS.get(reply[1], ForensicsError)(reply[2])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(OSError):
                    self._conn.send(None)
            self._kill()

    def _ensure(self) -> None:
        if self._process is not None and self._process.is_alive():
            return
        context = process_context()
        parent, child = context.Pipe()
        self._process = context.Process(target=worker_main, args=(child, self.max_sessions), daemon=True)
        self._process.start()
        child.close()
        self._conn = parent

    def _kill(self) -> None:
        if self._process is not None:
            self._process.join(0.5)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(5)
        if self._conn is not None:
            self._conn.close()
        self._process = self._conn = None


def worker_main(conn: Any, max_sessions: int) -> None:
    """The worker's loop: one request in, one reply out, until ``None`` or the pipe closes."""
    sessions: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        op, kwargs = request
        try:
            session = _session(sessions, kwargs.pop("path"), kwargs.pop("key"), max_sessions)
            value = OPS[op](session, **kwargs)
            conn.send(("ok", value))
        except ForensicsError as exc:
            conn.send(("error", type(exc).__name__, str(exc)))
        except Exception as exc:  # one line for the client, whatever broke
            conn.send(("error", "ForensicsError", f"{op} failed: {type(exc).__name__}: {exc}"))


def _session(sessions: OrderedDict[tuple[Any, ...], Any], path: str, key: tuple[Any, ...], keep: int) -> Any:
    from model_forensics.replay import SandboxReplayer

    if key in sessions:
        sessions.move_to_end(key)
        return sessions[key]
    session = SandboxReplayer().load_bundle(path)
    sessions[key] = session
    while len(sessions) > keep:
        _, old = sessions.popitem(last=False)
        old.close()
    return session


def _influence(session: Any, target: str | int | None, method: str, position: int) -> dict[str, Any]:
    from model_forensics.server.data import influence

    return influence(session, target, method, position).model_dump()


def _replay(session: Any, site: str, head: int | None, kind: str, value: float | None) -> dict[str, Any]:
    from model_forensics.replay import Intervention

    if head is not None and re.fullmatch(r"blocks\.\d+\.attn", site):
        site, head = f"{site}.head.{head}", None  # one head of the attention output
    intervention = Intervention(site, kind, value=value, heads=None if head is None else (head,))
    result = session.run([intervention])
    output = session.manifest["output"]
    recorded_text = output.get("text")
    recorded_prediction = output.get("prediction")
    changed = result.text != recorded_text if recorded_text is not None else result.prediction != recorded_prediction
    return {
        "intervention": intervention.to_json(),
        "recorded_output": recorded_text if recorded_text is not None else _class(recorded_prediction),
        "new_output": result.text if recorded_text is not None else _class(result.prediction),
        "changed": bool(changed),
        "predicate_result": result.failed,
        "recorded_predicate_result": session.recorded_failed,
        "flipped": result.flipped,
        "prediction": int(result.prediction),
        "forward_passes": int(result.forward_passes),
    }


def _class(prediction: int | None) -> str | None:
    return None if prediction is None else f"class {prediction}"


OPS: dict[str, Callable[..., dict[str, Any]]] = {"influence": _influence, "replay": _replay}
