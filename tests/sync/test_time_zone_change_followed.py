"""The bandwidth schedule follows a time zone set on the PC while the service runs.

Windows are read on the workstation's local time (``ClientContext.local_now``,
``transports.base.local_now``, ``policy.bandwidth`` for an aware instant).
CPython converts through ``localtime_r``, and glibc reads the zone
(``/etc/localtime``) once: a zone set later (``timedatectl set-timezone``, an
instrument PC installed in UTC and set to the lab's zone afterwards) was not
seen until the service restarted, and the first hour of every Berlin working
day (08:00-09:00 CET = 07:00-08:00 UTC) went out unthrottled. The engine now
reads the zone again (``time.tzset``) once a minute at most.

The zone change is made for real inside a private mount namespace
(``unshare -m``, bind-mounting a zone file over ``/etc/localtime``): nothing
outside the test's process sees it. The minute between two readings of the
zone is skipped by moving the child's monotonic clock.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import exlab_wizard

ZONEINFO = Path("/usr/share/zoneinfo")

CHILD = textwrap.dedent(
    """
    import datetime as dt, subprocess, sys, time
    from exlab_wizard.config.models import BandwidthConfig
    from exlab_wizard.sync.context import ClientContext
    from exlab_wizard.sync.policy.bandwidth import limit_kibps
    from exlab_wizard.sync.transports.base import local_now

    bandwidth = BandwidthConfig.model_validate(
        {"upload_mbps": 0.8, "schedule": [{"days": ["mon", "tue", "wed", "thu", "fri"], "from": "08:00", "to": "18:00"}]}
    )
    # Monday 2024-01-08 07:30 UTC = 08:30 in Berlin (CET): working hours there.
    instant = dt.datetime(2024, 1, 8, 7, 30, tzinfo=dt.UTC)
    ctx = ClientContext.__new__(ClientContext)
    ctx.clock = lambda: instant

    def reading():
        if sys.argv[2] == "context":  # what the client hands every transport and the mount throttle
            return f"{limit_kibps(bandwidth, ctx.local_now())} {ctx.local_now().isoformat()}"
        if sys.argv[2] == "policy":  # an aware instant given to the schedule
            return f"{limit_kibps(bandwidth, instant)} {instant.isoformat()}"
        offset = local_now().utcoffset()  # the transports' default clock (the real time: its offset only)
        return f"{97 if offset else None} {offset}"

    print("before", reading(), flush=True)
    subprocess.run(["mount", "--bind", sys.argv[1], "/etc/localtime"], check=True)
    monotonic = time.monotonic
    time.monotonic = lambda: monotonic() + 61  # a minute later
    print("after", reading(), flush=True)
    """
)


def _assert_can_unshare() -> None:
    """A private mount namespace needs root: a machine without it fails here, never skips (CI runs as root)."""
    assert os.geteuid() == 0, "a private mount namespace (unshare -m) needs root"  # fails, never skips
    assert shutil.which("unshare") is not None, "unshare (util-linux) is not installed"
    for zone in ("Etc/UTC", "Europe/Berlin"):
        assert (ZONEINFO / zone).exists(), f"{ZONEINFO / zone} is missing: install tzdata"
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True)
    assert probe.returncode == 0, f"unshare -m failed: {probe.stderr.strip()}"


@pytest.mark.parametrize("reader", ["context", "policy", "transports"])
def test_a_time_zone_set_while_the_service_runs_moves_the_working_hours_window(tmp_path, reader):
    _assert_can_unshare()
    env = {k: v for k, v in os.environ.items() if k != "TZ"}  # the PC's zone, /etc/localtime
    src = Path(exlab_wizard.__file__).resolve().parents[1]  # the engine this test imports
    env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    shell = (
        f"mount --bind {ZONEINFO / 'Etc/UTC'} /etc/localtime && "  # installed in UTC
        f"exec {sys.executable} {script} {ZONEINFO / 'Europe/Berlin'} {reader}"  # then set to the lab's zone
    )
    done = subprocess.run(["unshare", "-m", "sh", "-c", shell], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert lines["before"].startswith("None "), lines  # 07:30 UTC: outside 08:00-18:00 in UTC
    assert lines["after"].startswith("97 "), (
        "the PC's zone was set to Europe/Berlin (08:30 there, working hours), yet the running engine "
        f"still reads the old zone and sends unthrottled: {lines['after']}"
    )


def test_the_zone_is_read_again_once_a_minute_at_most(monkeypatch):
    # The mount throttle reads the schedule every 0.5 s: tzset (a stat of /etc/localtime) is not run each time.
    from exlab_wizard.sync.policy import bandwidth

    calls, now = [], {"t": 1000.0}
    monkeypatch.setattr(bandwidth.time, "tzset", lambda: calls.append(now["t"]))
    monkeypatch.setattr(bandwidth.time, "monotonic", lambda: now["t"])
    monkeypatch.setattr(bandwidth, "_zone_read_at", None)
    for _ in range(240):  # two minutes of readings every half second
        bandwidth.follow_time_zone()
        now["t"] += 0.5
    assert calls == [1000.0, 1060.0], calls
