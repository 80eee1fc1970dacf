"""The instrument's removable disk (exFAT through exfat-fuse, NTFS through ntfs-3g) as a lab's local_root.

Pulled (its FUSE daemon gone: ENOTCONN under local_root) mid-push,
mid-deletion or at rest: nothing is deleted or marked wrongly, nothing
crashes, and once the disk is back the job completes, though exFAT gives
every file a new inode number then. Symlinks on NTFS are never followed nor
deleted through; the watcher takes a pulled disk for a missing root.

Needs root, /dev/fuse and ntfs-3g, exfat-fuse, exfatprogs (fails without).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from exlab_wizard.service.run_signals import list_runs
from exlab_wizard.sync.reaper import deletion
from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports import mount
from tests.fixtures.local_disks import local_disk, run_on_disk
from tests.helpers import Clock
from tests.lab import Lab, act_once_in, cleanup_config, ready_client, retry_now, running, synced

S = SyncJobState
FILES = {f"f{i:02d}.bin": bytes([65 + i]) * 200_000 for i in range(6)}


def _state(job) -> tuple:
    return job.state.value, job.error_kind, job.last_error


@pytest.mark.parametrize("fs", ["ntfs", "exfat"])
async def test_disk_pulled_during_the_push(tmp_path: Path, monkeypatch, fs: str) -> None:
    with run_on_disk(fs, tmp_path, FILES) as (disk, lab, run):
        clock = Clock()
        fired = act_once_in(monkeypatch, mount.MountTransport, "_copy_small", lambda *a, **k: True, disk.kill_daemon)
        async with running(cleanup_config(lab), clock) as client:
            await client.enqueue(run)
            await client.wait_idle(timeout=60)
            assert fired
            during = _state(await client.job(run))
            disk.plug_back()
            job = await retry_now(client, clock, run)
            after = _state(job)
            if job.state != S.VERIFIED:  # one more try, as the backoff would
                after = _state(await retry_now(client, clock, run))
    assert after[0] == S.VERIFIED.value, f"[{fs}] pulled during the push: {during}; plugged back and retried: {after}"


@pytest.mark.parametrize("fs", ["ntfs", "exfat"])
async def test_disk_pulled_during_the_deletion(tmp_path: Path, monkeypatch, fs: str) -> None:
    with run_on_disk(fs, tmp_path, FILES) as (disk, lab, run):
        async with ready_client(lab, run) as (client, clock):
            fired = act_once_in(monkeypatch, deletion, "delete_batch", lambda *a, **k: True, disk.kill_daemon)
            await client.cleanup_once()
            assert fired
            during = _state(await client.job(run))
            await client.audit_once()
            await client.cleanup_once()
            during2 = _state(await client.job(run))
            disk.plug_back()  # exFAT: every inode numbered anew
            clock.advance(1)
            await client.cleanup_once()
            after = _state(await client.job(run))
    nas = lab.nas_copy(run)
    assert all((nas / rel).read_bytes() == data for rel, data in FILES.items())
    assert during[0] != S.FAILED.value and during2[0] != S.FAILED.value, (during, during2)
    assert after[0] == S.CLEANED.value, f"[{fs}] pulled during the deletion: {during}; plugged back: {after}"


@pytest.mark.parametrize("fs", ["ntfs", "exfat"])
async def test_disk_pulled_at_rest(tmp_path: Path, fs: str) -> None:
    with run_on_disk(fs, tmp_path, FILES) as (disk, lab, run):
        clock = Clock()
        async with running(cleanup_config(lab), clock) as client:
            await synced(client, run)
            disk.kill_daemon()
            states = []
            for _ in range(6):
                clock.advance(6)
                await client.audit_once()
                await client.cleanup_once()
                states.append(_state(await client.job(run)))
            disk.plug_back()
            for _ in range(5):
                clock.advance(6)
                await client.audit_once()
                await client.cleanup_once()
            after = _state(await client.job(run))
    assert all(s[0] != S.FAILED.value for s in states), states
    assert after[0] == S.CLEANED.value, f"[{fs}] pulled at rest: {states[-1]}; plugged back: {after}"


async def test_ntfs_symlinks_in_a_run_are_never_followed_nor_deleted_through(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.bin").write_bytes(b"P" * 3000)
    with local_disk("ntfs", tmp_path / "lab"):
        lab = Lab.build(tmp_path)
        run = lab.make_run("Run_2026-01-01", files={"a.bin": b"A" * 3000, "sub/b.bin": b"B" * 3000})
        os.symlink(outside / "precious.bin", run / "link.bin")  # an NTFS reparse-point symlink
        os.symlink(outside, run / "linkdir")
        time.sleep(2.5)
        async with ready_client(lab, run) as (client, _clock):
            await client.cleanup_once()
            job = await client.job(run)
        nas = lab.nas_copy(run)
        assert not (nas / "link.bin").exists() and not (nas / "linkdir").exists()
        assert job.state == S.CLEANED, job.last_error
        assert os.path.islink(run / "link.bin")
    assert (outside / "precious.bin").read_bytes() == b"P" * 3000


@pytest.mark.parametrize("fs", ["ntfs", "exfat"])
def test_the_watcher_takes_a_pulled_disk_for_a_missing_root_not_an_empty_one(tmp_path: Path, fs: str) -> None:
    with local_disk(fs, tmp_path / "lab") as disk:
        run = tmp_path / "lab/EQ/PROJ/Runs/Run_1"
        run.mkdir(parents=True)
        (run / "x.bin").write_bytes(b"1")
        assert list_runs(tmp_path / "lab/EQ").runs == [str(run)]
        disk.kill_daemon()
        listing = list_runs(tmp_path / "lab/EQ")
        assert listing.root_missing and listing.may_hold(str(run))
        disk.plug_back()
        assert list_runs(tmp_path / "lab/EQ").runs == [str(run)]
