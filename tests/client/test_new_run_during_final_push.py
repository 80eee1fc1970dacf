"""A new run made under the name of a run whose cleanup waits for its final push is never taken for it.

``retain_cache: false``: the reaper deleted the verified data of Run_A and
waits for the final metadata push (the NAS refused it once). The folder then
holds only ``.exlab-wizard/``; the lab deletes it and the instrument starts a
new acquisition under the same name (its own creation.json, new data, no
checksums.sha256). The next pass resumed the old job at step 5: it pushed the
*new* run's ``.exlab-wizard/`` into the old run's NAS folder (its
creation.json over the old run's record: rule 2), "proved" it, deleted the new
run's creation.json locally and marked the old job CLEANED (found by review).

Now the plan remembers the folder it was written in (queue migration 12), and
after the data are deleted a folder at the path that is not that one, or that
holds no record of this cleanup, is another run's: nothing is pushed from it
or deleted in it, and the old job ends CLEANED without its final push (event
``final_push_skipped``); its verified manifest is on the NAS since the push
after its verification. The new run stays as it was made; a CLEANED run is not
sent again, so the audit tells the lab (``late_data``) to move it into a new
run folder (one job per run path for life, DESIGN section 2).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from exlab_wizard.config import Config
from exlab_wizard.sync.reaper import Reaper
from exlab_wizard.sync.states import SyncJobState
from tests.client.upgrade import as_version, user_version
from tests.helpers import Clock
from tests.lab import FILES, Site, acts, events, ready, running, write_creation, write_files

S = SyncJobState
NEW = {"image_001.tif": b"N" * 3500, "notes.txt": b"second acquisition\n"}
CREATION = ".exlab-wizard/creation.json"
MANIFEST = ".exlab-wizard/checksums.sha256"


def _config(site: Site) -> Config:
    return site.config(
        sync={"audit_interval_s": 6 * 3600, "scan_interval_s": 3600},
        cleanup={"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": False},
    )


def first_final_push_fails(client: Any) -> None:
    reaper = client._reaper
    real_push = reaper.push_metadata
    calls: list[int] = []

    async def push(job_row: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            return False
        return await real_push(job_row)

    reaper.push_metadata = push


async def _data_deleted_final_push_waiting(client: Any, clock: Clock, run: Path) -> None:
    await ready(client, clock, run)
    first_final_push_fails(client)
    outcomes = acts(await client.cleanup_once())
    assert [o.action for o in outcomes] == ["waiting"], outcomes
    assert not any((run / rel).exists() for rel in FILES)  # data deleted, .exlab-wizard/ kept


def _new_run_in_its_place(run: Path) -> bytes:
    """The lab removes what is left and a new run of the same name is made in its place."""
    shutil.rmtree(run)
    run.mkdir()
    write_creation(run, nas=None, sample="second acquisition")
    write_files(run, NEW)
    return (run / CREATION).read_bytes()


async def _the_old_job_finishes_without_touching_the_new_run(
    client: Any, site: Site, run: Path, nas: Path, new_files: dict[str, bytes]
) -> Any:
    second = acts(await client.cleanup_once())
    second += acts(await client.cleanup_once())
    job = await client.job(run)
    nas_record = json.loads((nas / CREATION).read_text())
    problems = []
    if nas_record.get("sample") != "first acquisition":
        problems.append(f"the old run's NAS creation.json now says sample={nas_record.get('sample')!r}")
    for rel, data in new_files.items():
        if not (run / rel).is_file():
            problems.append(f"the new run's {rel} was deleted locally")
        elif (run / rel).read_bytes() != data:
            problems.append(f"the new run's {rel} was rewritten")
    assert not problems, f"{problems}; old job {job.state}: {[(o.action, o.reason) for o in second]}"
    # The old job is done, without a push from a folder that is not its own, and says why.
    assert job.state == S.CLEANED, [(o.action, o.reason) for o in second]
    skipped = events(job, "final_push_skipped")
    assert len(skipped) == 1 and skipped[0].code == "run_folder_replaced", [(e.kind, e.detail) for e in job.events]
    assert "another run's folder" in skipped[0].detail and "without local_cleaned" in skipped[0].detail
    assert site.log_lines("cleanup_final_push_skipped")
    # What the skipped push would have carried is on the NAS since the push after the verification.
    assert hashlib.sha256((nas / MANIFEST).read_bytes()).hexdigest() == job.manifest_digest
    assert "local_cleaned" not in nas_record and nas_record.get("sync_status") == "synced"
    assert all((nas / rel).read_bytes() == data for rel, data in FILES.items())
    # A cleaned run is not sent again: the audit names the new files for the lab to move.
    await client.audit_once()
    late = events(await client.job(run), "late_data")
    assert late and all(rel in late[-1].detail for rel in NEW), [(e.kind, e.detail) for e in job.events]
    return job


async def test_the_old_jobs_final_push_never_takes_a_new_runs_metadata_for_its_own(site: Site) -> None:
    clock = Clock()
    site.creation_extra = {"sample": "first acquisition"}
    run = site.make_run("Run_A", files=FILES)
    nas = site.nas_copy(run)
    async with running(_config(site), clock) as client:
        await _data_deleted_final_push_waiting(client, clock, run)
        new_record = _new_run_in_its_place(run)
        await _the_old_job_finishes_without_touching_the_new_run(client, site, run, nas, {CREATION: new_record, **NEW})


async def test_a_folder_put_in_its_place_is_not_the_runs_even_with_a_copy_of_its_cache(site: Site) -> None:
    """The run folder moved aside and another made at its path holding a copy of its ``.exlab-wizard/``
    (its creation.json recording local_cleaned, the verified checksums.sha256) and new data: only the
    folder's device and inode, remembered with the plan, tell it from the run's own."""
    clock = Clock()
    site.creation_extra = {"sample": "first acquisition"}
    run = site.make_run("Run_A", files=FILES)
    nas = site.nas_copy(run)
    async with running(_config(site), clock) as client:
        await _data_deleted_final_push_waiting(client, clock, run)
        aside = run.with_name("Run_A.moved")
        run.rename(aside)  # kept: its inodes are not free for the new folder
        shutil.copytree(aside / ".exlab-wizard", run / ".exlab-wizard")
        write_files(run, NEW)
        cache = {str(p.relative_to(run)): p.read_bytes() for p in (run / ".exlab-wizard").rglob("*") if p.is_file()}
        assert json.loads(cache[CREATION])["local_cleaned"]
        nas_record = (nas / CREATION).read_bytes()
        await _the_old_job_finishes_without_touching_the_new_run(client, site, run, nas, {**cache, **NEW})
    assert (nas / CREATION).read_bytes() == nas_record


async def test_a_plan_written_before_migration_12_judges_the_folder_by_what_it_holds(site: Site) -> None:
    """A plan from an engine before queue migration 12 has no folder identity (NULL): a folder with no
    checksums.sha256 and no local_cleaned record of this cleanup is another run's."""
    clock = Clock()
    site.creation_extra = {"sample": "first acquisition"}
    run = site.make_run("Run_A", files=FILES)
    nas = site.nas_copy(run)
    async with running(_config(site), clock) as client:
        await _data_deleted_final_push_waiting(client, clock, run)
    db = site.state / "queue.db"
    as_version(db, 11)  # the plan's row as that engine wrote it
    assert user_version(db) == 11
    new_record = _new_run_in_its_place(run)
    async with running(_config(site), clock) as client:  # the upgraded engine
        await _the_old_job_finishes_without_touching_the_new_run(client, site, run, nas, {CREATION: new_record, **NEW})


