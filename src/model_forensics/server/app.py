"""The inspection console's HTTP server: a FastAPI app over one served directory.

::

    app = create_app("runs/")                        # what `model-forensics serve runs/` serves
    TestClient(app, base_url="http://127.0.0.1").get("/api/bundles").json()

JSON under ``/api`` (pydantic response models; the schema is at ``/openapi.json`` and
``/docs``), the built dashboard at ``/`` (``server/static``; client-side routes fall back to
its ``index.html``). Errors are ``{"detail": "one line"}``: 400 bad parameter, 401 missing
token, 403 a path outside the served directory, 404 unknown id, 413 body too large, 422 a
bundle that cannot be read. Numbers come from :mod:`model_forensics.server.data`; model runs
(influence, replay) from the replay worker process; analyses from background jobs.
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
import re
import socket
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from model_forensics.core.bundle import Bundle
from model_forensics.core.errors import BundleError, ForensicsError
from model_forensics.server import data
from model_forensics.server.jobs import DEFAULT_TIME_LIMIT_S, JobManager, check_options
from model_forensics.server.responses import (
    ENDED_STATES,
    Attention,
    BundleDetail,
    BundleSummary,
    Compare,
    CubeSlice,
    ErrorDetail,
    Health,
    Influence,
    InspectionDetail,
    InspectionSummary,
    Job,
    JobRequest,
    ReplayRequest,
    ReplayResult,
)
from model_forensics.server.security import (
    MAX_BODY_BYTES,
    BadParameter,
    Forbidden,
    Guard,
    NotFound,
    check_bind,
    is_loopback,
    resolve_inside,
)
from model_forensics.server.worker import ReplayWorker

STATIC = Path(__file__).parent / "static"
MAX_TOKENS = 4096
BUNDLES_CACHED = 32
SSE_KEEPALIVE_S = 15.0
NOT_BUILT = """<!doctype html><html><head><meta charset="utf-8"><title>model-forensics</title></head>
<body style="font: 15px/1.5 system-ui, sans-serif; max-width: 44em; margin: 3em auto">
<h1>model-forensics</h1><p>The dashboard is not built in this installation.
Build it from a checkout: <code>cd ui &amp;&amp; npm ci &amp;&amp; npm run build</code> (writes
<code>src/model_forensics/server/static/</code>), then restart <code>model-forensics serve</code>.</p>
<p>The JSON API works without it: <a href="/docs">/docs</a>, <a href="/api/bundles">/api/bundles</a>.</p>
</body></html>"""
ERROR_CODES = {
    400: "bad parameter",
    401: "token missing or wrong",
    403: "path outside the served directory",
    404: "unknown id",
    413: "request body too large",
    422: "the bundle cannot be read",
}
STATUS = {NotFound: 404, Forbidden: 403, BadParameter: 400, BundleError: 422}


class ServedDirectory:
    """The state behind the app: the root, opened bundles (by file signature), parsed JSON
    files, the job manager and the replay worker."""

    def __init__(self, root: Path, jobs: JobManager, worker: ReplayWorker):
        self.root = root
        self.jobs = jobs
        self.worker = worker
        self.json_cache: dict[Any, Any] = {}
        self._bundles: OrderedDict[tuple[Any, ...], Bundle] = OrderedDict()
        self._summaries: dict[tuple[Any, ...], BundleSummary] = {}
        self._lock = threading.Lock()

    def path(self, bundle_id: str) -> Path:
        return data.bundle_path(self.root, bundle_id)

    def bundle(self, path: Path) -> Bundle:
        """The bundle at ``path``, opened once per version of its files (not verified here:
        the list shows verification)."""
        key = data.signature(path)
        with self._lock:
            cached = self._bundles.get(key)
            if cached is not None:
                self._bundles.move_to_end(key)
                return cached
        opened = Bundle.open(path, verify=False)  # outside the lock: a zip may take a while
        with self._lock:
            self._bundles[key] = opened
            while len(self._bundles) > BUNDLES_CACHED:
                self._bundles.popitem(last=False)
        return opened

    def summary(self, path: Path) -> BundleSummary:
        """The bundle's list row, computed (sha256 included) once per version of its files."""
        key = data.signature(path)
        found = self._summaries.get(key)
        if found is not None:
            return found
        try:
            row = data.bundle_summary(self.root, path, bundle=self.bundle(path))
        except ForensicsError:
            row = data.bundle_summary(self.root, path)
        with self._lock:
            if len(self._summaries) > 4096:
                self._summaries.clear()
            self._summaries[key] = row
        return row

    def analyses(self, path: Path) -> dict[str, Path]:
        if len(self.json_cache) > 4096:
            self.json_cache.clear()
        return data.find_analyses(path, self.jobs.results().get(path), self.json_cache)


