"""Share lanes: calls into one mount share on threads of their own, at most ``workers`` at once."""

from __future__ import annotations

import asyncio
import threading

import pytest

from exlab_wizard.sync.transports.share_lanes import ShareLane


async def test_a_lane_runs_at_most_its_workers_and_the_next_call_waits_without_a_thread() -> None:
    lane = ShareLane("/mnt/silent", workers=2)
    release = threading.Event()
    blocked = [asyncio.ensure_future(lane.run("look", release.wait)) for _ in range(2)]
    await asyncio.sleep(0.1)
    threads = threading.active_count()
    third = asyncio.ensure_future(lane.run("look", lambda: "third"))
    await asyncio.sleep(0.1)
    assert not third.done() and threading.active_count() == threads
    assert [call.what for call in lane.calls()] == ["look", "look"]
    release.set()
    assert await asyncio.wait_for(third, 5) == "third"
    assert await asyncio.gather(*blocked) == [True, True]
    assert lane.calls() == []


async def test_cancelling_a_call_stops_the_wait_not_the_thread_and_frees_no_slot_twice() -> None:
    lane = ShareLane("/mnt/silent", workers=1)
    release = threading.Event()
    first = asyncio.ensure_future(lane.run("push", release.wait))
    await asyncio.sleep(0.05)
    waiting = asyncio.ensure_future(lane.run("probe", lambda: "never"))
    await asyncio.sleep(0.05)
    first.cancel()
    waiting.cancel()
    await asyncio.gather(first, waiting, return_exceptions=True)
    assert [call.what for call in lane.calls()] == ["push"]  # still in the share
    release.set()
    await asyncio.sleep(0.1)
    assert lane.calls() == []
    assert await asyncio.wait_for(lane.run("next", lambda: 1), 5) == 1
    assert lane._used == 0


async def test_an_error_in_the_share_reaches_the_caller() -> None:
    lane = ShareLane("/mnt/share", workers=1)

    def fails() -> None:
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError, match="Input/output error"):
        await lane.run("listing", fails)
    assert await lane.run("listing", lambda: "ok") == "ok"
