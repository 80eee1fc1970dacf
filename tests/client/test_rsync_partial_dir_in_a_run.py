"""A data folder named ``.rsync-partial`` is the run's own, never taken for rsync's partial-dir.

The rsync_ssh push ran ``rsync --partial --partial-dir=.rsync-partial`` into a
NAS run folder that exists. rsync gives that relative partial-dir a meaning in
*every* folder of the transfer: ``D/.rsync-partial/N`` is the partial upload
of ``D/N``. Sending ``D/N`` it used a file found there as the basis and then
**deleted it** (an upload cut off would have written there), and it left
``.rsync-partial/`` folders out of what it sent.

The gate accepts such a name. A run holding ``a.tif`` and
``.rsync-partial/a.tif`` is pushed whole into a new folder (``--inplace``, no
partial-dir) and verified. After an edit of ``a.tif`` the run was sent again:
rsync deleted the verified NAS copy of ``.rsync-partial/a.tif``, not kept under
``previous/``, and every retry ended FAILED ``hash_mismatch`` (rule 2: a
verified NAS copy is never replaced without being kept). Such a run is now
pushed without a partial-dir.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports.rsync_ssh import RsyncSshTransport
from tests.helpers import Clock
from tests.lab import Site, everything_under, running, synced

S = SyncJobState
TWIN = ".rsync-partial/a.tif"
FILES = {"a.tif": os.urandom(3000), TWIN: b"verified data in a folder named like rsync's partial-dir\n"}


@pytest.fixture
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Site:
    return Site.on(request, tmp_path, "rsync_ssh")


async def test_a_verified_nas_file_under_rsync_partial_is_never_destroyed_by_a_later_push(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    run = site.make_run(files=FILES)
    nas = site.nas_copy(run)
    seen: list[str] = []
    real_manifest = RsyncSshTransport.remote_manifest

    async def looking(self, run_path, *args, **kwargs):  # right after each push, before its verification
        kept = everything_under(nas / ".exlab-wizard" / "previous") if (nas / ".exlab-wizard").exists() else []
        here = (nas / TWIN).read_bytes() if (nas / TWIN).is_file() else None
        if here != FILES[TWIN] and FILES[TWIN] not in kept:
            seen.append(f"NAS copy of {TWIN!r}: {here!r}; not under previous/ either")
        return await real_manifest(self, run_path, *args, **kwargs)

    monkeypatch.setattr(RsyncSshTransport, "remote_manifest", looking)
    async with running(site.config(), clock) as client:
        job = await synced(client, run)
        assert (nas / TWIN).read_bytes() == FILES[TWIN]  # verified on the NAS under its own name
        assert not seen
        # An edit of a.tif (new bytes, later mtime): the run is sent again.
        (run / "a.tif").write_bytes(os.urandom(3000))
        os.utime(run / "a.tif", (1_900_000_000, 1_900_000_000))
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
    assert not seen, (
        f"a verified NAS file was destroyed by the push (rule 2): {seen}; "
        f"job {job.state.value} {job.last_error}; events {[(e.kind, e.detail) for e in job.events][-8:]}"
    )


OWN = ".rsync-partial/a.tif"
LOST_FILES = {
    "a.tif": os.urandom(3000),
    "b.tif": os.urandom(2000),
    OWN: b"verified data of the run, in its own folder\n",
}


async def test_a_verified_nas_copy_under_the_runs_own_rsync_partial_folder_is_never_removed(site: Site) -> None:
    """The folder lost locally (it looks like rsync's junk): its verified NAS copy is not a leftover (found by review)."""
    clock = Clock()
    run = site.make_run(files=LOST_FILES)
    nas = site.nas_copy(run)
    async with running(site.config(), clock) as client:
        await synced(client, run)
        assert (nas / OWN).read_bytes() == LOST_FILES[OWN]  # verified on the NAS
        # Locally, the folder that looks like rsync's junk is removed; a.tif is edited.
        shutil.rmtree(run / ".rsync-partial")
        (run / "a.tif").write_bytes(os.urandom(3000))
        os.utime(run / "a.tif", (1_900_000_000, 1_900_000_000))
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
    kept = everything_under(nas / ".exlab-wizard" / "previous") if (nas / ".exlab-wizard" / "previous").exists() else []
    here = (nas / OWN).read_bytes() if (nas / OWN).is_file() else None
    assert here == LOST_FILES[OWN] or LOST_FILES[OWN] in kept, (
        f"the verified NAS copy of {OWN!r} was deleted by the push (taken for rsync's leftover), not kept "
        f"under previous/ either; its local copy is gone too: no copy left. job {job.state.value} "
        f"{job.error_kind}: {job.last_error}"
    )
