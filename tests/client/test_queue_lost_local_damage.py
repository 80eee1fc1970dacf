"""Local damage made while the queue was lost is never sent over the run's verified NAS copy.

Found in review: a run verified twice; while the service is stopped one local file rots (same
size, same mtime) and ``queue.db*`` is deleted (a state folder reset, a new user profile, a
restore of the system disk). With the queue, that is FAILED ``local_damage`` and nothing is sent
(DESIGN §6: the exception "overrides every path ... re-enqueue"); but the stats recorded at
verification live only in the queue. Without them the re-enqueued run pushed into its own verified
copy, met a hash mismatch and rewrote the NAS file with the damaged bytes (the good ones left only
under ``.exlab-wizard/previous/<stamp>/``); the job went VERIFIED on the damaged bytes, and the
next audit and cleanup took it to CLEANED.

Now the run's own ``checksums.sha256``, when its NAS folder holds the same one, stands for the
lost verified manifest, and the NAS copies' sizes and mtimes for the lost stats: a file whose bytes
differ from the manifest while its mtime is not later than its copy's is damage, as with the queue.
An edit (a later mtime) is sent as before, the replaced NAS copy kept under ``previous/``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from exlab_wizard.config import Config
from exlab_wizard.sync.nas_client import LocalDamageError
from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock, flip_byte_keep_stat
from tests.lab import EQ, FILES, Lab, Site, everything_under, make_client, rclone_cleanup_config, ready, running

S = SyncJobState
DAMAGED = "image_001.tif"


def _config(site: Site) -> Config:
    return site.config(
        sync={"audit_interval_s": 6 * 3600, "scan_interval_s": 3600},
        cleanup={"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": True},
    )


def lose_queue(state: Path) -> None:
    """``queue.db`` and its WAL files deleted (a state folder reset)."""
    for path in state.iterdir():
        if path.name.startswith("queue.db"):
            path.unlink()


def _edit(path: Path, data: bytes) -> None:
    """Someone edits the file a minute after its verified copy was written: a later mtime."""
    before = os.stat(path)
    path.write_bytes(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 60_000_000_000))


async def _verified_then_queue_lost(site: Site, change: Callable[[Path], None]) -> tuple[Config, Clock, Path]:
    """A run verified twice (its NAS copy good); then, the service stopped, ``change(run)`` and the queue lost."""
    clock = Clock()
    run = site.make_run("Run_2026-01-01", files=FILES)
    cfg = _config(site)
    async with running(cfg, clock) as client:
        await ready(client, clock, run)
    change(run)
    lose_queue(site.state)
    return cfg, clock, run


def _rot(run: Path) -> None:
    flip_byte_keep_stat(run / DAMAGED, offset=100)


async def _damage_is_refused(cfg: Config, clock: Clock, run: Path, nas: Path, *, enqueue: bool = True) -> None:
    """Re-enqueued after the damage: FAILED ``local_damage``, nothing sent, nothing deleted; ``restore`` mends it.

    ``enqueue=False``: the job is still QUEUED in the queue the client opens (a restored backup); the
    workers take it at start, so an enqueue would race them (refused once they found the damage).
    """
    async with running(cfg, clock) as client:
        if enqueue:
            await client.enqueue(run)  # the watcher would do the same
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        clock.advance(30)
        await client.audit_once()
        await client.cleanup_once()
        after = await client.job(run)
        assert (nas / DAMAGED).read_bytes() == FILES[DAMAGED], (
            "the damaged local bytes replaced the verified NAS copy",
            job.state.value,
            after.state.value,
            [e.detail for e in job.events],
        )
        assert job.state == S.FAILED and job.error_kind == "local_damage", (job.state, job.last_error)
        assert DAMAGED in job.last_error and "exlab-sync restore" in job.last_error
        assert not (nas / ".exlab-wizard" / "previous").exists()  # nothing sent, nothing moved aside
        assert after.state == S.FAILED and (run / DAMAGED).exists()  # nothing deleted locally
        with pytest.raises(LocalDamageError):
            await client.retry(job.id)
        with pytest.raises(LocalDamageError):
            await client.enqueue(run)

        result = await client.restore(run)
        assert result.ok and result.restored == (DAMAGED,), result
        assert (run / DAMAGED).read_bytes() == FILES[DAMAGED]
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert job.state == S.VERIFIED, (job.state, job.last_error)
    assert {rel: (nas / rel).read_bytes() for rel in FILES} == FILES


async def test_damage_made_while_the_queue_was_lost_is_never_sent_over_the_verified_copy(site: Site) -> None:
    cfg, clock, run = await _verified_then_queue_lost(site, _rot)
    await _damage_is_refused(cfg, clock, run, site.nas_copy(run))


async def test_accept_local_sends_the_damaged_bytes_and_keeps_the_verified_copy(site: Site) -> None:
    """The other way out: the lab declares the local bytes the truth; the NAS keeps the verified ones."""
    cfg, clock, run = await _verified_then_queue_lost(site, _rot)
    nas = site.nas_copy(run)
    async with running(cfg, clock) as client:
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert job.error_kind == "local_damage", (job.state, job.last_error)
        await client.retry(job.id, accept_local=True)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert job.state == S.VERIFIED, (job.state, job.last_error)
    assert (nas / DAMAGED).read_bytes() == (run / DAMAGED).read_bytes() != FILES[DAMAGED]
    kept = list((nas / ".exlab-wizard" / "previous").glob(f"*/{DAMAGED}"))
    assert [p.read_bytes() for p in kept] == [FILES[DAMAGED]]


async def test_a_queue_restored_from_before_the_verification_behaves_the_same(site: Site) -> None:
    """The state folder put back from a backup taken while the job was queued: no verified manifest in it."""
    clock = Clock()
    run = site.make_run("Run_2026-01-01", files=FILES)
    cfg = _config(site)
    queuing = make_client(cfg)
    await queuing.init(run_workers=False)
    try:
        await queuing.enqueue(run)
    finally:
        await queuing.close()
    backup = site.root / "state-backup"
    shutil.copytree(site.state, backup)
    async with running(cfg, clock) as client:
        await ready(client, clock, run)
    flip_byte_keep_stat(run / DAMAGED, offset=100)
    lose_queue(site.state)
    for path in backup.iterdir():
        if path.name.startswith("queue.db"):
            shutil.copy2(path, site.state / path.name)
    await _damage_is_refused(cfg, clock, run, site.nas_copy(run), enqueue=False)


async def test_an_edit_made_while_the_queue_was_lost_is_sent_and_the_verified_copy_kept(site: Site) -> None:
    cfg, clock, run = await _verified_then_queue_lost(site, lambda run: _edit(run / DAMAGED, b"Z" * 3000))
    nas = site.nas_copy(run)
    async with running(cfg, clock) as client:
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert job.state == S.VERIFIED, (job.state, job.last_error)
    assert (nas / DAMAGED).read_bytes() == b"Z" * 3000
    kept = list((nas / ".exlab-wizard" / "previous").glob(f"*/{DAMAGED}"))
    assert [p.read_bytes() for p in kept] == [FILES[DAMAGED]], "the verified copy was replaced without being kept"


async def test_restore_puts_back_the_damaged_file_and_leaves_an_edit_to_be_sent(site: Site) -> None:
    """Damage and an edit in one run, the queue lost: only the damaged file is named and restored."""

    def rot_and_edit(run: Path) -> None:
        _rot(run)
        _edit(run / "notes.txt", b"acquired ok, then annotated\n")

    cfg, clock, run = await _verified_then_queue_lost(site, rot_and_edit)
    nas = site.nas_copy(run)
    async with running(cfg, clock) as client:
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert job.state == S.FAILED and job.error_kind == "local_damage", (job.state, job.last_error)
        assert DAMAGED in job.last_error and "notes.txt" not in job.last_error
        result = await client.restore(run)
        assert result.ok and result.restored == (DAMAGED,), result
        assert (run / "notes.txt").read_bytes() == b"acquired ok, then annotated\n"
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert job.state == S.VERIFIED, (job.state, job.last_error)
    assert (nas / DAMAGED).read_bytes() == FILES[DAMAGED]
    assert (nas / "notes.txt").read_bytes() == b"acquired ok, then annotated\n"
    assert FILES["notes.txt"] in everything_under(nas / ".exlab-wizard" / "previous")


@pytest.mark.network
async def test_on_rclone_too(lab: Lab, tmp_path: Path) -> None:
    nas_root = tmp_path / "rnas"
    nas_root.mkdir()
    conf = tmp_path / "rclone.conf"
    conf.write_text(f"[labnas]\ntype = alias\nremote = {nas_root}\n")
    cfg = rclone_cleanup_config(lab, conf)
    clock = Clock()
    run = lab.make_run(files=FILES)
    async with running(cfg, clock) as client:
        await ready(client, clock, run)
    flip_byte_keep_stat(run / DAMAGED, offset=100)
    lose_queue(lab.state)
    await _damage_is_refused(cfg, clock, run, nas_root / run.relative_to(lab.local_root / EQ))
