"""rsync_ssh: each rsync starts with the limit in force when it starts, and is stopped only at a real change.

rsync has no timetable: the transport stops it at a window edge and starts it
again with the new ``--bwlimit``. The limit a push is given is the one in force
when the push began; by the time its data rsync starts (after the listings,
the claim, a re-sent file) a window may have opened, and the next edge it waits
for is then the window's end: a whole working day unthrottled, unless each
rsync reads the schedule as it starts. On the night clocks go forward, an edge
in the skipped hour must not be taken for one in the past, at which rsync
would be stopped and started again every few milliseconds.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time

import pytest

from exlab_wizard.sync.transports import rsync_ssh
from exlab_wizard.sync.transports.rsync_ssh import RsyncSshTransport
from tests.lab import RUN_REL
from tests.lab import make_hostile_run as make_run
from tests.lab import rsync_equipment as equipment

pytestmark = pytest.mark.network

#: 2024-01-08 was a Monday: working hours 08:00-18:00 at 0.8 Mbps (97 KiB/s)
BANDWIDTH = {"upload_mbps": 0.8, "schedule": [{"days": ["mon"], "from": "08:00", "to": "18:00"}]}
BEFORE_8 = dt.datetime(2024, 1, 8, 7, 59, 59)
#: Sent unthrottled over loopback in milliseconds; at 97 KiB/s in about 3 s.
PAYLOAD = 300_000


@pytest.fixture
def berlin(monkeypatch):
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def _log(eq) -> str:
    return "".join(p.read_text() for p in (eq.equipment_root / ".exlab-wizard").glob("wizard.*.log"))


def _sends(eq) -> list[str]:
    return [line for line in _log(eq).splitlines() if "tool_start" in line and "step=push" in line]


def _clock_jumping_after(monkeypatch, steps: tuple[str, ...], to: dt.datetime) -> tuple[dict, list]:
    """A clock at 07:59:59 that shows ``to`` once an rsync/ssh step in ``steps`` has run; and the calls."""
    clock = {"now": BEFORE_8.astimezone()}
    calls: list[tuple[str, dt.datetime]] = []
    real_run_tool = rsync_ssh.run_tool

    async def run_tool(argv, **kwargs):
        calls.append((kwargs.get("step", ""), clock["now"]))
        result = await real_run_tool(argv, **kwargs)
        if kwargs.get("step") in steps:
            clock["now"] = to.astimezone()
        return result

    monkeypatch.setattr(rsync_ssh, "run_tool", run_tool)
    return clock, calls


async def test_main_send_after_a_rewrite_that_crossed_08_00_is_limited(tmp_path, sshd, remote_dir, monkeypatch):
    eq = equipment(tmp_path, sshd, remote_dir, bandwidth=BANDWIDTH)
    run = make_run(eq.local_root, {"a.bin": os.urandom(20_000)}, symlink=False)
    # First push on the Sunday: unlimited, a.bin lands on the NAS.
    await RsyncSshTransport(eq, now=lambda: dt.datetime(2024, 1, 7, 12, 0).astimezone()).push(run, bwlimit_kibps=None)
    (run / "big.bin").write_bytes(os.urandom(PAYLOAD))  # new data since, not on the NAS yet

    # push() at 07:59:59 (unlimited: bwlimit_kibps=None is the truth); the re-send of a.bin
    # (a mismatch found by the verification) lasts past 08:00.
    clock, _ = _clock_jumping_after(monkeypatch, ("rewrite",), dt.datetime(2024, 1, 8, 8, 0, 5))
    started = time.monotonic()
    result = await RsyncSshTransport(eq, now=lambda: clock["now"]).push(
        run, bwlimit_kibps=None, rewrite=frozenset({"a.bin"})
    )
    elapsed = time.monotonic() - started
    assert result.ok and (remote_dir / RUN_REL / "big.bin").stat().st_size == PAYLOAD

    starts = _sends(eq)
    assert starts, _log(eq)
    main = starts[-1]  # the rsync that sent big.bin, started at 08:00:05 inside the window
    assert "--bwlimit=97" in main, (
        f"the main send started inside the 08:00-18:00 window with no --bwlimit "
        f"({PAYLOAD} bytes went out in {elapsed:.1f}s; the limit allows 97 KiB/s): {main}"
    )


async def test_push_whose_listing_crossed_08_00_sends_under_the_limit(tmp_path, sshd, remote_dir, monkeypatch):
    # push() is called at 07:59:59 (no limit); the run's listings (local walk, remote listing
    # over ssh: seconds for a run of many files) end after 08:00; the data rsync starts inside the window.
    eq = equipment(tmp_path, sshd, remote_dir, bandwidth=BANDWIDTH)
    run = make_run(eq.local_root, {"big.bin": os.urandom(PAYLOAD)}, symlink=False)
    clock, calls = _clock_jumping_after(
        monkeypatch, ("conflict_check", "make_run_folder"), dt.datetime(2024, 1, 8, 8, 0, 2)
    )
    started = time.monotonic()
    result = await RsyncSshTransport(eq, now=lambda: clock["now"]).push(run, bwlimit_kibps=None)
    elapsed = time.monotonic() - started
    assert result.ok
    at_push = [at for step, at in calls if step == "push"]
    assert at_push and all(at.hour == 8 for at in at_push), calls  # the send began inside the window
    sends = _sends(eq)
    assert sends and all("--bwlimit=97" in line for line in sends), (
        f"{PAYLOAD} bytes sent at 08:00:02, inside the window, in {elapsed:.1f}s with no --bwlimit "
        f"(and the next edge it waits for is 18:00): {sends}"
    )


async def test_a_large_run_whose_listing_crossed_08_00_goes_as_one_limited_rsync(
    tmp_path, sshd, remote_dir, monkeypatch
):
    # Parallel streams are for an unlimited push only: the choice is made with the limit of now.
    monkeypatch.setattr(rsync_ssh, "STREAMS_MIN_BYTES", 100_000)
    monkeypatch.setattr(rsync_ssh, "STREAMS_MIN_AVERAGE_BYTES", 0)
    bandwidth = {**BANDWIDTH, "upload_mbps": 40}  # 4882 KiB/s: the run goes in a fraction of a second
    eq = equipment(tmp_path, sshd, remote_dir, bandwidth=bandwidth)
    run = make_run(eq.local_root, {"a.bin": os.urandom(PAYLOAD), "b.bin": os.urandom(PAYLOAD)}, symlink=False)
    clock, _ = _clock_jumping_after(
        monkeypatch, ("conflict_check", "make_run_folder"), dt.datetime(2024, 1, 8, 8, 0, 2)
    )
    assert (await RsyncSshTransport(eq, now=lambda: clock["now"]).push(run, bwlimit_kibps=None)).ok
    sends = _sends(eq)
    assert not any("step=push:" in line for line in sends), f"streams chosen inside the window: {sends}"
    assert sends and all("--bwlimit=4882" in line for line in sends), sends


async def test_rsync_is_not_restarted_again_and_again_before_the_spring_forward_edge(
    berlin, tmp_path, sshd, remote_dir
):
    bandwidth = {"upload_mbps": 1, "schedule": [{"days": ["sun"], "from": "02:00", "to": "06:00"}]}
    eq = equipment(tmp_path, sshd, remote_dir, bandwidth=bandwidth)
    run = make_run(eq.local_root, {"big.bin": os.urandom(20_000_000)}, symlink=False)
    start = time.monotonic()
    base = dt.datetime.fromtimestamp(1711845000).astimezone()  # 2024-03-31 01:30 CET, half an hour before the change

    def clock() -> dt.datetime:
        return base + dt.timedelta(seconds=time.monotonic() - start)

    push = asyncio.ensure_future(RsyncSshTransport(eq, now=clock).push(run, bwlimit_kibps=None))
    done, _ = await asyncio.wait({push}, timeout=8)  # 20 MB over loopback, unlimited: well under a second
    if not done:
        push.cancel()
        await asyncio.gather(push, return_exceptions=True)
    edges = [line for line in _log(eq).splitlines() if "bandwidth_window_edge" in line]
    # rsync is stopped only at an edge where the limit changes (02:00 CET = 03:00 CEST, half an
    # hour away), never at a past "edge" (01:00 CET) where it stays unlimited, to be started again.
    pointless = [line for line in edges if "old_kibps=unlimited new_kibps=unlimited" in line]
    assert not pointless, (
        f"{len(pointless)} pointless rsync restarts in {time.monotonic() - start:.1f}s: {pointless[:2]}"
    )
    assert done and push.result().ok


async def test_an_edge_named_in_the_past_never_stops_rsync(tmp_path, sshd, remote_dir, monkeypatch):
    # The safety net: should the schedule ever answer with an edge at or before now, rsync runs on.
    eq = equipment(tmp_path, sshd, remote_dir, bandwidth=BANDWIDTH)
    run = make_run(eq.local_root, {"big.bin": os.urandom(20_000_000)}, symlink=False)
    monkeypatch.setattr(rsync_ssh, "next_change", lambda bandwidth, now: now - dt.timedelta(minutes=30))
    sunday = dt.datetime(2024, 1, 7, 12, 0).astimezone()
    push = asyncio.ensure_future(RsyncSshTransport(eq, now=lambda: sunday).push(run, bwlimit_kibps=None))
    done, _ = await asyncio.wait({push}, timeout=8)
    if not done:
        push.cancel()
        await asyncio.gather(push, return_exceptions=True)
    log = _log(eq)
    restarts = [line for line in log.splitlines() if "bandwidth_window_edge" in line]
    assert not restarts, f"{len(restarts)} rsync restarts for an edge in the past: {restarts[:2]}"
    assert done and push.result().ok
    assert "bandwidth_edge_in_past" in log
