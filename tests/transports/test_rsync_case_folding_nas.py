"""rsync_ssh onto a NAS whose filesystem folds letter case: twins of one folder are refused, never sent.

rsync looks names up exactly on the NAS. A late ``a.tif`` beside the verified
``A.tif`` was sent: the NAS's look-up of ``a.tif`` found ``A.tif`` and replaced
it (kept under previous/), the verification could never pass (the NAS lists one
file for two), the pushes flipped the one NAS file between the two contents,
and the job ended FAILED ``hash_mismatch`` (or ``remote_conflict`` over its own
``Sub/B.tif``). With the two files of one size and mtime the NAS was left with
the late bytes in ``A.tif``'s place, the verified ``A.tif`` only under
previous/<stamp>/, and renaming the late file then failed
``local_file_vanished`` for good. The push now refuses such a run before its
claim and any write (``remote_write_refused`` naming both, as the mount and
rclone transports do); a NAS that tells case apart takes both files.

The folding NAS: the loopback sshd's remote root on an exFAT filesystem mounted
through exfat-fuse (owned by the login user ``exlabt_rw``): names that differ
only in case are one file, listings keep the case a name was created with, as
an SMB share, macOS/APFS or a case-insensitive Synology share do. Needs root,
/dev/fuse and a loop device.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports.base import TransportError, TransportErrorKind
from exlab_wizard.sync.transports.rsync_ssh import RsyncSshTransport
from tests.fixtures.fuse_shares import exfat_remote
from tests.fixtures.sshd import RW_USER
from tests.helpers import Clock
from tests.lab import EQ, Site, acts, ready, running
from tests.lab import make_hostile_run as make_run
from tests.lab import rsync_equipment as equipment

pytestmark = pytest.mark.network
S = SyncJobState
K = TransportErrorKind
CLEANUP = {"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": True}
SYNC = {"audit_interval_s": 6 * 3600, "scan_interval_s": 3600}
T = 1_700_000_000


@pytest.fixture
def nas() -> Iterator[Path]:
    with exfat_remote() as point:
        yield point


def rsync_site(request: pytest.FixtureRequest, root: Path, nas: Path) -> Site:
    """rsync_ssh to the loopback sshd, its remote root on the exFAT share ``nas``."""
    server = request.getfixturevalue("sshd")
    site = Site(root, root / "lab", nas, root / "state", (EQ,), kind="rsync_ssh")
    site.local_root.mkdir(parents=True)
    site.nas_root.mkdir()
    site.transport = {
        "type": "rsync_ssh",
        "ssh_target": f"{RW_USER}@127.0.0.1",
        "ssh_key_path": str(server.env.client_key),
        "ssh_port": server.port,
        "remote_path": str(site.nas_root),
        "ssh_known_hosts": str(server.known_hosts),
    }
    return site


def names(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def listed(remote: Path) -> dict[str, bytes]:
    """The NAS run folder's data files under the names its folders list (``.exlab-wizard/`` left out)."""
    out = {}
    for folder, dirs, files in os.walk(remote):
        dirs[:] = [d for d in dirs if d != ".exlab-wizard"]
        for f in files:
            path = Path(folder) / f
            out[str(path.relative_to(remote))] = path.read_bytes()
    return out


def kept(remote: Path) -> list[str]:
    folder = remote / ".exlab-wizard" / "previous"
    return names(folder) if folder.is_dir() else []


