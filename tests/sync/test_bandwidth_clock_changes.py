"""next_change() on the nights the clocks change: always later than now, and always a real change.

A window edge at a wall time the clocks skip (02:30 on the night Europe goes
from 02:00 CET to 03:00 CEST) was turned into an aware time with the summer
offset: 01:30 CET, half an hour before the change; asked at 01:59:59 CET,
next_change() answered an edge in the past, and the rsync transport stopped
and started its rsync at it every 50 ms. A skipped wall time is reached when
the clocks jump past it; in the hour that happens twice, the clock's wall
time is followed as it shows (an edge in it is reached twice).
"""

from __future__ import annotations

import datetime as dt
import time

import pytest

from exlab_wizard.config.models import BandwidthConfig
from exlab_wizard.sync.policy.bandwidth import limit_kibps, next_change


@pytest.fixture
def local_zone(monkeypatch):
    def use(zone: str) -> None:
        monkeypatch.setenv("TZ", zone)
        time.tzset()

    yield use
    monkeypatch.undo()
    time.tzset()


def _bandwidth(days: list[str], start: str, end: str) -> BandwidthConfig:
    return BandwidthConfig.model_validate({"upload_mbps": 1, "schedule": [{"days": days, "from": start, "to": end}]})


@pytest.mark.parametrize("start", ["02:30", "02:00"])
def test_next_change_is_never_in_the_past_on_the_spring_forward_night(local_zone, start):
    local_zone("Europe/Berlin")
    bandwidth = _bandwidth(["sun"], start, "06:00")
    # 2024-03-31 (a Sunday): 02:00 CET became 03:00 CEST. 01:00 and 01:59:59 CET are before it.
    for ts in (1711843200, 1711846799):
        now = dt.datetime.fromtimestamp(ts).astimezone()
        assert limit_kibps(bandwidth, now) is None
        edge = next_change(bandwidth, now)
        assert edge is not None and edge > now, f"asked at {now}, the next edge is {edge}: in the past"
        assert limit_kibps(bandwidth, edge) is not None, f"nothing changes at {edge}"
        # The window opens when the clocks jump past its start: 03:00 CEST, 01:00 UTC.
        assert edge == dt.datetime(2024, 3, 31, 1, 0, tzinfo=dt.UTC)


def test_a_window_the_clocks_jump_over_is_no_change(local_zone):
    local_zone("Europe/Berlin")
    bandwidth = _bandwidth(["sun"], "02:10", "02:50")  # wholly inside the skipped hour
    now = dt.datetime(2024, 3, 31, 0, 0, tzinfo=dt.UTC)
    assert next_change(bandwidth, now) == dt.datetime(2024, 4, 7, 0, 10, tzinfo=dt.UTC)  # 02:10 CEST a week on


@pytest.mark.parametrize(
    ("zone", "night"),
    [
        ("Europe/Berlin", dt.datetime(2024, 3, 31)),
        ("Europe/Berlin", dt.datetime(2024, 10, 27)),
        ("America/New_York", dt.datetime(2024, 3, 10)),
        ("America/New_York", dt.datetime(2024, 11, 3)),
        ("UTC", dt.datetime(2024, 3, 31)),
    ],
)
@pytest.mark.parametrize(
    "window",
    [
        ("02:30", "06:00"),
        ("02:00", "06:00"),
        ("22:00", "02:30"),
        ("01:00", "02:00"),
        ("01:30", "03:00"),
        ("03:00", "08:00"),
        ("08:00", "18:00"),
    ],
)
def test_next_change_is_the_first_change_of_the_limit_through_a_clock_change(local_zone, zone, night, window):
    """Sampled every minute through the night: each answer is later than now, the limit differs
    there, and it is the same at every sample in between."""
    local_zone(zone)
    days = [night.strftime("%a").lower(), (night - dt.timedelta(days=1)).strftime("%a").lower()]
    bandwidth = _bandwidth(days, *window)
    start = night.astimezone() - dt.timedelta(hours=3)
    samples = [start + dt.timedelta(minutes=m, seconds=30) for m in range(12 * 60)]
    limits = [limit_kibps(bandwidth, at) for at in samples]
    for i, now in enumerate(samples):
        edge = next_change(bandwidth, now)
        assert edge is not None and edge > now, f"asked at {now}, the next change is {edge}"
        assert limit_kibps(bandwidth, edge) != limits[i], f"asked at {now}: nothing changes at {edge}"
        between = [limit for at, limit in zip(samples[i:], limits[i:], strict=True) if at < edge]
        assert set(between) == {limits[i]}, f"asked at {now}: the limit changed before {edge}"


def test_a_naive_now_is_local_time_and_gets_a_naive_answer(local_zone):
    local_zone("Europe/Berlin")
    bandwidth = _bandwidth(["sun"], "02:30", "06:00")
    assert next_change(bandwidth, dt.datetime(2024, 3, 31, 1, 0)) == dt.datetime(2024, 3, 31, 3, 0)
    assert next_change(bandwidth, dt.datetime(2024, 1, 7, 1, 0)) == dt.datetime(2024, 1, 7, 2, 30)
