"""What a job costs the event loop: progress reported on a timer, no queue polling while every equipment is busy."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from exlab_wizard.sync.queue import JobQueue
from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports import TransportResult
from tests.lab import EQ, Lab, make_client


async def test_many_small_files_make_few_progress_events_that_add_up(lab: Lab) -> None:
    files = {f"well_{i % 20:02d}/frame_{i:05d}.bin": bytes([i % 251]) * 1000 for i in range(3000)}
    run = lab.make_run(files=files)
    size = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    events: list[dict] = []
    client = make_client(lab.config())
    client.add_listener(lambda event: events.append(event) if event.get("type") == "progress" else None)
    await client.init()
    try:
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        assert (await client.job(run)).state == SyncJobState.VERIFIED
    finally:
        await client.close()
    transfer = [e for e in events if e["phase"] == "transfer"]
    # Not one wake-up of the event loop per file: a handful of events, on a timer.
    assert 1 <= len(transfer) <= 60
    assert sum(e["delta"] for e in transfer) == transfer[-1]["bytes"] == transfer[-1]["total"] == size


async def test_the_queue_is_not_polled_while_every_equipment_is_busy(lab: Lab, monkeypatch: Any) -> None:
    runs = [lab.make_run(equipment=eq) for eq in lab.equipment]
    release = asyncio.Event()
    started: list[Path] = []

    def push_factory(_equipment: Any) -> Any:
        async def push(run_path: Path, *, bwlimit_kibps: int | None) -> TransportResult:
            started.append(run_path)
            await release.wait()
            return TransportResult(ok=True)

        return push

    reads: list[str] = []
    for name in ("next_due", "next_metadata_push", "next_dispatch_wakeup"):
        real = getattr(JobQueue, name)
        monkeypatch.setattr(
            JobQueue, name, lambda self, *a, _real=real, _name=name, **k: (reads.append(_name), _real(self, *a, **k))[1]
        )
    client = make_client(lab.config(), push_callable_factory=push_factory, worker_poll_interval_s=0.01)
    await client.init()
    try:
        for run in runs:
            await client.enqueue(run)
        for _ in range(500):
            if len(started) == len(runs):
                break
            await asyncio.sleep(0.01)
        assert sorted(started) == sorted(runs)
        await asyncio.sleep(0.05)
        reads.clear()
        await asyncio.sleep(0.3)  # thirty polling intervals with both equipment busy
        assert reads == []
        release.set()
        await client.wait_idle(timeout=30)
    finally:
        release.set()
        await client.close()
    assert EQ in lab.equipment
