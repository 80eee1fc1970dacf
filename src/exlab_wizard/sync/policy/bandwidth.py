"""The bandwidth schedule as pure functions of the config and the local time.

1 Mbps = 1,000,000 bit/s; KiB/s = floor(mbps * 1e6 / 8 / 1024), never below 1.
A window applies on each listed day from ``start`` to ``end``; an ``end``
earlier than ``start`` runs past midnight into the next day, and ``start ==
end`` means 24 hours from ``start``. With no schedule the limit always applies.
"""

from __future__ import annotations

import datetime as dt
import math

from exlab_wizard.config.models import DAYS, BandwidthConfig, BandwidthWindow

__all__ = ["mbps_to_kibps", "limit_kibps", "next_change", "rclone_timetable", "active_window"]


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


def next_change(bandwidth: BandwidthConfig, now: dt.datetime) -> dt.datetime | None:
    """The next window edge after ``now`` at which the limit changes, or None.

    Returned in the same form as ``now`` (aware if it was aware).
    """
    if bandwidth.upload_mbps is None or not bandwidth.schedule:
        return None
    local = _naive_local(now)
    current = limit_kibps(bandwidth, local)
    edges = sorted(
        {
            edge
            for window in bandwidth.schedule
            for interval in _intervals(window, local)
            for edge in interval
            if edge > local
        }
    )
    for edge in edges:
        if limit_kibps(bandwidth, edge) != current:
            if now.tzinfo is not None:
                return edge.astimezone(dt.UTC).astimezone(now.tzinfo)
            return edge
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
