"""Local damage with the run's local checksums.sha256 deleted or altered: still never sent.

The job keeps its manifest digest and the per-file SHA-256 recorded at
verification; together they are a verified manifest even when the local
``checksums.sha256`` is gone. Mount and rsync_ssh (loopback sshd).
"""

from __future__ import annotations

import pytest

from exlab_wizard.sync.manifest_format import manifest_path
from exlab_wizard.sync.nas_client import LocalDamageError
from exlab_wizard.sync.states import SyncJobState
from tests.client.test_audit_and_cleanup import Clock, flip_byte_keep_stat
from tests.client.test_local_damage import (  # noqa: F401
    DAMAGED, FILES, Nas, data_tree, failed_local_damage, nas, running, synced,
)

S = SyncJobState
KEPT = {k: v for k, v in FILES.items() if k != "notes.txt"}


def lose_local_manifest(run, how: str) -> None:
    path = manifest_path(run)
    if how == "deleted":
        path.unlink()
    else:
        path.write_text(path.read_text().replace(path.read_text()[:8], "0" * 8, 1))


async def test_the_audit_driven_retransfer_never_sends_damage_without_the_local_manifest(nas: Nas) -> None:
    """checksums.sha256 deleted: the audit re-queues the run; the transfer must still find the damage."""
    clock = Clock()
    run = nas.lab.make_run(files=FILES)
    async with running(nas.config(enabled=False), clock) as client:
        await synced(client, run)
        lose_local_manifest(run, "deleted")
        flip_byte_keep_stat(run / DAMAGED, 42)
        (nas.copy(run) / "notes.txt").unlink()
        clock.advance(6)
        await client.audit_once()
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        if job.state == S.FAILED and job.error_kind != "local_damage":
            await client.retry(job.id)  # the lab retries a hash_mismatch: its rewrite must not send damage
            await client.wait_idle(timeout=60)
        assert data_tree(nas.copy(run)) == KEPT
        await _assert_failed_local_damage_and_refused(client, run)
    assert data_tree(nas.copy(run)) == KEPT


@pytest.mark.parametrize("how", ["deleted", "altered"])
async def test_a_retry_never_sends_damage_without_the_local_manifest(nas: Nas, how: str) -> None:
    """A job failed for another reason; meanwhile checksums.sha256 was lost and a byte rotted; retry."""
    clock = Clock()
    run = nas.lab.make_run(files=FILES)
    async with running(nas.config(enabled=False), clock) as client:
        await synced(client, run)
        foreign = nas.copy(run) / "someone else.csv"
        foreign.write_bytes(b"not ours")
        clock.advance(6)
        await client.audit_once()
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert job.state == S.FAILED and job.error_kind == "remote_conflict", job.last_error
        foreign.unlink()
        lose_local_manifest(run, how)
        flip_byte_keep_stat(run / DAMAGED, 13)

        await client.retry(job.id)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        if job.state == S.FAILED and job.error_kind == "hash_mismatch":
            await client.retry(job.id)  # the mismatch rewrite would send the damaged file
            await client.wait_idle(timeout=60)
        assert data_tree(nas.copy(run)) == FILES
        await _assert_failed_local_damage_and_refused(client, run)
    assert data_tree(nas.copy(run)) == FILES


async def _assert_failed_local_damage_and_refused(client, run) -> None:
    job = await client.job(run)
    assert job.state == S.FAILED and job.error_kind == "local_damage", job.last_error
    assert DAMAGED in job.last_error and "exlab-sync restore" in job.last_error
    with pytest.raises(LocalDamageError):
        await client.retry(job.id)
    with pytest.raises(LocalDamageError):
        await client.enqueue(run)
    await client.wait_idle(timeout=60)


async def test_the_reapers_local_damage_failure_names_the_ways_out(nas: Nas) -> None:
    """The cleanup's FAILED local_damage says what to do, as retry and enqueue refusals do."""
    clock = Clock()
    run = nas.lab.make_run(files=FILES)
    async with running(nas.config(), clock) as client:
        job = await failed_local_damage(client, clock, run)
        assert DAMAGED in job.last_error and "nothing deleted" in job.last_error
        assert "exlab-sync restore" in job.last_error and f"retry --accept-local {job.id}" in job.last_error