async def test_the_final_push_itself_refuses_a_folder_put_in_place_after_the_reaper_looked(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder swapped right after the reaper's look: the final push looks again before it sends,
    and the next pass finishes the old job without it."""
    clock = Clock()
    site.creation_extra = {"sample": "first acquisition"}
    run = site.make_run("Run_A", files=FILES)
    nas = site.nas_copy(run)
    async with running(_config(site), clock) as client:
        await _data_deleted_final_push_waiting(client, clock, run)
        real = Reaper._another_runs_folder

        def look_then_swap(self: Reaper, progress: Any) -> str | None:
            answer = real(self, progress)
            monkeypatch.undo()
            run.rename(run.with_name("Run_A.moved"))  # kept: its inodes are not free for the new folder
            run.mkdir()
            write_creation(run, nas=None, sample="second acquisition")
            write_files(run, NEW)
            return answer

        monkeypatch.setattr(Reaper, "_another_runs_folder", look_then_swap)
        outcomes = acts(await client.cleanup_once())
        assert [o.action for o in outcomes] == ["waiting"], outcomes
        assert "final metadata push refused: the run folder is not the one the cleanup was planned in" in (
            outcomes[0].reason
        )
        assert json.loads((nas / CREATION).read_text()).get("sample") == "first acquisition"
        assert (run / CREATION).is_file() and all((run / r).read_bytes() == d for r, d in NEW.items())
        outcomes = acts(await client.cleanup_once())
        job = await client.job(run)
    assert [o.action for o in outcomes] == ["deleted"] and job.state == S.CLEANED, outcomes
    assert [e.code for e in events(job, "final_push_skipped")] == ["run_folder_replaced"]
    assert json.loads((nas / CREATION).read_text()).get("sample") == "first acquisition"
    assert (run / CREATION).is_file() and all((run / r).read_bytes() == d for r, d in NEW.items())
