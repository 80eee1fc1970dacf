"""The FastAPI app of ``exlab-sync serve``: a thin layer over the client, the queue and creation.json.

Routes (JSON shapes in :mod:`exlab_wizard.service.shapes`; every error is
``{"detail": <one readable line>, "kind": ...}``, also for an ``OSError`` no
route expected: 409, ``local_file_vanished`` or ``unknown``, never a traceback):

- reads, open on the bound address: ``GET /api/jobs``, ``/api/jobs/{id}``,
  ``/api/problems``, ``/api/overrides``, ``/api/equipment``, ``/api/watcher``,
  ``/api/events`` (server-sent events), ``/healthz``, ``/metrics``, ``/``;
- mutations (every ``POST``, checked by :class:`Guard` before a route runs):
  ``/api/enqueue``, ``/api/jobs/{id}/retry``, ``/api/verify``,
  ``/api/overrides``, ``/api/overrides/{id}/revoke``, ``/api/login-codes``,
  ``/logout``.

:class:`Guard` is one ASGI layer in front of every route, so no mutation can
forget it: a body over :data:`MAX_BODY_BYTES` is 413 (by ``Content-Length``
or as it streams), then a ``POST`` needs the bearer token or a browser
session with this server's ``Origin`` (401 / 403, see
:mod:`exlab_wizard.service.auth`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import getpass
import html
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sse_starlette.sse import EventSourceResponse

from exlab_wizard.cache import CacheError, CreationWriter
from exlab_wizard.config.models import Config
from exlab_wizard.service import shapes
from exlab_wizard.service.auth import COOKIE_NAME, SESSION_TTL_S, Auth, AuthOutcome
from exlab_wizard.service.dashboard import install_dashboard
from exlab_wizard.service.events import EventHub, FeedMessage
from exlab_wizard.service.metrics import NasFacts, ServiceMetrics
from exlab_wizard.service.runpaths import OutsideRoots, resolve_run_path
from exlab_wizard.sync.failures import local_errno_kind
from exlab_wizard.sync.gate import evaluate_run
from exlab_wizard.sync.nas_client import (
    EnqueueError,
    LocalDamageError,
    NASSyncClient,
    RunFolderMissingError,
    RunIncompleteError,
)
from exlab_wizard.sync.policy import bandwidth as bw_policy
from exlab_wizard.sync.queue_damage import QueueDamaged
from exlab_wizard.sync.queue_stats import QueueStats
from exlab_wizard.sync.states import IllegalTransition, SyncJobState
from exlab_wizard.sync.transports import TransportError
from exlab_wizard.validator import Validator
from exlab_wizard.validator.override_ops import OverrideError, add_override, list_overrides, revoke_override

__all__ = ["MAX_BODY_BYTES", "ApiError", "Guard", "ServiceContext", "Watcher", "create_app"]

#: The largest request body accepted (every body of this API is a few hundred bytes).
MAX_BODY_BYTES = 64 * 1024
_STATE_VALUES = [s.value for s in SyncJobState]
#: The error kind of every answer once the queue database is found damaged (503).
_QUEUE_DAMAGED = "queue_damaged"

logger = logging.getLogger(__name__)


class Watcher(Protocol):
    """What the service needs of the completion watcher."""

    async def scan_once(self) -> Any: ...
    async def run(self) -> None: ...
    def blocked(self) -> Any: ...
    def incomplete(self) -> Any: ...


@dataclasses.dataclass
class ServiceContext:
    """Everything the routes use, made once by :func:`exlab_wizard.service.server.run_service`."""

    config: Config
    client: NASSyncClient
    stats: QueueStats
    hub: EventHub
    auth: Auth
    metrics: ServiceMetrics
    facts: NasFacts
    base_url: str
    writer: CreationWriter = dataclasses.field(default_factory=CreationWriter)
    validator: Validator | None = None
    watcher: Watcher | None = None
    #: Recorded as ``operator`` of an override when the request names none.
    operator: str = dataclasses.field(default_factory=lambda: f"{getpass.getuser()} (api)")

    def local_root_missing(self, equipment_id: str) -> bool | None:
        """Whether the watcher's last pass found the equipment's ``<local_root>/<id>`` missing (None: no watcher)."""
        missing = getattr(self.watcher, "missing_roots", None)
        return None if missing is None else equipment_id in missing()

    def __post_init__(self) -> None:
        if self.validator is None:
            self.validator = Validator(self.config.validator)


class ApiError(Exception):
    """An answer other than 2xx: ``status``, a ``kind`` for programs and one readable line."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


