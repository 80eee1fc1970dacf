"""The bandwidth schedule as pure functions of the config and the local time.

1 Mbps = 1,000,000 bit/s; KiB/s = floor(mbps * 1e6 / 8 / 1024), never below 1.
A window applies on each listed day from ``start`` to ``end``; an ``end``
earlier than ``start`` runs past midnight into the next day, and ``start ==
end`` means 24 hours from ``start``. With no schedule the limit always applies.
Windows are read on the local wall clock, through its changes (see :func:`next_change`).
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable

from exlab_wizard.config.models import DAYS, BandwidthConfig, BandwidthWindow

__all__ = ["mbps_to_kibps", "limit_kibps", "next_change", "rclone_timetable", "active_window", "follow_time_zone"]

#: How often, at most, the system's time zone is read again (seconds, monotonic clock).
TIME_ZONE_RECHECK_S = 60.0
_zone_read_at: float | None = None


def follow_time_zone() -> None:
    """Read the system's time zone again (``time.tzset``), once a minute at most.

    The C library reads the zone (``/etc/localtime``, ``TZ``) once per
    process: a zone set while the service runs (``timedatectl
    set-timezone`` on a PC installed in UTC) would not move the windows until
    a restart. Called before every reading of the local time that the
    schedule uses.
    """
    global _zone_read_at
    now = time.monotonic()
    if _zone_read_at is None or not 0 <= now - _zone_read_at < TIME_ZONE_RECHECK_S:
        _zone_read_at = now
        time.tzset()


def mbps_to_kibps(mbps: float) -> int:
    return max(1, math.floor(mbps * 1e6 / 8 / 1024))


def _intervals(window: BandwidthWindow, around: dt.datetime) -> list[tuple[dt.datetime, dt.datetime]]:
    """The window's concrete [start, end) intervals that may touch ``around`` (naive local time)."""
    out = []
    for offset in range(-8, 9):
        day = (around + dt.timedelta(days=offset)).date()
        if DAYS[day.weekday()] not in window.days:
            continue
        start = dt.datetime.combine(day, window.start)
        end = dt.datetime.combine(day, window.end)
        if end <= start:
            end += dt.timedelta(days=1)
        out.append((start, end))
    return out


def _naive_local(now: dt.datetime) -> dt.datetime:
    follow_time_zone()
    if now.tzinfo is not None:
        now = now.astimezone()  # the workstation's local time
    return now.replace(tzinfo=None)


def active_window(bandwidth: BandwidthConfig, now: dt.datetime) -> BandwidthWindow | None:
    """The first schedule window containing ``now``, if any."""
    local = _naive_local(now)
    for window in bandwidth.schedule:
        for start, end in _intervals(window, local):
            if start <= local < end:
                return window
    return None


def limit_kibps(bandwidth: BandwidthConfig, now: dt.datetime) -> int | None:
    """The upload limit in force at ``now`` in KiB/s, or None for unlimited."""
    if bandwidth.upload_mbps is None:
        return None
    if not bandwidth.schedule:
        return mbps_to_kibps(bandwidth.upload_mbps)
    if active_window(bandwidth, now) is not None:
        return mbps_to_kibps(bandwidth.upload_mbps)
    return None


def _wall(instant: dt.datetime) -> dt.datetime:
    """The local wall-clock time (naive) at an aware ``instant``."""
    return instant.astimezone().replace(tzinfo=None)


def _first_second(early: dt.datetime, late: dt.datetime, reached: Callable[[dt.datetime], bool]) -> dt.datetime:
    """The first whole second in (``early``, ``late``] at which ``reached`` holds (it holds at ``late``, and from
    then on). Clock changes happen on whole seconds."""
    low, high = math.floor(early.timestamp()), math.ceil(late.timestamp())
    while high - low > 1:
        middle = (low + high) // 2
        if reached(dt.datetime.fromtimestamp(middle, dt.UTC)):
            high = middle
        else:
            low = middle
    return dt.datetime.fromtimestamp(high, dt.UTC)


def _instants(wall: dt.datetime) -> list[dt.datetime]:
    """The instants (aware, UTC) at which the local clocks reach the naive ``wall`` time.

    Usually one. On the night clocks go forward, a wall time they skip is
    reached when they jump past it (02:30 on the night 02:00 CET becomes
    03:00 CEST: at 03:00 CEST). On the night they go back, a wall time in the
    hour that happens twice is reached twice, and the jump back in between is
    itself a change of wall time (02:59:59 CEST to 02:00 CET).
    """
    early, late = sorted(wall.replace(fold=fold).astimezone(dt.UTC) for fold in (0, 1))
    if early == late:
        return [early]
    shown = [instant for instant in (early, late) if _wall(instant) == wall]
    if not shown:  # skipped
        return [_first_second(early, late, lambda instant: _wall(instant) >= wall)]
    offset = late.astimezone().utcoffset()
    jump_back = _first_second(early, late, lambda instant: instant.astimezone().utcoffset() == offset)
    return sorted({*shown, jump_back})


def next_change(bandwidth: BandwidthConfig, now: dt.datetime) -> dt.datetime | None:
    """The first instant after ``now`` at which the limit changes, or None.

    Always later than ``now``, and :func:`limit_kibps` differs there from its
    value at ``now`` (an edge where the limit stays the same, one window
    ending where another begins, is passed over). Window edges follow the
    local wall clock through its changes (see :func:`_instants`). Returned in
    the same form as ``now`` (aware if it was aware; a naive ``now`` is local
    time).
    """
    if bandwidth.upload_mbps is None or not bandwidth.schedule:
        return None
    moment = now if now.tzinfo is not None else now.astimezone()
    local = _naive_local(moment)
    current = limit_kibps(bandwidth, moment)
    walls = {
        edge
        for window in bandwidth.schedule
        for interval in _intervals(window, local)
        for edge in interval
        if edge > local - dt.timedelta(days=1)  # an instant's wall time is off by an hour at most
    }
    for instant in sorted({instant for wall in walls for instant in _instants(wall) if instant > moment}):
        if limit_kibps(bandwidth, instant) != current:
            return instant.astimezone(now.tzinfo) if now.tzinfo is not None else _wall(instant)
    return None


def rclone_timetable(bandwidth: BandwidthConfig) -> str | None:
    """The schedule as an rclone ``--bwlimit`` timetable, or None for unlimited.

    Example: ``"Mon-08:00,6103k Mon-18:00,off"``. A plain limit with no
    schedule is ``"6103k"``.
    """
    if bandwidth.upload_mbps is None:
        return None
    rate = f"{mbps_to_kibps(bandwidth.upload_mbps)}k"
    if not bandwidth.schedule:
        return rate
    # A reference week starting on a Monday (2024-01-01 was one).
    monday = dt.datetime(2024, 1, 8)
    edges: set[dt.datetime] = set()
    for window in bandwidth.schedule:
        for start, end in _intervals(window, monday + dt.timedelta(days=3)):
            for edge in (start, end):
                edges.add(monday + ((edge - monday) % dt.timedelta(days=7)))
    entries = []
    previous = None
    for edge in sorted(edges):
        value = rate if limit_kibps(bandwidth, edge) is not None else "off"
        entries.append((edge, value))
    # Drop entries that do not change the value (cyclically over the week).
    if entries:
        previous = entries[-1][1]
        kept = []
        for edge, value in entries:
            if value != previous:
                kept.append((edge, value))
            previous = value
        entries = kept or entries[:1]
    return " ".join(f"{DAYS[e.weekday()].capitalize()}-{e:%H:%M},{v}" for e, v in entries)
