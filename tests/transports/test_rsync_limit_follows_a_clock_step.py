"""rsync_ssh: the limit follows a wall clock stepped while rsync runs.

rsync has no timetable: the transport stops it at a window edge and starts it
again with the new ``--bwlimit``. The wait for that edge runs on the monotonic
clock, computed from the wall clock once, when rsync starts. If the PC's wall
clock is then stepped (NTP correcting a clock that ran a day behind, an
operator fixing the date), the edge it waits for is hours off: rsync ran on
without ``--bwlimit`` for the rest of the transfer, flooding the instrument
network during working hours. Besides the wait for the edge, the limit is now
read by the wall clock every few seconds, and rsync restarted only when it
differs from the one it runs with.

The long sends are emulated in virtual time (the wrapper below honours
``stop_after`` and ``stop_if`` as the real ``run_tool`` does), so no real
hour-long transfer is needed; the last, uncut rsync is the real one. The last
test runs it all for real, on a clock stepped out of working hours.
"""

from __future__ import annotations

import datetime as dt
import os
import time

import pytest

from exlab_wizard.sync.transports import rsync_ssh
from exlab_wizard.sync.transports._process import ToolResult
from exlab_wizard.sync.transports.rsync_ssh import RsyncSshTransport
from tests.lab import RUN_REL
from tests.lab import make_hostile_run as make_run
from tests.lab import rsync_equipment as equipment

pytestmark = pytest.mark.network

#: Monday 08:00-18:00 at 0.8 Mbps (97 KiB/s); 2024-01-07 was a Sunday.
BANDWIDTH = {"upload_mbps": 0.8, "schedule": [{"days": ["mon"], "from": "08:00", "to": "18:00"}]}
#: The PC's clock says Sunday 11:00 (it runs 22 h behind) when the push starts.
WRONG = dt.datetime(2024, 1, 7, 11, 0)
#: The unthrottled send of the run would take an hour at the link's speed.
TRANSFER_S = 3600.0
#: NTP steps the clock 22 h forward 60 s into the send: Monday 09:01, in working hours.
STEP_AT_S, STEP = 60.0, dt.timedelta(hours=22)
#: How long an unthrottled rsync may go on once the wall clock is in working hours (generous).
TOLERATED_S = 300.0


def _virtual_push(monkeypatch, step_at_s: float | None) -> tuple[dict, list[tuple[float, float, bool]]]:
    """A wall clock at Sunday 11:00 stepped 22 h forward ``step_at_s`` into the send (never: None), and
    ``run_tool`` sending an hour's worth unthrottled in virtual time: (the clock, the sends as (from, to,
    limited) in virtual seconds)."""
    virtual = {"t": 0.0}  # seconds of the send so far (the monotonic clock)

    def clock() -> dt.datetime:
        wall = WRONG + dt.timedelta(seconds=virtual["t"])
        if step_at_s is not None and virtual["t"] >= step_at_s:
            wall += STEP
        return wall.astimezone()

    real_run_tool = rsync_ssh.run_tool
    sends: list[tuple[float, float, bool]] = []
    left = {"s": TRANSFER_S}

    async def run_tool(argv, **kwargs):
        step = kwargs.get("step", "")
        if not step.startswith("push") or step.startswith("push_"):
            return await real_run_tool(argv, **kwargs)
        stop_after, stop_if = kwargs.pop("stop_after", None), kwargs.pop("stop_if", None)
        every = kwargs.pop("check_every", 5.0)
        if any(str(a).startswith("--bwlimit=") for a in argv):  # throttled from here on: the real one runs
            sends.append((virtual["t"], virtual["t"], True))
            return await real_run_tool(argv, **kwargs)
        start, ran = virtual["t"], 0.0
        budget = left["s"] if stop_after is None else min(stop_after, left["s"])
        while True:  # as run_tool: stop_if is asked every check_every seconds before the deadline
            if stop_if is not None and every < budget - ran:
                virtual["t"] += every
                ran += every
                if stop_if():
                    break
                continue
            virtual["t"] += budget - ran
            ran = budget
            break
        left["s"] -= ran
        sends.append((start, virtual["t"], False))
        if left["s"] > 0:  # stopped at the edge or on a changed limit, as run_tool does
            return ToolResult(list(argv), -15, b"", b"", ran, stopped=True)
        return await real_run_tool(argv, **kwargs)  # the rest of the send, really

    monkeypatch.setattr(rsync_ssh, "run_tool", run_tool)
    return clock, sends