def create_app(
    root: str | Path,
    token: str | None = None,
    *,
    host: str = "127.0.0.1",
    time_limit_s: float = DEFAULT_TIME_LIMIT_S,
    max_running_jobs: int = 1,
    max_body_bytes: int = MAX_BODY_BYTES,
    static_dir: Path | None = None,
    jobs_dir: Path | None = None,
) -> FastAPI:
    """The app serving ``root``.

    Args:
        root: the directory whose bundles, analyses and inspections are served.
        token: required on every ``/api`` call when set (``Authorization: Bearer`` or ``?token=``).
        host: the address the server listens on; on loopback, requests must name a loopback
            host (``127.0.0.1``, ``localhost``) in their Host header.
        time_limit_s: the longest an analysis job (and one influence/replay request) may run.
        max_running_jobs: analysis jobs run at once.
        max_body_bytes: request bodies larger than this are refused (413).
        static_dir: the built dashboard (default: the package's ``server/static``).
        jobs_dir: where job results go when a bundle's folder is not writable.
    Raises:
        ForensicsError: ``root`` is not a directory, or ``host`` is not loopback and there is
            no token.
    """
    served = Path(root).resolve()
    if not served.is_dir():
        raise ForensicsError(f"'{root}' is not a directory; serve a directory of bundles")
    check_bind(host, token)
    state = ServedDirectory(served, JobManager(time_limit_s, max_running_jobs, jobs_dir), ReplayWorker(time_limit_s))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        state.jobs.close()
        state.worker.close()

    from model_forensics import __version__

    app = FastAPI(
        title="model-forensics inspection console",
        version=__version__,
        description="Bundles, activity cubes, attention, influence, analyses, jobs and replay over one directory.",
        lifespan=lifespan,
        responses={code: {"model": ErrorDetail, "description": what} for code, what in ERROR_CODES.items()},
    )
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.state.served = state
    app.add_middleware(Guard, token=token, loopback=is_loopback(host), max_body_bytes=max_body_bytes)
    _errors(app)
    _bundle_routes(app, state)
    _other_routes(app, state, __version__, static_dir or STATIC)
    _job_routes(app, state)
    _static_routes(app, static_dir or STATIC)
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema with its 422 validation responses replaced: this app answers bad
    parameters with 400 and ``{detail}`` (422 means a bundle that cannot be read)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            if "422" in responses:
                responses["422"] = {
                    "description": ERROR_CODES[422],
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorDetail"}}},
                }
    schemas = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    app.openapi_schema = schema
    return schema


