"""The dashboard at ``/``: server-rendered HTML over the same facts as the API.

Routes (all reads, open on the bound address like the API's reads):

- ``GET /``: the whole page;
- ``GET /partials/{name}``: one section as an HTML fragment, for the page's
  script to swap in when the feed says it changed (``name`` is one of
  :data:`PARTIALS`);
- ``GET /charts/verified.svg``: bytes verified per hour over the last 24
  hours, drawn here as SVG;
- ``/static/...``: the page's one hand-written script and its style sheet.

The page never holds the API token. Its buttons post with the browser's
session cookie (set by the one-time login address ``serve`` prints), which
the API's guard checks with the ``Origin`` header; without a session the page
says it is read-only and its buttons are disabled. Every value reaches the
HTML through Jinja2 with autoescaping on (also in the SVG); the script writes
text with ``textContent`` and swaps only fragments this server rendered.

Live updates: the script listens on ``/api/events``. A ``progress`` message
moves its job's bar, rate and ETA in place; a ``transition`` (or a
``watcher`` message, published here from the completion watcher) makes the
script fetch the affected fragments again; a transition to ``verified`` also
reloads the chart.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from exlab_wizard.service.auth import COOKIE_NAME
from exlab_wizard.service.events import FeedMessage
from exlab_wizard.sync.failures import FailureKind
from exlab_wizard.sync.policy import bandwidth as bw_policy
from exlab_wizard.sync.queue import SyncJobRow
from exlab_wizard.sync.queue_damage import classified, known
from exlab_wizard.sync.states import SyncJobState

if TYPE_CHECKING:
    from fastapi import FastAPI

    from exlab_wizard.service.app import ServiceContext

__all__ = [
    "FAILURE_SENTENCES",
    "PARTIALS",
    "VerifiedChart",
    "WaitingBytes",
    "failure_sentence",
    "install_dashboard",
    "verified_per_hour",
]

_HERE = Path(__file__).parent
S = SyncJobState
_STATES = [s.value for s in SyncJobState]
#: Jobs whose data is not yet verified on the NAS: their bytes are "waiting to sync".
WAITING_STATES = (S.QUEUED.value, S.RUNNING.value, S.AWAITING_VERIFY.value, S.FAILED.value)
#: The fragments the page can fetch again.
PARTIALS = ("equipment", "totals", "running", "failed", "blocked")
#: Rows shown per table; the counts on the equipment cards are always complete.
TABLE_LIMIT = 50

#: A failed job's reason in plain words, by its error kind (``last_error`` is shown beneath it).
#: Every :class:`FailureKind` has one (a test checks).
FAILURE_SENTENCES: dict[FailureKind, str] = {
    FailureKind.NETWORK: "The NAS could not be reached (network down, share not mounted, or no answer), and the "
    "retries ran out.",
    FailureKind.UNKNOWN: "An unexpected error stopped the transfer, and the retries ran out.",
    FailureKind.AUTH: "The NAS refused the login (SSH key, user name, host key or permissions): fix the access, "
    "then retry.",
    FailureKind.HASH_MISMATCH: "The copy on the NAS did not match the local files, even after a second transfer. "
    "Nothing local was deleted.",
    FailureKind.LOCAL_FILE_VANISHED: "A file of the run disappeared or changed while it was being copied.",
    FailureKind.REMOTE_WRITE_REFUSED: "The NAS refused to write (read-only share, missing permission or a full disk).",
    FailureKind.REMOTE_CONFLICT: "The run's folder on the NAS already holds files that are not part of this run; "
    "nothing was overwritten. Move them away, then retry.",
    # Retry here posts {} and is refused for this kind: the sentence names the two commands (as the CLI does).
    FailureKind.LOCAL_DAMAGE: "Local files changed content without their size or time changing (possible disk "
    "damage); Retry alone is refused while the damage is there. `exlab-sync restore RUN` brings the verified NAS "
    "copy back, or `exlab-sync retry --accept-local JOB_ID` sends the local files as the new truth (Details names "
    "this run's).",
    FailureKind.REMOTE_CHANGED_DURING_CLEANUP: "The NAS copy changed while cleanup checked it, so nothing local was "
    "deleted. Retry to transfer and verify again.",
    FailureKind.LOCAL_CHANGED_DURING_CLEANUP: "Local files changed while cleanup checked them, so nothing was "
    "deleted. Retry to transfer and verify again.",
    FailureKind.VERIFY_SKIPPED_OVERSIZE: "A file is larger than the NAS may stream back for checking "
    "(verify_max_stream_bytes), so the copy could not be verified. Nothing local was deleted.",
    FailureKind.VERIFY_UNREADABLE: "The NAS could not read a copied file back to check it (permission or a read "
    "error), so the copy could not be verified. Nothing local was deleted.",
    FailureKind.LOCAL_CHANGED: "Local files changed after the run was verified; the run is sent again.",
    FailureKind.RUN_FOLDER_MISSING: "The run folder has been gone for a day while its parent folder is there "
    "(renamed or deleted?). Nothing was deleted by the engine; if the folder comes back, retry.",
}


def failure_sentence(kind: str | None) -> str:
    """The plain-words reason for a failure ``kind`` (an unknown kind is named, never guessed at)."""
    if not kind:
        return "The job failed without a recorded kind."
    return FAILURE_SENTENCES.get(kind, f"The job failed ({kind}).")


# --------------------------------------------------------------------------- formatting


def human_bytes(value: float | None) -> str:
    """``1536`` -> ``1.5 KiB``; None -> an en dash."""
    if value is None:
        return "–"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # not reached


def human_duration(seconds: float | None) -> str:
    """``3725`` -> ``1 h 2 min``; None or negative -> an en dash."""
    if seconds is None or seconds < 0:
        return "–"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if minutes < 10 and secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    return f"{hours // 24} days"


def local_time(moment: dt.datetime | str | float | None, now: dt.datetime | None = None) -> str:
    """A moment (aware datetime, ISO text or epoch seconds) in the workstation's local time, as a person reads it.

    ``18:00 CET`` today, ``Mon 3 Feb 18:00 CET`` on another day; None: an en dash.
    """
    if moment is None:
        return "–"
    if isinstance(moment, (int, float)):
        moment = dt.datetime.fromtimestamp(moment, dt.UTC)
    elif isinstance(moment, str):
        moment = dt.datetime.fromisoformat(moment)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)  # the queue's times are UTC
    here = moment.astimezone()
    today = (now or dt.datetime.now(dt.UTC)).astimezone().date()
    clock = here.strftime("%H:%M %Z").strip()
    return clock if here.date() == today else f"{here.strftime('%a')} {here.day} {here.strftime('%b')} {clock}"


# --------------------------------------------------------------------------- facts the API does not keep


@contextlib.contextmanager
def _read_only(db_path: Path) -> Iterator[sqlite3.Connection]:
    damage = known(db_path)
    if damage is not None:
        raise damage
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10.0, isolation_level=None)
    conn.row_factory = sqlite3.Row
    try:
        with classified(db_path):  # a damaged file: QueueDamaged, as from the queue (the app answers 503)
            yield conn
    finally:
        conn.close()


def verified_per_hour(
    db_path: Path, equipment_ids: list[str], now: dt.datetime, hours: int = 24
) -> list[tuple[dt.datetime, int]]:
    """Bytes verified in each of the last ``hours`` whole hours up to ``now``, oldest first.

    A job's bytes are the sizes recorded at its verification (``verified_files``),
    counted in the hour of its latest verification (``jobs.verified_at``).
    One index range per equipment; no table yet means nothing verified yet.
    """
    end = now.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0) + dt.timedelta(hours=1)
    start = end - dt.timedelta(hours=hours)
    buckets = [0] * hours
    sql = (
        "SELECT j.verified_at AS at, SUM(f.size) AS total FROM jobs j JOIN verified_files f ON f.job_id = j.id"
        " WHERE j.equipment_id = ? AND j.verified_at >= ? GROUP BY j.id"
    )
    with _read_only(db_path) as conn:
        for equipment_id in equipment_ids:
            try:
                rows = conn.execute(sql, (equipment_id, start.isoformat(timespec="microseconds"))).fetchall()
            except sqlite3.OperationalError as exc:  # the reaper makes verified_files on its first use
                if "no such table" in str(exc):
                    break
                raise
            for row in rows:
                at = dt.datetime.fromisoformat(row["at"])
                index = int((at - start).total_seconds() // 3600)
                if 0 <= index < hours:
                    buckets[index] += int(row["total"] or 0)
    return [(start + dt.timedelta(hours=i), buckets[i]) for i in range(hours)]


class WaitingBytes:
    """Bytes of the runs not yet verified on the NAS (queued, transferring, checking, failed), by equipment.

    A run's size is walked once (symbolic links not followed) and kept while
    its job waits; a refresh walks at most ``max_new_walks`` new runs, so a
    huge backlog is counted over several refreshes (``complete`` says when
    every waiting run is counted). Thread-safe.
    """

    def __init__(self, db_path: Path, *, max_new_walks: int = 200, reuse_s: float = 10.0):
        self.db_path = db_path
        self.max_new_walks = max_new_walks
        self.reuse_s = reuse_s
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()
        self._last: tuple[float, int | None, tuple[dict[str, int], dict[str, int], bool]] | None = None

    @staticmethod
    def _walk(run: str) -> int:
        total = 0
        for folder, _dirs, files in os.walk(run):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(folder, name)).st_size
        return total

    def refresh(self, version: int | None = None) -> tuple[dict[str, int], dict[str, int], bool]:
        """``(bytes by equipment, runs by equipment, complete)`` for the waiting jobs now.

        ``version``: the queue's last event id. An answer for the same version
        younger than ``reuse_s`` seconds is given again, so many open pages
        refreshing after the same transition cost one query.
        """
        with self._lock:
            last = self._last
        if (
            last is not None
            and version is not None
            and last[1] == version
            and time.monotonic() - last[0] < self.reuse_s
        ):
            return last[2]
        marks = ",".join("?" * len(WAITING_STATES))
        with _read_only(self.db_path) as conn:
            rows = conn.execute(
                f"SELECT run_path, equipment_id FROM jobs WHERE state IN ({marks})", WAITING_STATES
            ).fetchall()
        with self._lock:
            known = dict(self._sizes)
        walked = 0
        sizes: dict[str, int] = {}
        complete = True
        by_bytes: dict[str, int] = {}
        by_runs: dict[str, int] = {}
        for row in rows:
            run, eq = row["run_path"], row["equipment_id"]
            if run not in known:
                if walked >= self.max_new_walks:
                    complete = False
                    continue
                known[run] = self._walk(run)
                walked += 1
            sizes[run] = known[run]
            by_bytes[eq] = by_bytes.get(eq, 0) + known[run]
            by_runs[eq] = by_runs.get(eq, 0) + 1
        with self._lock:
            self._sizes = sizes  # runs no longer waiting are forgotten
            self._last = (time.monotonic(), version, (by_bytes, by_runs, complete))
        return by_bytes, by_runs, complete


# --------------------------------------------------------------------------- the chart


@dataclass(frozen=True)
class VerifiedChart:
    """The SVG chart's geometry: one bar per hour, a labelled y maximum and hour ticks every six hours."""

    width: int = 960
    height: int = 220
    left: int = 70
    right: int = 10
    top: int = 14
    bottom: int = 30

    def context(self, hours: list[tuple[dt.datetime, int]]) -> dict[str, Any]:
        peak = max((b for _at, b in hours), default=0)
        scale = _nice_ceiling(peak)
        plot_w = self.width - self.left - self.right
        plot_h = self.height - self.top - self.bottom
        slot = plot_w / max(1, len(hours))
        bars, ticks = [], []
        for i, (at, value) in enumerate(hours):
            h = 0.0 if scale == 0 else plot_h * value / scale
            local = at.astimezone()
            bars.append(
                {
                    "x": round(self.left + i * slot + 1, 1),
                    "y": round(self.top + plot_h - h, 1),
                    "w": round(max(1.0, slot - 2), 1),
                    "h": round(h, 1),
                    "label": f"{local.strftime('%H:%M')}: {human_bytes(value)} verified",
                }
            )
            if local.hour % 6 == 0:
                ticks.append({"x": round(self.left + i * slot, 1), "label": local.strftime("%H:%M")})
        total = sum(b for _at, b in hours)
        return {
            "chart": self,
            "bars": bars,
            "ticks": ticks,
            "scale_label": human_bytes(scale) if scale else "0 B",
            "mid_y": self.top + plot_h / 2,
            "mid_label": human_bytes(scale / 2) if scale else "",
            "plot_bottom": self.top + plot_h,
            "plot_right": self.width - self.right,
            "total_label": human_bytes(total),
            "empty": total == 0,
        }


