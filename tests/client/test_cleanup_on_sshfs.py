"""The mount transport on a real sshfs share (FUSE over the loopback sshd), cleanup on.

A lab mounts its NAS with sshfs; ``mount_path`` is the sshfs mount point and
the marker ``.exlab-nas`` lies on the server. sshfs answers a stat or a
listing from its own cache for up to 20 s (``cache_timeout``), so the reaper's
last look before a deletion must go to the server (docs/cleanup.md: "read from
the NAS itself, never from a cache"). Through the real client and reaper: the
whole flow, a mount that died (ENOTCONN), the read-back against bytes changed
on the server behind the mount's back, and the last look at a NAS copy removed
on the server a moment before the pass.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports import TransportError, TransportErrorKind
from exlab_wizard.sync.transports.mount import MountTransport
from tests.fixtures.fuse_shares import Sshfs, sshfs_lab
from tests.helpers import Clock
from tests.lab import (
    FILES,
    Lab,
    acts,
    cleanup_config,
    flip_before_read_back,
    held_files,
    nothing_deleted,
    ready_run,
    running,
)

S = SyncJobState
pytestmark = pytest.mark.network


@pytest.fixture
def share(tmp_path: Path, sshd_factory, remote_dir: Path) -> Iterator[tuple[Lab, Sshfs]]:
    """A one-equipment lab whose NAS (``tmp_path/nas``) is ``remote_dir`` on the sshd, mounted with sshfs."""
    with sshfs_lab(tmp_path, sshd_factory(), remote_dir) as (lab, mount):
        assert (lab.nas / ".exlab-nas").is_file()
        yield lab, mount


async def test_the_whole_flow_with_cleanup_on_sshfs(share, remote_dir: Path) -> None:
    lab, _mount = share
    async with ready_run(lab) as (client, _clock, run):
        outcomes = acts(await client.cleanup_once())
        assert [o.action for o in outcomes] == ["deleted"], outcomes
        assert (await client.job(run)).state == S.CLEANED
    assert not any((run / rel).exists() for rel in FILES)
    assert held_files(lab.server_copy(run, remote_dir)) == FILES


async def test_a_dead_sshfs_mount_is_never_an_empty_nas(share, remote_dir: Path) -> None:
    """sshfs killed: every access to the mount point is ENOTCONN (rule 3)."""
    lab, mount = share
    async with ready_run(lab) as (client, _clock, run):
        mount.kill()
        await client.audit_once()
        job = await client.job(run)
        assert job.state in (S.VERIFIED, S.CLEANUP_ELIGIBLE) and job.verify_passes == 2, (job.state, job.last_error)
        nothing_deleted(run, acts(await client.cleanup_once()))
    assert held_files(lab.server_copy(run, remote_dir)) == FILES


async def test_bytes_changed_on_the_server_after_the_write_are_seen_by_the_verification(
    share, remote_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read-back goes to the server, not to this machine's page cache of the bytes just written."""
    lab, _mount = share
    clock = Clock()
    run = lab.make_run(files=FILES)
    nas = lab.server_copy(run, remote_dir)
    fired = flip_before_read_back(monkeypatch, nas)
    async with running(cleanup_config(lab), clock) as client:
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
    assert fired
    mismatches = [e for e in job.events if "mismatch" in (e.detail or "") or e.kind == "hash_mismatch"]
    assert mismatches, [(e.kind, e.detail) for e in job.events]
    assert held_files(nas) == FILES  # re-sent


async def test_the_last_look_before_deleting_is_not_sshfs_s_cache(share, remote_dir: Path) -> None:
    """The NAS copy removed on the server a moment after a look through the mount (an admin, a snapshot restore).

    The reaper's listing right before the deletion must show the NAS as it is,
    not sshfs's cached listing of the dry run a moment before.
    """
    lab, _mount = share
    async with ready_run(lab) as (client, _clock, run):
        [dry] = await client.cleanup_once(dry_run=True)  # looks at the NAS copy through the mount
        assert dry.action == "would_delete", dry
        shutil.rmtree(lab.server_copy(run, remote_dir))  # gone on the server
        outcomes = acts(await client.cleanup_once())
        job = await client.job(run)
    nothing_deleted(run, outcomes, job.state)  # rule 1: its NAS copy is gone, the local bytes stay


async def test_remote_stats_are_the_server_s_not_sshfs_s_cache(share, remote_dir: Path) -> None:
    """Files removed and grown on the server a moment after a listing through the mount: the next listing sees both.

    A size changed within the kernel's own attribute cache time (1 s) too: an
    ``fstat`` right after the open would still give the old one.
    """
    lab, _mount = share
    async with ready_run(lab) as (_client, _clock, run):
        pass  # synced and audited: the NAS copy is there
    transport = MountTransport(lab.config().equipment[0])
    assert set(FILES) <= set(await transport.remote_stats(run))
    nas = lab.server_copy(run, remote_dir)
    (nas / "sub" / "stack.raw").unlink()
    with open(nas / "notes.txt", "ab") as grown:
        grown.write(b"more")
    after = await transport.remote_stats(run)
    assert "sub/stack.raw" not in after
    assert after["notes.txt"].size == len(FILES["notes.txt"]) + 4


async def test_a_marker_removed_on_the_server_is_not_mounted_at_once(share, remote_dir: Path) -> None:
    """The mount guard opens the marker: sshfs's cached stat of it a moment before does not answer."""
    lab, _mount = share
    transport = MountTransport(lab.config().equipment[0])
    run = lab.make_run(files=FILES)
    assert await transport.reachable(run)
    (remote_dir / ".exlab-nas").unlink()  # the share is not the NAS any more
    assert not await transport.reachable(run)
    with pytest.raises(TransportError) as raised:
        await transport.remote_stats(run)
    assert raised.value.kind is TransportErrorKind.NETWORK
