"""The live feed's transfer rate: measured between a job's progress messages, kept across a phase change."""

from __future__ import annotations

import asyncio

from exlab_wizard.service.events import EventHub


async def test_a_phase_that_ends_in_its_first_message_shows_the_jobs_last_rate() -> None:
    hub = EventHub(stats=None, throttle_s=0.0)  # type: ignore[arg-type]  # progress needs no table
    sub = hub.subscribe()

    def progress(phase: str, done: int, total: int) -> None:
        hub.on_client_event({"type": "progress", "job_id": "j1", "phase": phase, "bytes": done, "total": total})

    progress("transfer", 0, 2_000_000)
    await asyncio.sleep(0.05)
    progress("transfer", 1_000_000, 2_000_000)
    await asyncio.sleep(0.05)
    progress("transfer", 2_000_000, 2_000_000)
    progress("verify", 2_000_000, 2_000_000)  # a short check: done in its first message
    rates = []
    while not sub.queue.empty():
        rates.append((await sub.queue.get()).data["rate_bps"])
    assert rates[0] is None  # nothing measured yet
    assert all(r and r > 0 for r in rates[1:3]), rates
    assert rates[3] == rates[2], rates  # the check's first message keeps the copy's rate, not "-"
    assert hub.rate("j1") == rates[3]  # what a section drawn again by the server shows
    assert hub.rate("j2") is None