def _nice_ceiling(value: int) -> int:
    """The smallest 1, 2 or 5 × 1024^k × 10^j at or above ``value`` (0 stays 0): a round axis maximum."""
    if value <= 0:
        return 0
    unit = 1
    while value > unit * 1024 and unit < 1024**4:
        unit *= 1024
    step = 1
    while True:
        for mult in (1, 2, 5):
            if value <= unit * step * mult:
                return unit * step * mult
        step *= 10


# --------------------------------------------------------------------------- reads for the page


def _equipment_cards(
    ctx: ServiceContext,
    counts: dict[str, dict[str, int]],
    waiting: dict[str, int],
    waiting_runs: dict[str, int],
    now: dt.datetime,
) -> list[dict[str, Any]]:
    cards = []
    for eq in ctx.config.equipment:
        bandwidth = eq.transport.bandwidth
        limit = bw_policy.limit_kibps(bandwidth, now)
        change = bw_policy.next_change(bandwidth, now)
        limit_then = bw_policy.limit_kibps(bandwidth, change + dt.timedelta(seconds=1)) if change else None
        jobs = counts.get(eq.id, dict.fromkeys(_STATES, 0))
        cards.append(
            {
                "id": eq.id,
                "label": eq.label,
                "transport": eq.transport.type,
                "nas_reachable": ctx.facts.reachable.get(eq.id),
                "nas_probed_at": ctx.facts.probed_at.get(eq.id),
                "nas_silent_since": ctx.facts.silent_since.get(eq.id),
                "limit_now": limit,
                "next_change": change,
                "limit_then": limit_then,
                "jobs": jobs,
                "total_jobs": sum(jobs.values()),
                "waiting_bytes": waiting.get(eq.id, 0),
                "waiting_runs": waiting_runs.get(eq.id, 0),
                "reclaimable_bytes": ctx.facts.reclaimable.get(eq.id, 0),
                "local_root_missing": ctx.local_root_missing(eq.id),
            }
        )
    return cards