# -- errors ------------------------------------------------------------------------------------
def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _errors(app: FastAPI) -> None:
    async def forensics(_request: Request, exc: Exception) -> JSONResponse:
        status = next((code for cls, code in STATUS.items() if isinstance(exc, cls)), 400)
        return JSONResponse({"detail": _one_line(str(exc))}, status_code=status)

    async def validation(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        where = " ".join(str(p) for p in first.get("loc", ()))
        detail = f"{where}: {first.get('msg', 'invalid value')}" if where else str(first.get("msg", exc))
        return JSONResponse({"detail": _one_line(detail)}, status_code=400)

    async def http(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return JSONResponse({"detail": _one_line(str(exc.detail))}, status_code=exc.status_code)

    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": _one_line(f"internal error: {type(exc).__name__}: {exc}")[:500]}, 500)

    app.add_exception_handler(ForensicsError, forensics)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http)
    app.add_exception_handler(Exception, unexpected)


# -- bundles -----------------------------------------------------------------------------------
BundleId = Annotated[str, "a bundle id as GET /api/bundles lists it"]
MaxTokens = Annotated[int, Query(ge=1, le=MAX_TOKENS, description="columns at most (longer: paged)")]
Offset = Annotated[int, Query(ge=0, description="first token position shown")]
Method = Literal["occlusion", "grad_x_input", "integrated_gradients", "attention_rollout"]


def _bundle_routes(app: FastAPI, state: ServedDirectory) -> None:
    @app.get("/api/bundles", tags=["bundles"])
    def list_bundles() -> list[BundleSummary]:
        """Every bundle under the served directory; unreadable ones carry their error."""
        return [state.summary(path) for path in data.find_bundles(state.root)]

    @app.get("/api/bundles/{bundle_id:path}/cube", tags=["bundles"])
    def cube(
        bundle_id: str,
        metric: str = "energy",
        max_tokens: MaxTokens = 128,
        max_layers: Annotated[int | None, Query(ge=1, le=1024)] = None,
        token_offset: Offset = 0,
    ) -> CubeSlice:
        """A (layers × tokens) heatmap of one ActivityCube metric."""
        bundle = state.bundle(state.path(bundle_id))
        return data.cube_slice(bundle, metric, max_tokens=max_tokens, max_layers=max_layers, token_offset=token_offset)

    @app.get("/api/bundles/{bundle_id:path}/attention", tags=["bundles"])
    def attention(
        bundle_id: str,
        layer: Annotated[int, Query(ge=0)],
        head: Annotated[int, Query(ge=0)],
        max_tokens: MaxTokens = 128,
        offset: Offset = 0,
    ) -> Attention:
        """One head's attention pattern (queries × keys), recorded or recomputed from q and k."""
        bundle = state.bundle(state.path(bundle_id))
        return data.attention(bundle, layer, head, max_tokens=max_tokens, offset=offset)

    @app.get("/api/bundles/{bundle_id:path}/influence", tags=["bundles"])
    def influence(
        bundle_id: str,
        target: Annotated[
            str | None, Query(max_length=200, description="token id or token text (default: the top prediction)")
        ] = None,
        method: Method = "occlusion",
        position: int = -1,
    ) -> Influence:
        """Influence of every prompt token on one output, on the replayed model."""
        path = state.path(bundle_id)
        state.bundle(path)  # a corrupt bundle fails here, before the worker loads a model
        parsed: str | int | None = int(target) if target is not None and target.isdigit() else target
        value = state.worker.call(
            "influence", path=str(path), key=data.signature(path), target=parsed, method=method, position=position
        )
        return Influence(**value)

    @app.get("/api/bundles/{bundle_id:path}/analyses/{name:path}", tags=["analyses"])
    def analysis(bundle_id: str, name: str) -> dict[str, Any]:
        """An analysis of this bundle as ``analyze --out`` writes it (FixSet, anomalies, ranking…)."""
        found = state.analyses(state.path(bundle_id))
        if name not in found:
            known = ", ".join(sorted(found)) or "none yet (start one with POST /api/jobs)"
            raise NotFound(f"analysis {name!r} does not exist for bundle {bundle_id!r}; known: {known}")
        return data.read_analysis(found[name])

    @app.post("/api/bundles/{bundle_id:path}/replay", tags=["replay"])
    def replay(bundle_id: str, request: Annotated[ReplayRequest, Body()]) -> ReplayResult:
        """Replay the incident with one intervention and compare with the recorded output."""
        path = state.path(bundle_id)
        state.bundle(path)
        value = state.worker.call(
            "replay",
            path=str(path),
            key=data.signature(path),
            site=request.site,
            head=request.head,
            kind=request.kind,
            value=request.value,
        )
        return ReplayResult(**value)

    @app.get("/api/bundles/{bundle_id:path}", tags=["bundles"])
    def detail(bundle_id: str) -> BundleDetail:
        """The manifest, tokens, sites, shapes and what can be shown for one bundle."""
        path = state.path(bundle_id)
        bundle = state.bundle(path)
        return data.bundle_detail(state.root, path, bundle, sorted(state.analyses(path)), state.summary(path))


def _other_routes(app: FastAPI, state: ServedDirectory, version: str, static: Path) -> None:
    @app.get("/api/health", tags=["server"])
    def health() -> Health:
        return Health(version=version, ui_built=(static / "index.html").is_file())

    @app.get("/api/compare", tags=["bundles"])
    def compare(
        a: str,
        b: str,
        metric: str = "energy",
        max_tokens: MaxTokens = 128,
        max_layers: Annotated[int | None, Query(ge=1, le=1024)] = None,
        token_offset: Offset = 0,
    ) -> Compare:
        """Two bundles' cube metric and their difference (b − a)."""
        first, second = state.bundle(state.path(a)), state.bundle(state.path(b))
        return data.compare(
            first, second, metric, max_tokens=max_tokens, max_layers=max_layers, token_offset=token_offset
        )

    @app.get("/api/inspections", tags=["inspections"])
    def inspections() -> list[InspectionSummary]:
        """``inspect --out`` folders under the served directory."""
        return data.find_inspections(state.root, state.json_cache)

    @app.get("/api/inspections/{inspection_id:path}", tags=["inspections"])
    def inspection(inspection_id: str) -> InspectionDetail:
        return data.inspection_detail(state.root, inspection_id, state.json_cache)

    @app.get("/api/files/{file_path:path}", tags=["inspections"], response_class=FileResponse)
    def files(file_path: str) -> FileResponse:
        """A PNG or JSON file inside the served directory (figures of inspections)."""
        path, media = data.served_file(state.root, file_path)
        return FileResponse(path, media_type=media, headers={"X-Content-Type-Options": "nosniff"})


# -- jobs --------------------------------------------------------------------------------------
def _job_routes(app: FastAPI, state: ServedDirectory) -> None:
    @app.post("/api/jobs", tags=["jobs"], status_code=201)
    def start(request: Annotated[JobRequest, Body()]) -> Job:
        """Start ``analyze`` on a bundle in the background (one job runs at a time by default)."""
        path = state.path(request.bundle)
        state.bundle(path)
        options = check_options(request.options, state.jobs.time_limit_s)
        options["baseline"] = [str(state.path(b)) for b in options["baseline"]]
        return state.jobs.submit(path, request.bundle, options)

    @app.get("/api/jobs", tags=["jobs"])
    def jobs() -> list[Job]:
        return state.jobs.list()

    @app.get("/api/jobs/{job_id}", tags=["jobs"])
    def job(job_id: str) -> Job:
        return state.jobs.get(job_id)

    @app.delete("/api/jobs/{job_id}", tags=["jobs"])
    def cancel(job_id: str) -> Job:
        """Cancel a queued or running job (a running analysis is stopped at once)."""
        return state.jobs.cancel(job_id)

    @app.get(
        "/api/jobs/{job_id}/events",
        tags=["jobs"],
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}, "description": "one JSON Job per event"}},
    )
    def events(job_id: str) -> StreamingResponse:
        """Server-sent events: the job as JSON on every change; the stream ends with the job."""
        state.jobs.get(job_id)  # 404 before the stream starts
        return StreamingResponse(
            _job_events(state.jobs, job_id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


async def _job_events(jobs: JobManager, job_id: str) -> AsyncIterator[str]:
    seen = -1
    quiet = 0.0
    while True:
        version = jobs.version(job_id)
        if version != seen:
            job = jobs.get(job_id)
            seen = version
            quiet = 0.0
            yield f"data: {job.model_dump_json()}\n\n"
            if job.state in ENDED_STATES:
                return
        await asyncio.sleep(0.1)
        quiet += 0.1
        if quiet >= SSE_KEEPALIVE_S:
            quiet = 0.0
            yield ": keep-alive\n\n"


# -- the dashboard -----------------------------------------------------------------------------
def _static_routes(app: FastAPI, static: Path) -> None:
    @app.get("/assets/{asset:path}", include_in_schema=False)
    def assets(asset: str) -> Response:
        path = resolve_inside(static.resolve(), f"assets/{asset}", "asset")
        if not path.is_file():
            raise NotFound(f"asset {asset!r} does not exist")
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media)

    @app.get("/{route:path}", include_in_schema=False)
    def index(route: str) -> Response:
        if route == "api" or route.startswith("api/"):
            raise NotFound(f"no API endpoint /{route}; see /docs")
        page = static / "index.html"
        if not page.is_file():
            return HTMLResponse(NOT_BUILT)
        top = static / route
        if route and re.fullmatch(r"[\w.-]+\.(ico|png|svg|txt|json|webmanifest)", route) and top.is_file():
            return FileResponse(top)
        return FileResponse(page, media_type="text/html")


# -- serve -------------------------------------------------------------------------------------
def url_of(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``.

    Raises:
        ForensicsError: the port is in use, or the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno in (98, 48):  # EADDRINUSE (Linux, macOS)
            raise ForensicsError(f"port {port} is in use; pass --port") from None
        raise ForensicsError(f"cannot listen on {host}:{port}: {exc.strerror}; pass another --host or --port") from None
    return sock


def serve(
    root: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    token: str | None = None,
    time_limit_s: float = DEFAULT_TIME_LIMIT_S,
    echo: Callable[[str], None] = print,
) -> None:
    """Serve ``root`` until interrupted: checks first (directory, token for a non-loopback
    host, a free port), then prints the URL and runs uvicorn on the bound socket.

    Raises:
        ForensicsError: a bad directory, a missing token, a busy port.
    """
    import uvicorn

    app = create_app(root, token, host=host, time_limit_s=time_limit_s)
    sock = bind(host, port)
    echo(url_of(host, sock.getsockname()[1]))
    if token:
        echo("API calls need the token: 'Authorization: Bearer TOKEN' or ?token=TOKEN")
    # On Ctrl-C / SIGTERM, requests still running (an influence replay) get 5 s, not forever.
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def openapi_text(app: FastAPI) -> str:
    """The schema as ``server/openapi.json`` stores it (sorted keys, 2-space indent, newline)."""
    return json.dumps(app.openapi(), indent=2, sort_keys=True) + "\n"
