"""The JSON shapes of the HTTP API, in one place (the CLI's ``--json`` uses the same functions).

Every function takes a library object and returns plain JSON values: job rows
as :meth:`SyncJobRow.to_dict` gives them, times as ISO 8601 UTC text, states
and kinds as their string values. A failure or outcome is told by a ``kind``,
never by message text.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from exlab_wizard.sync.gate import GateResult
from exlab_wizard.sync.nas_client import SyncJobHandle, TransferProgress
from exlab_wizard.sync.queue import SyncJobRow
from exlab_wizard.sync.reaper import ReaperOutcome
from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.verifier import VerifyResult
from exlab_wizard.validator import Finding
from exlab_wizard.validator.override_ops import OverrideView

__all__ = [
    "cleanup_report",
    "error",
    "finding",
    "handle",
    "iso",
    "job_detail",
    "job_row",
    "jobs_page",
    "override_view",
    "problems",
    "progress",
    "queue_counts",
    "run_overrides",
    "run_status",
    "verify_result",
]


def iso(moment: dt.datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def error(kind: str, message: str, **extra: Any) -> dict[str, Any]:
    """``{"detail": <one readable line>, "kind": <machine-readable kind>, ...}``: every error body."""
    return {"detail": message, "kind": kind, **extra}


def job_row(row: SyncJobRow) -> dict[str, Any]:
    """A job as listed: :meth:`SyncJobRow.to_dict` without the events."""
    out = row.to_dict()
    out.pop("events", None)
    return out


def progress(item: TransferProgress | None, now: float | None = None) -> dict[str, Any] | None:
    """A transfer in flight: phase, bytes done and total, and the mean rate so far (bytes/s)."""
    if item is None:
        return None
    rate = None
    if now is not None and now > item.started_at:
        rate = item.bytes_done / (now - item.started_at)
    return {"phase": item.phase, "bytes_done": item.bytes_done, "bytes_total": item.bytes_total, "rate_bps": rate}


def job_detail(row: SyncJobRow, live: dict[str, Any] | None = None) -> dict[str, Any]:
    """One job with its events (oldest first) and its live progress (None when nothing is in flight)."""
    return {**row.to_dict(), "progress": live}


def jobs_page(rows: Iterable[SyncJobRow], next_after: str | None) -> dict[str, Any]:
    """``{"jobs": [...], "next_after": <id to pass as ?after= for the next page> | null}``."""
    return {"jobs": [job_row(r) for r in rows], "next_after": next_after}


def finding(item: Finding) -> dict[str, Any]:
    return item.to_dict()


def handle(item: SyncJobHandle, row: SyncJobRow | None = None) -> dict[str, Any]:
    """What enqueue answered: ``state`` is ``queued`` (a job exists: ``job``) or ``blocked`` (findings)."""
    return {
        "job_id": item.job_id or None,
        "state": item.state.value,
        "run_path": str(item.run_path),
        "blocking_findings": [finding(f) for f in item.blocking_findings],
        "job": job_row(row) if row is not None else None,
    }


def verify_result(run_path: str, result: VerifyResult) -> dict[str, Any]:
    return {
        "run_path": run_path,
        "ok": result.ok,
        "missing": list(result.missing),
        "extra": list(result.extra),
        "different": list(result.different),
        "unverifiable": list(result.unverifiable),
        "checked": result.checked,
        "manifest_digest": result.manifest_digest,
    }


def override_view(view: OverrideView) -> dict[str, Any]:
    """An entry of ``validation_overrides`` as stored, plus ``status`` and ``revoked_by``."""
    return view.to_dict()


def queue_counts(rows: Iterable[SyncJobRow]) -> dict[str, Any]:
    """``{"total": n, "states": {<every state>: count}}``: the queue at a glance."""
    states = {state.value: 0 for state in SyncJobState}
    total = 0
    for row in rows:
        states[row.state.value] += 1
        total += 1
    return {"total": total, "states": states}


def run_status(run_path: str, row: SyncJobRow | None, waiting_reason: str | None = None) -> dict[str, Any]:
    """One run: ``status`` is ``none`` or the job's state; ``job`` the job with its events (or null).

    ``waiting_reason``: with no job, why the completion watcher does not
    enqueue the run yet (its completeness signal), else null.
    """
    return {
        "run_path": run_path,
        "status": row.state.value if row is not None else "none",
        "job": job_detail(row) if row is not None else None,
        "waiting_reason": waiting_reason if row is None else None,
    }


def problems(run_path: str, result: GateResult) -> dict[str, Any]:
    """What the gate says about one run: every finding and the blocking ones (flags set)."""
    return {
        "run_path": run_path,
        "eligible": result.eligible,
        "findings": [finding(f) for f in result.findings],
        "blocking": [finding(f) for f in result.blocking],
    }


def run_overrides(run_path: str, views: Iterable[OverrideView]) -> dict[str, Any]:
    return {"run_path": run_path, "overrides": [override_view(v) for v in views]}


def _outcome(item: ReaperOutcome) -> dict[str, Any]:
    return {
        "job_id": item.job_id or None,
        "run_path": item.run_path or None,
        "action": item.action,
        "code": str(item.code) if item.code is not None else None,
        "reason": item.reason,
        "files": item.files,
        "bytes": item.bytes,
    }


def cleanup_report(outcomes: Iterable[ReaperOutcome], *, dry_run: bool, enabled: bool) -> dict[str, Any]:
    """One cleanup pass: each job's last outcome, and the bytes freed (or that would be)."""
    items = [_outcome(o) for o in outcomes]
    freed = sum(o["bytes"] for o in items if o["action"] in ("deleted", "would_delete"))
    return {"dry_run": dry_run, "cleanup_enabled": enabled, "outcomes": items, "bytes_freed": freed}