def _counts(ctx: ServiceContext) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for row in ctx.stats.by_equipment_state():
        counts.setdefault(row.equipment_id, dict.fromkeys(_STATES, 0))[row.state] = row.jobs
    return counts


def _running(ctx: ServiceContext, loop_now: float) -> list[dict[str, Any]]:
    rows: list[SyncJobRow] = []
    for state in (S.RUNNING.value, S.AWAITING_VERIFY.value):
        rows += ctx.stats.page(state=state, limit=TABLE_LIMIT).jobs
    out = []
    for row in rows[:TABLE_LIMIT]:
        live = ctx.client.progress.get(row.id)
        done = live.bytes_done if live else 0
        total = live.bytes_total if live else 0
        elapsed = loop_now - live.started_at if live else 0.0
        # The feed's rate first: a section drawn again between two progress messages keeps what the page showed.
        rate = ctx.hub.rate(row.id) or (done / elapsed if live and elapsed > 0 and done > 0 else None)
        eta = (total - done) / rate if rate and total > done else None
        out.append(
            {
                "job": row,
                "phase": live.phase if live else ("verify" if row.state == S.AWAITING_VERIFY.value else "transfer"),
                "done": done,
                "total": total,
                "rate": rate,
                "eta": eta,
            }
        )
    return out


