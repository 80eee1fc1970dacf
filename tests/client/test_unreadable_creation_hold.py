"""A run whose creation.json became unusable after it was queued is held, and the others sync.

Through the real client, validator and mount transport: the gate before the
transfer reports ``unreadable_creation_json``; the worker holds the job
(one ``gate_hold`` event, looked at again after ``scan_interval_s``) instead
of crashing on it in a loop that starves every other run of the equipment.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path

import pytest

from exlab_wizard.sync.nas_client import SyncHandleState
from exlab_wizard.sync.states import SyncJobState
from tests.helpers import NESTED_IN_A_FIELD
from tests.lab import Lab, make_client


def _spoil(run: Path, how: str) -> None:
    target = run / ".exlab-wizard" / "creation.json"
    if how == "nested":
        target.write_bytes(NESTED_IN_A_FIELD)
    else:  # a good file, but behind a symbolic link: never followed
        elsewhere = run.parent / "elsewhere.json"
        target.rename(elsewhere)
        target.symlink_to(elsewhere)


@pytest.mark.parametrize("how", ["nested", "symlink"])
async def test_the_bad_run_is_held_once_and_the_other_run_of_the_equipment_syncs(
    lab: Lab, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    bad = lab.make_run("Run_2026-01-01_bad")
    good = lab.make_run("Run_2026-01-02_good")
    config = lab.config(scan_interval_s=3600)
    queuing = make_client(config)
    await queuing.init(run_workers=False)
    try:
        for run in (bad, good):  # both clean when queued; the bad one is the older job
            assert (await queuing.enqueue(run)).state == SyncHandleState.QUEUED
    finally:
        await queuing.close()
    _spoil(bad, how)
    spoiled = os.lstat(bad / ".exlab-wizard" / "creation.json")

    caplog.set_level(logging.WARNING)
    client = make_client(config)
    await client.init()
    try:
        await client.wait_idle(timeout=30)
        held, synced = await client.job(bad), await client.job(good)
    finally:
        await client.close()

    assert synced.state == SyncJobState.VERIFIED, synced.last_error
    assert held.state == SyncJobState.QUEUED
    assert held.next_attempt_at is not None
    assert held.next_attempt_at > dt.datetime.now(dt.UTC) + dt.timedelta(minutes=50)
    holds = [e for e in held.events if e.kind == "gate_hold"]
    assert len(holds) == 1 and "unreadable_creation_json" in holds[0].detail
    assert not [r for r in caplog.records if r.exc_info], "a job step crashed"
    after = os.lstat(bad / ".exlab-wizard" / "creation.json")
    assert (after.st_mode, after.st_size, after.st_mtime_ns) == (spoiled.st_mode, spoiled.st_size, spoiled.st_mtime_ns)
    assert not lab.nas_copy(bad).exists()