def _damaged_page(damage: QueueDamaged) -> str:
    """The dashboard's whole page while the queue is damaged: the one line, nothing that reads the queue."""
    return (
        "<!doctype html><title>exlab-sync: queue damaged</title>"
        "<h1>exlab-sync has stopped syncing and cleaning up</h1>"
        f"<p><strong>{html.escape(str(damage))}</strong></p>"
        "<p>What to do: docs/recovery.md, <em>A damaged queue database</em>. <code>/healthz</code> says the same.</p>"
    )


# --------------------------------------------------------------------------- the guard


def _json_reply(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


class Guard:
    """ASGI layer: body size limit (413), then authentication of every ``POST`` (401 / 403)."""

    def __init__(self, app: Callable[..., Awaitable[None]], auth: Auth, limit: int = MAX_BODY_BYTES):
        self.app, self.auth, self.limit = app, auth, limit

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        too_big = _json_reply(413, shapes.error("body_too_large", f"the request body is over {self.limit} bytes"))
        length = headers.get("content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > self.limit):
            await too_big(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                await too_big(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        if scope["method"] == "POST":
            cookie = _cookie(headers.get("cookie", ""), COOKIE_NAME)
            outcome = self.auth.check_mutation(headers.get("authorization"), cookie, headers.get("origin"))
            if outcome is not AuthOutcome.OK:
                await _auth_reply(outcome)(scope, receive, send)
                return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


def _auth_reply(outcome: AuthOutcome) -> JSONResponse:
    if outcome is AuthOutcome.MISSING:
        return _json_reply(
            401,
            shapes.error(
                "unauthenticated",
                "this call changes something: send 'Authorization: Bearer <token>' "
                "(the token is in <state_dir>/api-token) or log in from the address "
                "serve printed",
            ),
            {"WWW-Authenticate": "Bearer"},
        )
    return _json_reply(
        403, shapes.error("forbidden", "wrong token, or a browser request not from this server's origin")
    )


# --------------------------------------------------------------------------- bodies


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunBody(_Strict):
    run_path: str = Field(min_length=1, max_length=4096, description="Absolute path of the run folder")


class RetryBody(_Strict):
    accept_local: bool = Field(False, description="Declare locally damaged files the new truth (see DESIGN)")


class OverrideBody(_Strict):
    run_path: str = Field(min_length=1, max_length=4096)
    rule: str = Field(min_length=1, max_length=100, description="A hard rule name")
    reason: str = Field(min_length=1, max_length=2000)
    path: str | None = Field(None, max_length=4096, description="The finding's path that prompted it (a note)")
    expires_at: str | None = Field(None, max_length=64, description="ISO 8601 with a time zone; null: never")
    operator: str | None = Field(None, max_length=200, description="Who decides (default: the user serve runs as)")


class RevokeBody(_Strict):
    run_path: str = Field(min_length=1, max_length=4096)
    reason: str = Field(min_length=1, max_length=2000)
    operator: str | None = Field(None, max_length=200)


def _readable(exc: RequestValidationError | ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


# --------------------------------------------------------------------------- the app


def create_app(ctx: ServiceContext, *, allowed_hosts: list[str] | None = None) -> Any:
    """The ASGI app: FastAPI routes behind the :class:`Guard`.

    ``allowed_hosts``: the ``Host`` header values accepted (a page served on
    loopback refuses other names, so a site that points its own name at
    127.0.0.1 cannot read the queue); None accepts any.
    """
    app = FastAPI(
        title="exlab-sync",
        description="Lab runs to the NAS, verified. Every POST needs `Authorization: Bearer <token>` "
        "(`<state_dir>/api-token`) or a browser session from the login address `serve` prints.",
        version="1",
    )
    app.state.ctx = ctx

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _json_reply(exc.status, shapes.error(exc.kind, exc.message), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _json_reply(
            422,
            shapes.error("invalid_request", _readable(exc), errors=json.loads(json.dumps(exc.errors(), default=str))),
        )

    @app.exception_handler(QueueDamaged)
    async def _queue_damaged(request: Request, exc: QueueDamaged) -> Response:
        # Logged once where it was found; every page and call says the same line, no traceback.
        if request.url.path.startswith("/api/"):
            return _json_reply(503, shapes.error(_QUEUE_DAMAGED, str(exc)))
        return HTMLResponse(_damaged_page(exc), status_code=503, headers={"Cache-Control": "no-store"})

    @app.exception_handler(OSError)
    async def _os_error(request: Request, exc: OSError) -> JSONResponse:
        # The net under every route: the file system refused something no route expected.
        # The traceback goes to the server's log, never into the answer.
        logger.error("%s %s: %s", request.method, request.url.path, exc, exc_info=exc)
        where = f"{exc.filename}: " if exc.filename else ""
        return _json_reply(409, shapes.error(local_errno_kind(exc.errno).value, f"{where}{exc.strerror or exc}"))

    def run_path(text: str) -> Path:
        try:
            return resolve_run_path(ctx.config, text)[0]
        except OutsideRoots as exc:
            raise ApiError(400, "outside_roots", str(exc)) from None

    # ------------------------------------------------------------------ jobs

    @app.get("/api/jobs", summary="Jobs, oldest first, one page at a time")
    async def jobs(
        state: str | None = Query(None, description=f"One of {', '.join(_STATE_VALUES)}"),
        equipment_id: str | None = Query(None, max_length=100),
        limit: int = Query(100, ge=1, le=1000),
        after: str | None = Query(None, max_length=100, description="next_after of the previous page"),
    ) -> dict[str, Any]:
        if state is not None and state not in _STATE_VALUES:
            raise ApiError(422, "invalid_request", f"state must be one of {', '.join(_STATE_VALUES)}, not {state!r}")
        try:
            page = await asyncio.to_thread(
                ctx.stats.page, state=state, equipment_id=equipment_id, limit=limit, after=after
            )
        except KeyError:
            raise ApiError(422, "invalid_request", f"after: no job {after!r}") from None
        return shapes.jobs_page(page.jobs, page.next_after)

    @app.get("/api/jobs/{job_id}", summary="One job with its events (oldest first) and live progress")
    async def job(job_id: str) -> dict[str, Any]:
        row = await ctx.client.job(job_id) if os.sep not in job_id else None
        if row is None or row.id != job_id:
            raise ApiError(404, "no_job", f"no job {job_id!r}")
        live = shapes.progress(ctx.client.progress.get(job_id), asyncio.get_running_loop().time())
        return shapes.job_detail(row, live)

    @app.post("/api/enqueue", summary="Gate a run and queue it (does not wait for the completeness signal)")
    async def enqueue(body: RunBody) -> dict[str, Any]:
        run = run_path(body.run_path)
        try:
            handle = await ctx.client.enqueue(run)
        except LocalDamageError as exc:
            raise ApiError(409, "local_damage", str(exc)) from None
        except EnqueueError as exc:
            raise ApiError(422, "not_a_run", str(exc)) from None
        except CacheError as exc:
            raise ApiError(409, f"creation_{exc.kind}", str(exc)) from None
        row = await ctx.client.job(handle.job_id) if handle.job_id else None
        return shapes.handle(handle, row)

    @app.post("/api/jobs/{job_id}/retry", summary="Re-arm a FAILED job")
    async def retry(job_id: str, request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = RetryBody.model_validate_json(raw) if raw.strip() else RetryBody()
        except ValidationError as exc:
            raise ApiError(
                422, "invalid_request", _readable(exc) + ' (the body is optional: {"accept_local": true})'
            ) from None
        try:
            row = await ctx.client.retry(job_id, accept_local=body.accept_local)
        except KeyError:
            raise ApiError(404, "no_job", f"no job {job_id!r}") from None
        except LocalDamageError as exc:
            raise ApiError(409, "local_damage", str(exc)) from None
        except RunFolderMissingError as exc:
            raise ApiError(409, "run_folder_missing", str(exc)) from None
        except RunIncompleteError as exc:
            raise ApiError(409, "run_incomplete", str(exc)) from None
        except IllegalTransition as exc:
            raise ApiError(409, "not_failed", f"only a FAILED job can be retried: {exc}") from None
        return shapes.job_row(row)

    @app.post("/api/verify", summary="Re-hash the local run against its recorded checksums.sha256")
    async def verify(body: RunBody) -> dict[str, Any]:
        run = run_path(body.run_path)
        if not await asyncio.to_thread(run.is_dir):
            raise ApiError(422, "not_a_run", f"{run} is not a run folder")
        try:
            result = await ctx.client.force_verify(run)
        except ValueError as exc:  # a manifest not in sha256sum format, or not readable
            raise ApiError(409, "bad_manifest", str(exc)) from None
        except TransportError as exc:  # a file gone while it was hashed
            raise ApiError(409, exc.kind.value, exc.message) from None
        return shapes.verify_result(str(run), result)

    # ------------------------------------------------------------------ gate and overrides

    @app.get("/api/problems", summary="What the Pre-Sync Gate says about a run (read-only)")
    async def problems(run_path_q: str = Query(..., alias="run_path", max_length=4096)) -> dict[str, Any]:
        run = run_path(run_path_q)
        try:
            result = await asyncio.to_thread(evaluate_run, run, validator=ctx.validator, writer=ctx.writer)
        except (FileNotFoundError, NotADirectoryError):
            raise ApiError(422, "not_a_run", f"{run} is not a run folder") from None
        return shapes.problems(str(run), result)

    def override_error(exc: OverrideError) -> ApiError:
        status = {"not_found": 404, "already_revoked": 409}.get(exc.kind, 422)
        return ApiError(status, exc.kind, exc.message)

    @app.get("/api/overrides", summary="A run's overrides and tombstones, in file order, with their status")
    async def overrides(run_path_q: str = Query(..., alias="run_path", max_length=4096)) -> dict[str, Any]:
        run = run_path(run_path_q)
        try:
            views = await asyncio.to_thread(list_overrides, ctx.writer, run)
        except OverrideError as exc:
            raise override_error(exc) from None
        except CacheError as exc:
            raise ApiError(409, f"creation_{exc.kind}", str(exc)) from None
        return shapes.run_overrides(str(run), views)

    @app.post("/api/overrides", status_code=201, summary="Record an operator override of a hard rule for a run")
    async def add(body: OverrideBody) -> dict[str, Any]:
        run = run_path(body.run_path)
        try:
            entry = await asyncio.to_thread(
                add_override,
                ctx.writer,
                run,
                rule=body.rule,
                reason=body.reason,
                operator=body.operator or ctx.operator,
                path=body.path,
                expires_at=body.expires_at,
            )
        except OverrideError as exc:
            raise override_error(exc) from None
        except CacheError as exc:
            raise ApiError(409, f"creation_{exc.kind}", str(exc)) from None
        return {"run_path": str(run), "override": entry}

    @app.post("/api/overrides/{override_id}/revoke", summary="Revoke an override (a tombstone is appended)")
    async def revoke(override_id: str, body: RevokeBody) -> dict[str, Any]:
        run = run_path(body.run_path)
        try:
            entry = await asyncio.to_thread(
                revoke_override,
                ctx.writer,
                run,
                override_id,
                reason=body.reason,
                operator=body.operator or ctx.operator,
            )
        except OverrideError as exc:
            raise override_error(exc) from None
        except CacheError as exc:
            raise ApiError(409, f"creation_{exc.kind}", str(exc)) from None
        return {"run_path": str(run), "tombstone": entry}

    # ------------------------------------------------------------------ overview

    @app.get("/api/equipment", summary="Per equipment: transport, NAS reachable, bandwidth now, jobs by state")
    async def equipment() -> dict[str, Any]:
        return {"equipment": await asyncio.to_thread(_equipment_cards, ctx)}

    @app.get("/api/watcher", summary="Runs the completion watcher holds back: gate-blocked or incomplete")
    async def watcher() -> dict[str, Any]:
        if ctx.watcher is None:
            return {"running": False, "blocked": [], "incomplete": []}
        return {
            "running": True,
            "blocked": _plain(ctx.watcher.blocked()),
            "incomplete": _plain(ctx.watcher.incomplete()),
        }

    @app.get("/api/events", summary="Server-sent events: transition, event, progress")
    async def events(request: Request) -> EventSourceResponse:
        return EventSourceResponse(_feed(ctx.hub, request.headers.get("last-event-id")), ping=15)

    @app.get(
        "/healthz",
        summary="Liveness: the service runs (and whether it runs the workers); 503 once the queue is damaged",
    )
    async def healthz() -> Response:
        damage = ctx.client.queue_damage
        body: dict[str, Any] = {"ok": damage is None, "runs_workers": ctx.client.runs_workers}
        body["watcher"] = ctx.watcher is not None
        if damage is None:
            return JSONResponse(body)
        # The service runs but syncs and deletes nothing: a monitor reading only the status sees it too.
        body["queue_damaged"] = shapes.error(damage.kind.value, str(damage))
        return JSONResponse(body, status_code=503)

    @app.get("/metrics", summary="Prometheus text format")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(await asyncio.to_thread(ctx.metrics.text), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ browser login and page

    @app.get("/login", include_in_schema=False)
    async def login(code: str = Query("", max_length=200)) -> Response:
        session = ctx.auth.redeem_login_code(code)
        if session is None:
            return HTMLResponse(
                "<!doctype html><title>exlab-sync</title><p>This login address was used already "
                "or has expired. Ask for a new one: <code>exlab-sync serve</code> prints one at "
                "start, and <code>exlab-sync login-url</code> on this machine makes another.</p>",
                status_code=403,
            )
        reply = RedirectResponse("/", status_code=303)
        reply.set_cookie(COOKIE_NAME, session, max_age=int(SESSION_TTL_S), httponly=True, samesite="strict", path="/")
        return reply

    @app.post("/api/login-codes", summary="A new one-time browser login address")
    async def login_codes() -> dict[str, Any]:
        return {"login_url": f"{ctx.base_url}/login?code={ctx.auth.new_login_code()}"}

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        ctx.auth.end_session(request.cookies.get(COOKIE_NAME))
        reply = RedirectResponse("/", status_code=303)
        reply.delete_cookie(COOKIE_NAME, path="/")
        return reply

    install_dashboard(app, ctx)  # "/", its fragments, chart and static files

    return Guard(_hosts(app, allowed_hosts), ctx.auth)


def _hosts(app: FastAPI, allowed: list[str] | None) -> Any:
    if not allowed:
        return app
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    return TrustedHostMiddleware(app, allowed_hosts=allowed)


def _plain(value: Any) -> Any:
    """A watcher answer as JSON: objects with ``to_dict``, dataclasses, paths, mappings and lists."""
    if hasattr(value, "to_dict"):
        return _plain(value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, (Path, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, dt.datetime):
        return shapes.iso(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _equipment_cards(ctx: ServiceContext) -> list[dict[str, Any]]:
    counts: dict[str, dict[str, int]] = {eq.id: dict.fromkeys(_STATE_VALUES, 0) for eq in ctx.config.equipment}
    for row in ctx.stats.by_equipment_state():
        counts.setdefault(row.equipment_id, dict.fromkeys(_STATE_VALUES, 0))[row.state] = row.jobs
    now = dt.datetime.now(dt.UTC)
    cards = []
    for eq in ctx.config.equipment:
        bandwidth = eq.transport.bandwidth
        change = bw_policy.next_change(bandwidth, now)
        cards.append(
            {
                "id": eq.id,
                "label": eq.label,
                "transport": eq.transport.type,
                "nas_root": eq.nas_root,
                "nas_reachable": ctx.facts.reachable.get(eq.id),
                "nas_probed_at": ctx.facts.probed_at.get(eq.id),
                "nas_silent_since": ctx.facts.silent_since.get(eq.id),
                "bwlimit_kibps_now": bw_policy.limit_kibps(bandwidth, now),
                "bwlimit_next_change": shapes.iso(change),
                "jobs": counts[eq.id],
                "bytes_reclaimable": ctx.facts.reclaimable.get(eq.id, 0),
                "local_root_missing": ctx.local_root_missing(eq.id),
            }
        )
    return cards


async def _feed(hub: EventHub, last_event_id: str | None) -> Any:
    """The SSE stream of one subscriber: a backlog after ``Last-Event-ID``, then live messages."""
    sub = hub.subscribe()
    seen = 0
    try:
        if last_event_id and last_event_id.isdigit():
            for message in await asyncio.to_thread(hub.backlog, int(last_event_id)):
                seen = max(seen, int(message.id or 0))
                yield _sse(message)
        while True:
            message: FeedMessage = await sub.queue.get()
            if message.event == "shutdown":
                return
            if message.id is not None:
                if int(message.id) <= seen:
                    continue
                seen = int(message.id)
            yield _sse(message)
    finally:
        hub.unsubscribe(sub)


def _sse(message: FeedMessage) -> dict[str, Any]:
    out = {"event": message.event, "data": json.dumps(message.data)}
    if message.id is not None:
        out["id"] = message.id
    return out