def write(run: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(data)
        os.utime(run / rel, (T, T))  # an instrument's files of one second


async def _late(site: Site, first: dict[str, bytes], late: dict[str, bytes]):
    """``first`` synced and verified twice, then ``late`` written into the run and the run enqueued again."""
    run = site.make_run("Run_1", files={})
    write(run, first)
    clock = Clock()
    async with running(site.config(cleanup=CLEANUP, sync=SYNC), clock) as client:
        await ready(client, clock, run)
        write(run, late)
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
    return run, job


@pytest.mark.parametrize(
    "verified,late",
    [
        ({"A.tif": b"verified frame A"}, {"a.tif": b"late frame, lower-case name"}),
        ({"A.tif": b"X" * 16}, {"a.tif": b"Y" * 16}),  # one size, one mtime: rsync's look-up finds "a.tif" up to date
    ],
    ids=["other_size", "same_size_and_mtime"],
)
async def test_a_late_case_twin_is_refused_and_never_displaces_the_verified_copy(
    request, tmp_path, nas, verified, late
):
    site = rsync_site(request, tmp_path, nas)
    run, job = await _late(site, verified, late)
    remote = site.nas_copy(run)
    # rule 2: the verified NAS copy stays in its place, under its name, nothing written over it.
    assert listed(remote) == verified, (listed(remote), kept(remote), job.state.value, job.last_error)
    assert kept(remote) == [], f"the verified copy was replaced (kept under previous/): {kept(remote)}"
    # and the job says why, as the mount transport does: the NAS takes A.tif and a.tif for one file.
    assert job.error_kind == K.REMOTE_WRITE_REFUSED.value, (job.state.value, job.last_error)
    assert "'A.tif'" in job.last_error and "'a.tif'" in job.last_error


async def test_a_late_file_in_a_case_twin_folder_is_refused_not_called_someone_elses(request, tmp_path, nas):
    site = rsync_site(request, tmp_path, nas)
    run, job = await _late(site, {"Sub/A.tif": b"verified frame A"}, {"sub/B.tif": b"late B"})
    remote = site.nas_copy(run)
    assert listed(remote) == {"Sub/A.tif": b"verified frame A"}, listed(remote)
    assert job.error_kind == K.REMOTE_WRITE_REFUSED.value, (job.state.value, job.last_error)


async def test_a_first_push_of_case_twins_is_refused_before_anything_is_written(request, tmp_path, nas):
    """No NAS folder of the run yet: the NAS is asked through the run's parent folders."""
    site = rsync_site(request, tmp_path, nas)
    run = site.make_run("Run_1", files={})
    write(run, {"A.tif": b"frame A", "a.tif": b"frame a"})
    clock = Clock()
    async with running(site.config(cleanup=CLEANUP, sync=SYNC), clock) as client:
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
    assert job.error_kind == K.REMOTE_WRITE_REFUSED.value, (job.state.value, job.last_error)
    assert "'A.tif'" in job.last_error and "'a.tif'" in job.last_error
    remote = site.nas_copy(run)
    assert listed(remote) == {} and not (remote / ".exlab-wizard" / "claims").exists()
    # the NAS was asked, through the run's parent folder (its answer, not the safe side of none)
    assert [" folds=true " in line for line in site.log_lines("remote_folds_case")] == [True]


async def test_renaming_the_late_twin_lets_the_run_sync_and_clean(request, tmp_path, nas):
    """The whole client flow with cleanup: what the lab does once told of the twins (rename one, retry)."""
    site = rsync_site(request, tmp_path, nas)
    run = site.make_run("Run_1", files={})
    write(run, {"A.tif": b"X" * 16, "B.tif": b"frame B"})
    remote = site.nas_copy(run)
    clock = Clock()
    async with running(site.config(cleanup=CLEANUP, sync=SYNC), clock) as client:
        await ready(client, clock, run)
        write(run, {"a.tif": b"Y" * 16})  # a late frame, same size and second
        assert [o.action for o in acts(await client.cleanup_once())] == [
            "requeued"
        ]  # the reaper sees it: nothing deleted
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert job.state == S.FAILED
        os.rename(run / "a.tif", run / "a_late.tif")
        await client.retry(job.id)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        on_nas = listed(remote)
        assert job.state == S.VERIFIED, (job.state.value, job.last_error, on_nas, kept(remote))
        clock.advance(7)
        await client.audit_once()
        clock.advance(20)
        outcomes = acts(await client.cleanup_once())
        job = await client.job(run)
    assert [o.action for o in outcomes] == ["deleted"] and job.state == S.CLEANED
    assert listed(remote) == {"A.tif": b"X" * 16, "B.tif": b"frame B", "a_late.tif": b"Y" * 16}


@pytest.mark.parametrize("when", ["late", "first_push"])
async def test_a_nas_that_tells_case_apart_takes_both_twins(request, tmp_path, when):
    """The loopback sshd's ordinary remote root (ext4): A.tif and a.tif, Sub/ and sub/ are all sent and verified."""
    site = Site.on(request, tmp_path, "rsync_ssh")
    first = {"A.tif": b"frame A", "Sub/A.tif": b"frame Sub/A"}
    late = {"a.tif": b"frame a, other bytes", "sub/B.tif": b"frame sub/B"}
    if when == "late":
        run, job = await _late(site, first, late)
    else:
        run = site.make_run("Run_1", files={})
        write(run, {**first, **late})
        clock = Clock()
        async with running(site.config(cleanup=CLEANUP, sync=SYNC), clock) as client:
            await client.enqueue(run)
            await client.wait_idle(timeout=60)
            job = await client.job(run)
    assert job.state == S.VERIFIED, (job.state.value, job.last_error)
    assert listed(site.nas_copy(run)) == {**first, **late}
    # the NAS was asked (its answer, not the safe side of none)
    assert [" folds=false " in line for line in site.log_lines("remote_folds_case")] == [True]


@pytest.mark.parametrize("folds", [True, False], ids=["exfat", "ext4"])
async def test_an_account_that_refuses_commands_is_asked_with_rsync_listings(
    request, tmp_path, sshd, remote_dir, folds
):
    """An rrsync account (``rrsync -ro /``: rsync only, no commands) answers the fold check too."""
    root = request.getfixturevalue("nas") if folds else remote_dir
    run = make_run(tmp_path / "lab", {"B.tif": b"frame B"}, symlink=False)
    await RsyncSshTransport(equipment(tmp_path, sshd, root)).push(run, bwlimit_kibps=None)
    write(run, {"A.tif": b"frame A", "a.tif": b"frame a"})  # two new files, neither on the NAS
    restricted = equipment(tmp_path, sshd, root, key=sshd.env.rrsync_key)
    with pytest.raises(TransportError) as caught:
        await RsyncSshTransport(restricted).push(run, bwlimit_kibps=None)
    # folding: refused by the fold check; telling case apart: past it, refused by rrsync's -ro (a write)
    assert caught.value.kind == K.REMOTE_WRITE_REFUSED, caught.value.message
    assert ("'A.tif' and 'a.tif' for one file" in caught.value.message) == folds, caught.value.message