def _unthrottled_after(sends: list[tuple[float, float, bool]], at_s: float) -> float:
    return sum(max(0.0, end - max(start, at_s)) for start, end, limited in sends if not limited)


async def test_a_wall_clock_step_into_working_hours_throttles_the_running_rsync(
    tmp_path, sshd, remote_dir, monkeypatch
):
    eq = equipment(tmp_path, sshd, remote_dir, bandwidth=BANDWIDTH)
    run = make_run(eq.local_root, {"big.bin": os.urandom(200_000)}, symlink=False)
    clock, sends = _virtual_push(monkeypatch, STEP_AT_S)
    result = await RsyncSshTransport(eq, now=clock).push(run, bwlimit_kibps=None)
    assert result.ok and (remote_dir / RUN_REL / "big.bin").stat().st_size == 200_000

    unthrottled_in_window = _unthrottled_after(sends, STEP_AT_S)
    assert unthrottled_in_window <= TOLERATED_S, (
        f"the wall clock was stepped to Monday 09:01 (working hours, 97 KiB/s) {STEP_AT_S:.0f} s into the send, "
        f"yet rsync went on without --bwlimit for {unthrottled_in_window:.0f} s more: it waits for the edge by "
        f"the monotonic clock, computed from the wall clock once. Sends: {sends}"
    )
    assert sends[-1][2], f"the rest of the send went without --bwlimit: {sends}"


async def test_rsync_is_not_restarted_while_the_limit_stays_the_same(tmp_path, sshd, remote_dir, monkeypatch):
    # An hour unthrottled on a Sunday with no clock step: one rsync, never stopped to be started
    # again with the same limit (each restart costs a file-list round and the partial file's rehash).
    eq = equipment(tmp_path, sshd, remote_dir, bandwidth=BANDWIDTH)
    run = make_run(eq.local_root, {"big.bin": os.urandom(200_000)}, symlink=False)
    clock, sends = _virtual_push(monkeypatch, None)
    assert (await RsyncSshTransport(eq, now=clock).push(run, bwlimit_kibps=None)).ok
    assert len(sends) == 1 and not sends[0][2], f"rsync restarted with an unchanged limit: {sends}"


async def test_a_wall_clock_stepped_out_of_working_hours_lifts_the_limit_of_the_running_rsync(
    tmp_path, sshd, remote_dir, monkeypatch
):
    # For real: rsync starts Monday 10:00 at 195 KiB/s (1 MB: about 5 s); half a second in, the clock
    # is stepped back to Sunday (it had been set a day ahead): the limit is lifted at the next check.
    monkeypatch.setattr(rsync_ssh, "SCHEDULE_CHECK_S", 0.2, raising=False)
    bandwidth = {"upload_mbps": 1.6, "schedule": [{"days": ["mon"], "from": "08:00", "to": "18:00"}]}
    eq = equipment(tmp_path, sshd, remote_dir, bandwidth=bandwidth)
    payload = os.urandom(1_000_000)
    run = make_run(eq.local_root, {"big.bin": payload}, symlink=False)
    monday, step_at = dt.datetime(2024, 1, 8, 10, 0).astimezone(), {"t": None}

    def clock() -> dt.datetime:
        if step_at["t"] is None:
            return monday
        later = dt.timedelta(seconds=time.monotonic() - step_at["t"])
        return monday + later - (dt.timedelta(days=1) if later.total_seconds() >= 0.5 else dt.timedelta())

    real_run_tool = rsync_ssh.run_tool

    async def run_tool(argv, **kwargs):
        if kwargs.get("step") == "push" and step_at["t"] is None:
            step_at["t"] = time.monotonic()
        return await real_run_tool(argv, **kwargs)

    monkeypatch.setattr(rsync_ssh, "run_tool", run_tool)
    started = time.monotonic()
    result = await RsyncSshTransport(eq, now=clock).push(run, bwlimit_kibps=195)
    elapsed = time.monotonic() - started
    assert result.ok and (remote_dir / RUN_REL / "big.bin").read_bytes() == payload
    log = "".join(p.read_text() for p in (eq.equipment_root / ".exlab-wizard").glob("wizard.*.log"))
    starts = [line for line in log.splitlines() if "tool_start" in line and "step=push" in line]
    assert "--bwlimit=195" in starts[0] and "--bwlimit" not in starts[-1], starts
    assert elapsed < 3.5, f"limit not lifted after the clock left working hours ({elapsed:.1f}s; 5 s at 195 KiB/s)"
    assert "clock_stepped=" in log