def _failed(ctx: ServiceContext) -> list[dict[str, Any]]:
    page = ctx.stats.page(state=S.FAILED.value, limit=TABLE_LIMIT)
    return [{"job": row, "sentence": failure_sentence(row.error_kind)} for row in page.jobs]


def _blocked(ctx: ServiceContext) -> list[dict[str, Any]] | None:
    """Blocked runs from the completion watcher (None: no watcher in this service)."""
    if ctx.watcher is None:
        return None
    out = []
    for item in ctx.watcher.blocked():
        data = item.to_dict() if hasattr(item, "to_dict") else dict(item)
        findings = [f for f in data.get("findings", []) if f.get("tier", "hard") == "hard"] or data.get("findings", [])
        findings = [
            {**f, "where": _within(str(data.get("run_path", "")), str(f.get("offending_path", "")))} for f in findings
        ]
        choices: dict[str, str] = {}  # rule -> the first finding's path, in the findings' order
        for f in findings:
            choices.setdefault(str(f.get("rule", "")), str(f.get("offending_path", "")))
        out.append({**data, "findings": findings, "choices": list(choices.items())})
    return out


def _within(run_path: str, path: str) -> str:
    """``path`` shown inside its run: relative to the run folder ('' for the folder itself), else as given."""
    if path == run_path:
        return ""
    return path.removeprefix(run_path.rstrip("/") + "/")


