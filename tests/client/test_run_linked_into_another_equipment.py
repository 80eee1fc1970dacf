"""A run reached through a symbolic link that leads into another equipment's folder.

``CONFOCAL_01/SHARED -> FACS_02/PROJ-1`` (a data manager's shortcut so the
confocal's users "see" the cytometer's project). As the HTTP API does
(service/runpaths.py), ``enqueue`` takes a run only inside one equipment's
folder both as written and with its links resolved
(``Config.equipment_holding``): else the FACS run would be sent under
CONFOCAL_01 to the confocal's NAS folder and the confocal's reaper would
delete the FACS run's local files. A job verified before the link was made
is not cleaned, restored or sent through it either.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from exlab_wizard.sync.nas_client import EnqueueError
from exlab_wizard.sync.recovery import RestoreError
from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock
from tests.lab import EQ, FILES, Lab, acts, cleanup_config, running, synced

S = SyncJobState
OTHER = "FACS_02"


async def test_a_run_reached_through_a_link_into_another_equipment_is_not_taken_as_this_ones(tmp_path: Path) -> None:
    lab = Lab.build(tmp_path)
    facs_run = lab.make_run("Run_1", files=FILES, equipment=OTHER)
    (lab.local_root / EQ).mkdir()
    os.symlink(lab.local_root / OTHER / lab.project, lab.local_root / EQ / "SHARED")
    via_link = lab.local_root / EQ / "SHARED" / "Runs" / "Run_1"
    clock = Clock()
    async with running(cleanup_config(lab), clock) as client:
        with pytest.raises(EnqueueError) as refused:
            await client.enqueue(via_link)
        assert refused.value.kind == "linked_away"
        message = str(refused.value)
        assert "\n" not in message and EQ in message and OTHER in message and str(facs_run) in message, message
        assert await client.job(via_link) is None
        # The run is FACS_02's, enqueued where it lies, and its own NAS folder gets it.
        await synced(client, facs_run)
    assert all((facs_run / rel).is_file() for rel in FILES)
    assert (lab.nas_copy(facs_run, OTHER) / "image_001.tif").is_file()
    assert not (lab.nas_copy(via_link) / "image_001.tif").exists()


def _move_behind_a_link(lab: Lab) -> Path:
    """``CONFOCAL_01/SHARED`` moved into FACS_02's folder, a link left in its place; the new place of the run."""
    shared, moved = lab.local_root / EQ / "SHARED", lab.local_root / OTHER / "SHARED"
    moved.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(shared, moved)
    os.symlink(moved, shared)
    return moved / "Runs" / "Run_1"


async def test_a_verified_run_now_behind_such_a_link_is_neither_cleaned_nor_restored_nor_sent(tmp_path: Path) -> None:
    lab = Lab.build(tmp_path)
    run = lab.make_run("Run_1", files=FILES, project="SHARED")
    clock = Clock()
    async with running(cleanup_config(lab), clock) as client:
        job = await synced(client, run)
        for _ in range(4):  # passes and age: the reaper would delete now
            clock.advance(7)
            await client.audit_once()
        moved = _move_behind_a_link(lab)
        outcomes = acts(await client.cleanup_once())
        await client.audit_once()
        outcomes += acts(await client.cleanup_once())
        assert outcomes and all(o.code == "run_linked_away" for o in outcomes), outcomes
        assert all((moved / rel).is_file() for rel in FILES), "deleted through a link into FACS_02's folder"

        (moved / "notes.txt").write_bytes(b"acquired OK\n")  # damage, as the local check sees it
        with pytest.raises(RestoreError) as refused:
            await client.restore(run)
        assert refused.value.kind == "linked_away" and OTHER in str(refused.value)
        assert (moved / "notes.txt").read_bytes() == b"acquired OK\n"

        # Sent again (the job re-armed): FAILED with the one line, nothing of FACS_02's folder sent.
        queue = client._ctx.require_queue()
        row = queue.get(job.id)
        queue.transition(job.id, row.state, S.QUEUED, now=clock(), detail="test: sent again")
        client._ctx.kick()
        await client.wait_idle(timeout=60)
        job = await client.job(run)
    assert job.state == S.FAILED and OTHER in (job.last_error or ""), (job.state, job.last_error)
    assert (lab.nas_copy(run) / "notes.txt").read_bytes() == FILES["notes.txt"]


async def test_a_verified_run_whose_project_moved_to_another_disk_is_still_cleaned(tmp_path: Path) -> None:
    """A link out of every equipment's folder (a project moved to a second disk when the first filled, a link
    left in its place) is the run's own place: cleaned as before, never refused as another equipment's."""
    lab = Lab.build(tmp_path)
    run = lab.make_run("Run_1", files=FILES)
    clock = Clock()
    async with running(cleanup_config(lab), clock) as client:
        await synced(client, run)
        for _ in range(4):  # passes and age: the reaper would delete now
            clock.advance(7)
            await client.audit_once()
        project = run.parent.parent
        data2 = tmp_path / "data2"
        data2.mkdir()
        shutil.move(project, data2 / project.name)
        os.symlink(data2 / project.name, project)
        outcomes = []
        for _ in range(3):
            clock.advance(7)
            await client.audit_once()
            outcomes += acts(await client.cleanup_once())
        job = await client.job(run)
    assert not any(o.code == "run_linked_away" for o in outcomes), [(o.code, o.reason) for o in outcomes][:1]
    assert job is not None and job.state == S.CLEANED, job
    assert not any(p.is_file() for p in (data2 / project.name).rglob("*") if ".exlab-wizard" not in p.parts)
