"""The audit loop on an equipment with an upload limit (DESIGN section 8, docs/cleanup.md).

"Never while a bandwidth window limits the equipment": only a schedule has
windows. An ``upload_mbps`` with no ``schedule`` applies at all times and has
no window, so the audit runs as usual; it used to be skipped for ever there
(no second verify pass, so no cleanup with ``min_verify_passes: 2``, and a
file written into a VERIFIED run never sent). While a schedule window is open
the audit reads nothing from the NAS, but its local check (files added or
edited since verification) still runs, once an audit interval.

These tests call ``audit.audit_pass(force=False)``, what serve's audit loop
runs; ``client.audit_once()`` forces and would pass either way.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import pytest

from exlab_wizard.config import Config, parse_config
from exlab_wizard.sync import audit
from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock
from tests.lab import FILES, Lab, events, running, synced, write_files

S = SyncJobState
LATE = {"late/frame_0099.tif": b"L" * 4096}
EVERY_DAY = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
ALL_WEEK = [{"days": EVERY_DAY, "from": "00:00", "to": "00:00"}]  # a window open at every hour


def open_now(hours: int = 20) -> list[dict[str, Any]]:
    """A window open from an hour ago for ``hours`` more, every day, closed the rest of the day."""
    now = dt.datetime.now().astimezone()
    start, end = now - dt.timedelta(hours=1), now + dt.timedelta(hours=hours)
    return [{"days": EVERY_DAY, "from": start.strftime("%H:%M"), "to": end.strftime("%H:%M")}]


def limited(lab: Lab, *, schedule: list[dict[str, Any]] | None = None, **cleanup: Any) -> Config:
    """Every equipment capped at 50 Mbps (at all times without ``schedule``); the loops run only when asked."""
    data = lab.config_data(sync={"backoff_s": [0.01, 0.01], "scan_interval_s": 3600, "audit_interval_s": 6 * 3600})
    for eq in data["equipment"]:
        eq["transport"]["bandwidth"] = {"upload_mbps": 50, **({"schedule": schedule} if schedule else {})}
    if cleanup:
        opts = {"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": True}
        data["nas_cleanup"] = {**opts, **cleanup}
    return parse_config(data)


async def test_a_file_written_after_verified_on_an_always_limited_equipment_is_sent(lab: Lab) -> None:
    clock = Clock()
    run = lab.make_run("Run_late", files=FILES)
    async with running(limited(lab), clock) as client:
        job = await synced(client, run)
        n_events = len(job.events)
        write_files(run, LATE, mtime=time.time() + 2)  # the instrument's last frame, after VERIFIED
        for _ in range(8):  # two days of audits and cleanup passes
            clock.advance(6)
            await audit.audit_pass(client._ctx, force=False)  # what serve's audit loop runs
            await client.cleanup_once()
            await client.wait_idle(timeout=60)
        after = await client.job(run)
    sent = (lab.nas_copy(run) / "late" / "frame_0099.tif").is_file()
    told = after.state != S.VERIFIED or any("late/frame_0099.tif" in (e.detail or "") for e in after.events)
    assert sent or told, (
        f"late file never sent and never reported: job {after.state.value}; "
        f"events since: {[(e.kind, e.detail) for e in after.events[n_events:]]}"
    )
    assert sent and after.state == S.VERIFIED


DAY_AND_NIGHT = [
    {"days": EVERY_DAY, "from": "08:00", "to": "20:00"},
    {"days": EVERY_DAY, "from": "20:00", "to": "08:00"},
]


@pytest.mark.parametrize(
    "schedule",
    [None, ALL_WEEK, DAY_AND_NIGHT],
    ids=["no schedule", "00:00-00:00 every day", "day and night windows"],
)
async def test_an_always_limited_equipment_gets_its_second_verify_pass(lab: Lab, schedule) -> None:
    """A limit at all times has no window that closes: the audit reads the NAS (it waited for ever)."""
    clock = Clock()
    run = lab.make_run("Run_capped", files=FILES)
    async with running(limited(lab, schedule=schedule, min_age_hours=1), clock) as client:
        await synced(client, run)
        for _ in range(12):  # three days
            clock.advance(6)
            await audit.audit_pass(client._ctx, force=False)  # what serve's audit loop runs
            await client.cleanup_once()
        after = await client.job(run)
    assert after.verify_passes >= 2 or after.state == S.CLEANED, (
        f"never re-verified in three days: {after.state.value}, {after.verify_passes} pass(es); "
        f"last refusal: {[e.detail for e in after.events if e.kind == 'cleanup_refused'][-1:]}"
    )


async def test_inside_a_window_a_late_file_is_sent_without_an_audit_pass(lab: Lab) -> None:
    clock = Clock()
    run = lab.make_run("Run_window", files=FILES)
    async with running(limited(lab, schedule=open_now()), clock) as client:
        await synced(client, run)
        write_files(run, LATE, mtime=time.time() + 2)
        clock.advance(6)  # the audit is due; the window keeps it off the NAS
        await audit.audit_pass(client._ctx, force=False)
        await client.wait_idle(timeout=60)
        after = await client.job(run)
    assert (lab.nas_copy(run) / "late" / "frame_0099.tif").is_file()
    assert after.state == S.VERIFIED and after.verify_passes == 1
    assert [e.detail for e in events(after, "verify_pass") if "audit pass" in (e.detail or "")] == []
    assert any("late/frame_0099.tif" in (e.detail or "") and "sent again" in (e.detail or "") for e in after.events)


async def test_inside_a_window_the_local_check_runs_once_an_audit_interval(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = audit.check_local

    def counted(queue: Any, job: Any, manifest: Any = None) -> Any:
        calls.append(job.id)
        return real(queue, job, manifest)

    monkeypatch.setattr(audit, "check_local", counted)
    clock = Clock()
    run = lab.make_run("Run_quiet", files=FILES)
    async with running(limited(lab, schedule=open_now()), clock) as client:
        await synced(client, run)
        clock.advance(6)
        for _ in range(3):  # three turns of the loop within one interval: one local check
            await audit.audit_pass(client._ctx, force=False)
        assert len(calls) == 1
        clock.advance(6)
        await audit.audit_pass(client._ctx, force=False)
        assert len(calls) == 2
        after = await client.job(run)
    assert after.state == S.VERIFIED and after.verify_passes == 1  # nothing read from the NAS, no pass