# --------------------------------------------------------------------------- the router


def _templates() -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(_HERE / "templates")), autoescape=True, trim_blocks=True, lstrip_blocks=True
    )
    env.filters.update(bytes=human_bytes, duration=human_duration, when=local_time)
    return Jinja2Templates(env=env)


def _watch_feed(ctx: ServiceContext) -> None:
    """Pass the watcher's decisions to the live feed as ``watcher`` messages (the page refreshes its lists)."""
    add = getattr(ctx.watcher, "add_listener", None)
    if add is None:
        return
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        loop = None

    def relay(event: dict[str, Any]) -> None:
        if event.get("action") not in ("blocked", "enqueued", "adopted", "forgotten"):
            return
        message = FeedMessage(
            "watcher",
            {
                "action": str(event.get("action")),
                "run_path": str(event.get("run_path", "")),
                "equipment_id": str(event.get("equipment_id", "")),
            },
        )
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # called from a worker thread: the hub's queues belong to the loop
            if loop is not None:
                loop.call_soon_threadsafe(ctx.hub.publish, message)
            return
        ctx.hub.publish(message)

    add(relay)


def install_dashboard(app: FastAPI, ctx: ServiceContext) -> None:
    """Add the dashboard's routes and static files to ``app``."""
    templates = _templates()
    waiting = WaitingBytes(ctx.config.queue_db)
    chart = VerifiedChart()
    equipment_ids = [eq.id for eq in ctx.config.equipment]
    _watch_feed(ctx)
    router = APIRouter(include_in_schema=False)

    def section(name: str, loop_now: float) -> dict[str, Any]:
        """The template context of one section (the page renders them all)."""
        now = dt.datetime.now(dt.UTC)
        if name in ("equipment", "totals"):
            by_bytes, by_runs, complete = waiting.refresh(ctx.hub.last_id)
            cards = _equipment_cards(ctx, _counts(ctx), by_bytes, by_runs, now)
            return {
                "cards": cards,
                "waiting_complete": complete,
                "states": _STATES,
                "waiting_total": sum(by_bytes.values()),
                "waiting_runs": sum(by_runs.values()),
                "reclaimable_total": sum(ctx.facts.reclaimable.values()),
            }
        if name == "running":
            return {"running": _running(ctx, loop_now)}
        if name == "failed":
            return {"failed": _failed(ctx)}
        return {"blocked": _blocked(ctx)}

    def logged_in(request: Request) -> bool:
        return ctx.auth.session_valid(request.cookies.get(COOKIE_NAME))

    @router.get("/", response_class=HTMLResponse)
    async def index(request: Request) -> Response:
        loop_now = asyncio.get_running_loop().time()
        context: dict[str, Any] = {}
        for name in ("equipment", "running", "failed", "blocked"):
            context.update(await asyncio.to_thread(section, name, loop_now))
        context.update(logged_in=logged_in(request), partials=PARTIALS, table_limit=TABLE_LIMIT)
        return templates.TemplateResponse(request, "dashboard.html", context, headers=_NO_STORE)

    @router.get("/partials/{name}", response_class=HTMLResponse)
    async def partial(name: str, request: Request) -> Response:
        if name not in PARTIALS:
            return HTMLResponse("no such part of the page", status_code=404)
        context = await asyncio.to_thread(section, name, asyncio.get_running_loop().time())
        context.update(logged_in=logged_in(request), table_limit=TABLE_LIMIT)
        return templates.TemplateResponse(request, f"_{name}.html", context, headers=_NO_STORE)

    @router.get("/charts/verified.svg")
    async def verified_chart(request: Request) -> Response:
        hours = await asyncio.to_thread(verified_per_hour, ctx.config.queue_db, equipment_ids, dt.datetime.now(dt.UTC))
        return templates.TemplateResponse(
            request, "verified_chart.svg", chart.context(hours), media_type="image/svg+xml", headers=_NO_STORE
        )

    app.include_router(router)
    app.mount("/static", StaticFiles(directory=str(_HERE / "static")), name="static")


#: Every dashboard answer is current state: never cached by the browser.
_NO_STORE = {"Cache-Control": "no-store"}
