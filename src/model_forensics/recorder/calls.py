"""External calls made during an incident (tools, APIs, databases), logged for replay.

``recorder.record_call(name)`` works as a decorator or a context manager. While
recording, each call appends ``{order, name, args, result, error}`` to the log that
becomes ``calls.jsonl``. Under replay, the same decorated function does not run: the
replayer installs a :class:`CallServer` that answers from the log in order, so a replay
never touches the database or network the original run used.
"""

from __future__ import annotations

import contextvars
import functools
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from model_forensics.core.errors import ReplayDivergence

F = TypeVar("F", bound=Callable[..., Any])

_SERVER: contextvars.ContextVar[CallServer | None] = contextvars.ContextVar("model_forensics_call_server", default=None)


def to_jsonable(value: Any) -> Any:
    """A JSON-safe copy of call arguments / results (non-JSON values become their repr)."""
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError):
        if isinstance(value, dict):
            return {str(k): to_jsonable(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [to_jsonable(v) for v in value]
        return repr(value)


@dataclass
class CallLog:
    """The calls of one recording, in order."""

    entries: list[dict[str, Any]] = field(default_factory=list)

    def append(self, name: str, args: Any, result: Any, error: str | None = None) -> None:
        self.entries.append(
            {
                "order": len(self.entries),
                "name": name,
                "args": to_jsonable(args),
                "result": to_jsonable(result),
                "error": error,
            }
        )


class CallServer:
    """Serves recorded results in order during replay; a different call is a divergence."""

    def __init__(self, entries: list[dict[str, Any]]):
        self.entries = entries
        self.position = 0

    def serve(self, name: str, args: Any) -> Any:
        if self.position >= len(self.entries):
            raise ReplayDivergence(
                f"replay made call #{self.position} '{name}' but the recording has only {len(self.entries)} calls"
            )
        entry = self.entries[self.position]
        if entry["name"] != name or entry["args"] != to_jsonable(args):
            raise ReplayDivergence(
                f"replay call #{self.position} is '{name}' with args {to_jsonable(args)}, but the recording has "
                f"'{entry['name']}' with args {entry['args']}"
            )
        self.position += 1
        if entry.get("error"):
            raise RuntimeError(f"recorded call '{name}' failed: {entry['error']}")
        return entry["result"]


@contextmanager
def serving(entries: list[dict[str, Any]]) -> Iterator[CallServer]:
    """Within this block, every ``record_call`` function is answered from ``entries``."""
    server = CallServer(entries)
    token = _SERVER.set(server)
    try:
        yield server
    finally:
        _SERVER.reset(token)


class CallRecorder:
    """What ``recorder.record_call(name)`` returns: a decorator and a context manager."""

    def __init__(self, log: CallLog, name: str):
        self.log = log
        self.name = name
        self.args: Any = None
        self.result: Any = None

    def __call__(self, fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            call_args = {"args": list(args), "kwargs": kwargs}
            server = _SERVER.get()
            if server is not None:
                return server.serve(self.name, call_args)
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                self.log.append(self.name, call_args, None, error=f"{type(exc).__name__}: {exc}")
                raise
            self.log.append(self.name, call_args, result)
            return result

        return wrapper  # type: ignore[return-value]

    def __enter__(self) -> CallRecorder:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        error = f"{exc_type.__name__}: {exc}" if exc_type else None
        self.log.append(self.name, self.args, self.result, error=error)
