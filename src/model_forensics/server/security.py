"""What the server lets in: paths inside the served directory only, a token when it listens
beyond loopback, bounded request bodies, same-origin requests.

Paths: an id from a URL (``runs/incident-0``) is refused when it is absolute, holds ``..``,
``.``, a backslash, a NUL or a control character, or does so once percent-decoded (once or
twice: ``..%2f``, ``..%252f``); when any component on the way is a link; or when its real
path leaves the root. Nothing here imports FastAPI: the middleware is plain ASGI.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import stat
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

from model_forensics.core.errors import ForensicsError

MAX_BODY_BYTES = 1024 * 1024
MAX_ID_CHARS = 1024

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class NotFound(ForensicsError):
    """An id or name that names nothing (HTTP 404)."""


class Forbidden(ForensicsError):
    """A path outside the served directory, through a link, or a missing token (HTTP 403)."""


class BadParameter(ForensicsError):
    """A query or body value out of range (HTTP 400)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only reaches this machine."""
    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond loopback without a token.

    Raises:
        ForensicsError: ``host`` is not a loopback address and no token was given.
    """
    if not is_loopback(host) and not token:
        raise ForensicsError(
            f"--host {host} listens beyond this machine; pass --token SECRET too (clients send "
            "'Authorization: Bearer SECRET' or ?token=SECRET)"
        )


def check_relative(rel: str, what: str = "path") -> list[str]:
    """The components of ``rel``, a path relative to the served root, after refusing every
    form of escape (see the module docstring).

    Raises:
        Forbidden: absolute, traversal, backslashes, control characters, in any decoding.
        BadParameter: empty or too long.
    """
    if not rel or len(rel) > MAX_ID_CHARS:
        raise BadParameter(f"{what} must be 1–{MAX_ID_CHARS} characters; list them with GET /api/bundles")
    decoded = [rel]
    for _ in range(2):
        decoded.append(unquote(decoded[-1]))
    for form in decoded:
        if form.startswith(("/", "~")) or "\\" in form or any(ord(c) < 32 or ord(c) == 127 for c in form):
            raise Forbidden(f"{what} {rel!r} is not a path inside the served directory")
        if any(part in ("..", ".") for part in form.split("/")):
            raise Forbidden(f"{what} {rel!r} leaves the served directory ('..' is not allowed)")
    parts = rel.split("/")
    if any(part == "" for part in parts):
        raise Forbidden(f"{what} {rel!r} has an empty component; use the id as GET /api/bundles lists it")
    return parts


def resolve_inside(root: Path, rel: str, what: str = "path") -> Path:
    """``root / rel`` when it lies inside ``root`` with no link on the way.

    Args:
        root: the served directory (resolved).
        rel: a slash-separated relative path from a URL.
    Raises:
        Forbidden: the path escapes (see :func:`check_relative`) or passes through a link.
        NotFound: nothing exists there.
    """
    parts = check_relative(rel, what)
    current = root
    for part in parts:
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            raise NotFound(
                f"{what} {rel!r} does not exist in the served directory; GET /api/bundles lists bundles"
            ) from None
        except OSError as exc:
            raise Forbidden(f"{what} {rel!r} cannot be read: {exc.strerror}") from None
        if stat.S_ISLNK(mode):
            raise Forbidden(f"{what} {rel!r} passes through a link; links are not followed")
    real = Path(os.path.realpath(current))
    if real != root and root not in real.parents:
        raise Forbidden(f"{what} {rel!r} is outside the served directory")
    return current


def relative_id(root: Path, path: Path) -> str:
    """The id of ``path`` under ``root``: its relative path with forward slashes."""
    return path.relative_to(root).as_posix()


# -- ASGI middleware -------------------------------------------------------------------------
class Guard:
    """Plain ASGI middleware in front of the app.

    * ``/api/*`` needs the token when one is set (``Authorization: Bearer T`` or ``?token=T``,
      compared in constant time).
    * The ``Host`` header must name this server when it listens on loopback (a DNS-rebinding
      page cannot read the API), and requests that change state must be JSON (a cross-site
      form cannot post one without a preflight, which the server never answers).
    * Bodies over ``max_body_bytes`` are refused with 413, declared or streamed (bodies are
      read here, whole, before the app sees them).
    """

    def __init__(self, app: ASGIApp, token: str | None, loopback: bool, max_body_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.token = token
        self.loopback = loopback
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await _reply(send, *refusal)
            return
        if scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        body = await self._read_body(receive)
        if body is None:
            await _reply(send, 413, f"request body over {self.max_body_bytes} bytes; send less")
            return
        await self.app(scope, _replaying(body, receive), send)

    def _refusal(self, scope: Scope) -> tuple[int, str] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.loopback and not _loopback_host(headers.get("host", "")):
            return 403, f"host {headers.get('host', '')!r} is not this server; open it at http://127.0.0.1"
        path = scope.get("path", "")
        if path.startswith("/api") and self.token is not None and not self._authorised(scope, headers):
            return 401, "this server needs a token: send 'Authorization: Bearer TOKEN' or add ?token=TOKEN"
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return 413, f"request body over {self.max_body_bytes} bytes; send less"
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if scope.get("method") in ("POST", "PUT", "PATCH") and path.startswith("/api") and media != "application/json":
            return 415, "send the request body as JSON (Content-Type: application/json)"
        return None

    def _authorised(self, scope: Scope, headers: dict[str, str]) -> bool:
        assert self.token is not None
        given = ""
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        else:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            given = (query.get("token") or [""])[0]
        return hmac.compare_digest(given.encode(), self.token.encode())

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body (streamed or not), or None once it grows past the limit."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the buffered body once, then the real channel
    (for the disconnect message)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _loopback_host(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if host.startswith("["):
        name = host[: host.index("]") + 1] if "]" in host else host
    return is_loopback(name)


async def _reply(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
