"""A folder name rsync reads as a pattern (``[``, and with an override ``*``, ``?``) names that folder alone.

The gate refuses ``* ?`` in names but not ``[``. rsync_ssh lists a remote run
folder with ``rsync --list-only -r host:<remote run>/``, and the remote side
(its shell, rrsync, or rsync itself) expands wildcards in such a path, source
or destination: ``Runs/Run_[1]/`` named ``Runs/Run_1/`` whenever a folder of
that name existed. The reaper's last look at the NAS right before deletion
(interlock 4, ``remote_listing``) then compared the verified sizes with
*another run's* folder; two runs of one instrument write fixed names and
sizes, so a lost NAS copy of ``Run_[1]`` went unseen and the local data were
deleted (rule 1). The conflict check saw the sibling's files (a run refused for
good), and a project ``P[1]`` next to ``P1`` never got its own folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock
from tests.lab import FILES, METADATA, TWIN_FILES, Site, data_intact, ready, running, synced, write_files

S = SyncJobState


@pytest.fixture
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Site:
    return Site.on(request, tmp_path, "rsync_ssh")


async def test_the_last_look_before_deletion_reads_this_runs_nas_folder_not_a_glob_match(site: Site) -> None:
    clock = Clock()
    run = site.make_run("Run_[1]", files=FILES)
    cfg = site.config(
        sync={"audit_interval_s": 6 * 3600, "scan_interval_s": 3600},
        cleanup={"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": True},
    )
    async with running(cfg, clock) as client:
        await ready(client, clock, run)  # verified, two passes, 25 h old: only the last look is left
        nas = site.nas_copy(run)
        assert nas.name == "Run_[1]" and (nas / "image_001.tif").read_bytes() == FILES["image_001.tif"]
        # Another instrument PC of the lab, configured alike, sends its run Run_1: same names and sizes.
        write_files(nas.with_name("Run_1"), {**TWIN_FILES, f"{METADATA}/claims/{'e' * 32}": b"the other PC's job\n"})
        # The NAS copy of Run_[1] is lost after its last audit (someone removes the folder on the NAS).
        shutil.rmtree(nas)
        await client.cleanup_once()
        await client.wait_idle(timeout=60)
        job = await client.job(run)
    assert data_intact(run, FILES), (
        f"local data of {run.name} deleted while its NAS folder does not exist "
        f"(the last look listed Run_1); job {job.state.value}: {job.last_error}"
    )


async def test_a_run_named_with_a_bracket_is_not_refused_for_a_sibling_folders_files(site: Site) -> None:
    """``Run_[1]`` was refused ``remote_conflict`` for ``Run_1``'s verified copy, for good."""
    clock = Clock()
    other = site.make_run("Run_1", files=TWIN_FILES)
    run = site.make_run("Run_[1]", files=FILES)
    async with running(site.config(), clock) as client:
        await synced(client, other)
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
    assert job.state == S.VERIFIED, f"{job.state.value} {job.error_kind}: {job.last_error}"
    assert (site.nas_copy(run) / "image_001.tif").read_bytes() == FILES["image_001.tif"]
    assert (site.nas_copy(other) / "image_001.tif").read_bytes() == TWIN_FILES["image_001.tif"]


async def test_a_project_named_with_a_bracket_gets_its_own_nas_folder(site: Site) -> None:
    """A project folder ``P[1]`` (any path segment above the run) was listed as ``P1`` when that existed."""
    clock = Clock()
    other = site.make_run("Run_0", files=TWIN_FILES, project="P1")
    run = site.make_run("Run_A", files=FILES, project="P[1]")
    async with running(site.config(), clock) as client:
        await synced(client, other)
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
    assert job.state == S.VERIFIED, f"{job.state.value} {job.error_kind}: {job.last_error}"
    assert (site.nas_copy(run) / "notes.txt").read_bytes() == FILES["notes.txt"]
    assert not (site.nas_copy(other).parent / "Run_A").exists()
