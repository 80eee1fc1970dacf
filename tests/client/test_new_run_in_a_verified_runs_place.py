"""A new run made in the place of a verified one, its files carrying older mtimes.

The lab deletes Run_A once it is VERIFIED and makes a new run of the same
name: same file names and sizes, other bytes, the times kept (``cp -p``,
``rsync -a`` from an acquisition buffer). The local check re-hashes the files
(new inodes and ctimes) and calls them damage: other bytes under an mtime not
later than the recorded one (docs/recovery.md). That classification stands;
what was missing is that nothing acted on it while cleanup was off: the audit
kept adding passes to the old NAS copy, ``enqueue`` answered ``queued`` and
left the job VERIFIED, and no event said why. Now the audit (and ``enqueue``)
fails the job ``local_damage`` with the ways out, counting no pass and
sending nothing; ``retry --accept-local`` then sends the new bytes, the NAS
keeping the old ones under ``previous/``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from exlab_wizard.sync.nas_client import LocalDamageError
from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock
from tests.lab import FILES, Site, running, synced, write_creation, write_files

S = SyncJobState
NEW = {rel: bytes(255 - b for b in data) for rel, data in FILES.items()}  # same names and sizes


def replace_with_new_run(run: Path, clock: Clock) -> None:
    """The verified run deleted and a new one made of the same name, its files with older times."""
    shutil.rmtree(run)
    run.mkdir()
    write_creation(run)
    write_files(run, NEW, mtime=clock().timestamp() - 7 * 86400)


def nas_bytes(site: Site, run: Path) -> dict[str, bytes]:
    nas = site.nas_copy(run)
    return {rel: (nas / rel).read_bytes() for rel in FILES if (nas / rel).is_file()}


async def test_the_audit_fails_a_verified_job_whose_run_holds_local_damage(site: Site) -> None:
    clock = Clock()
    cfg = site.config(sync={"audit_interval_s": 6 * 3600, "scan_interval_s": 3600})
    run = site.make_run("Run_A", files=FILES)
    async with running(cfg, clock) as client:
        verified = await synced(client, run)
        replace_with_new_run(run, clock)
        clock.advance(6)
        await client.audit_once()
        job = await client.job(run)
        assert job.state == S.FAILED and job.error_kind == "local_damage", (job.state, job.last_error)
        # The audit's pass is not counted: the run beside the NAS copy is not the verified one.
        assert job.verify_passes == verified.verify_passes
        assert job.verified_at == verified.verified_at  # the NAS copy is still the verified one
        assert "exlab-sync restore" in job.last_error and f"retry --accept-local {job.id}" in job.last_error
        assert all(rel in job.last_error for rel in FILES)
        failed = [e for e in job.events if e.kind == "transition" and e.to_state == S.FAILED.value]
        assert failed and "local damage" in failed[-1].detail
        assert nas_bytes(site, run) == FILES  # nothing sent
        for _ in range(4):  # later audits leave it as it is
            clock.advance(6)
            await client.audit_once()
        assert (await client.job(run)).verify_passes == verified.verify_passes

        with pytest.raises(LocalDamageError):  # enqueue says so too, and does not re-arm it
            await client.enqueue(run)
        assert (await client.job(run)).state == S.FAILED

        # The way out for a new run: its bytes are the new truth; the NAS keeps the old ones.
        await client.retry(job.id, accept_local=True)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert job.state == S.VERIFIED, job.last_error
    assert nas_bytes(site, run) == NEW
    kept = [p.read_bytes() for p in (site.nas_copy(run) / ".exlab-wizard" / "previous").rglob("*") if p.is_file()]
    assert sorted(kept) == sorted(FILES.values())


async def test_enqueue_of_a_verified_run_holding_local_damage_fails_the_job_and_says_so(site: Site) -> None:
    clock = Clock()
    cfg = site.config(sync={"audit_interval_s": 6 * 3600, "scan_interval_s": 3600})
    run = site.make_run("Run_A", files=FILES)
    async with running(cfg, clock) as client:
        verified = await synced(client, run)
        replace_with_new_run(run, clock)
        with pytest.raises(LocalDamageError) as raised:
            await client.enqueue(run)
        assert sorted(raised.value.paths) == sorted(FILES)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
    assert job.state == S.FAILED and job.error_kind == "local_damage", (job.state, job.last_error)
    assert job.verify_passes == verified.verify_passes
    assert any(e.to_state == S.FAILED.value and "local damage" in e.detail for e in job.events)
    assert nas_bytes(site, run) == FILES  # nothing sent


async def test_an_edit_of_a_verified_run_is_still_sent_again_by_the_audit(site: Site) -> None:
    """The control: a file edited (a later mtime) is an edit, sent again with its pass counted as before."""
    clock = Clock()
    cfg = site.config(sync={"audit_interval_s": 6 * 3600, "scan_interval_s": 3600})
    run = site.make_run("Run_A", files=FILES)
    rel = sorted(FILES)[0]
    async with running(cfg, clock) as client:
        await synced(client, run)
        write_files(run, {rel: NEW[rel]}, mtime=clock().timestamp() + 60)
        clock.advance(6)
        await client.audit_once()
        job = await client.job(run)
        assert job.state == S.QUEUED and job.error_kind is None, (job.state, job.last_error)
        await client.wait_idle(timeout=60)
        assert (await client.job(run)).state == S.VERIFIED
    assert nas_bytes(site, run)[rel] == NEW[rel]
