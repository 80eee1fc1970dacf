"""Local damage never overwrites the good NAS copy; restore and accept-local, through the real client.

Every test runs on the mount transport and on rsync_ssh against the loopback
sshd. "Damage" is one byte flipped after verification with the file's size
and mtime kept (bit rot behind the filesystem's back). After retry,
re-enqueue, an audit-driven re-transfer or a mismatch rewrite, the NAS copy
must still be byte-identical to the verified manifest and the job FAILED
``local_damage`` naming the file; ``restore`` brings the verified bytes back;
``retry --accept-local`` keeps the replaced NAS file under
``.exlab-wizard/previous/<UTC timestamp>/`` and verifies the new one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from exlab_wizard.config import Config, parse_config
from exlab_wizard.fileio import BLOCK_SIZE, hash_fd, open_regular
from exlab_wizard.sync import job_runner, metadata_push
from exlab_wizard.sync.manifest_format import manifest_digest, manifest_path, read_manifest
from exlab_wizard.sync.nas_client import LocalDamageError, NASSyncClient, RestoreError
from exlab_wizard.sync.reaper import load_verified_stats, local_check
from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports.mount import MountTransport
from tests.fixtures.sshd import RW_USER
from tests.helpers import Clock, flip_byte_keep_stat, until
from tests.lab import Lab, make_client

S = SyncJobState
EQ = "CONFOCAL_01"
FILES = {
    "image_001.tif": b"A" * 3000 + os.urandom(1000),
    "sub/stack.raw": os.urandom(5000),
    "notes.txt": b"acquired ok\n",
}
DAMAGED = "sub/stack.raw"


@dataclass
class Nas:
    """One transport's NAS, as these tests see it."""

    kind: str
    lab: Lab
    transport: dict[str, Any]
    root: Path  # where the runs land on the server's disk

    def config(self, **cleanup: Any) -> Config:
        opts = {"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": True, **cleanup}
        return parse_config(
            {
                "equipment": [{"id": EQ, "local_root": str(self.lab.local_root), "transport": self.transport}],
                "sync": {"backoff_s": [0.01, 0.01], "scan_interval_s": 3600, "audit_interval_s": 6 * 3600},
                "nas_cleanup": opts,
                "state_dir": str(self.lab.state),
            }
        )

    def copy(self, run: Path) -> Path:
        return self.root / run.relative_to(self.lab.local_root / EQ)


@pytest.fixture(params=["mount", "rsync_ssh"])
def nas(request: pytest.FixtureRequest, lab: Lab) -> Nas:
    if request.param == "mount":
        return Nas("mount", lab, {"type": "mount", "mount_path": str(lab.nas / EQ)}, lab.nas / EQ)
    sshd = request.getfixturevalue("sshd")
    remote_dir = request.getfixturevalue("remote_dir")
    transport = {
        "type": "rsync_ssh",
        "ssh_target": f"{RW_USER}@127.0.0.1",
        "ssh_key_path": str(sshd.env.client_key),
        "ssh_port": sshd.port,
        "remote_path": str(remote_dir),
        "ssh_known_hosts": str(sshd.known_hosts),
    }
    return Nas("rsync_ssh", lab, transport, remote_dir)


@contextlib.asynccontextmanager
async def running(cfg: Config, clock: Clock) -> AsyncIterator[NASSyncClient]:
    client = make_client(cfg)
    client.clock = clock
    await client.init()
    try:
        yield client
    finally:
        await client.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def data_tree(root: Path) -> dict[str, bytes]:
    out = {}
    for folder, _dirs, files in os.walk(root):
        for name in files:
            rel = (Path(folder) / name).relative_to(root).as_posix()
            if not rel.startswith(".exlab-wizard/"):
                out[rel] = (Path(folder) / name).read_bytes()
    return out


def previous_files(copy: Path) -> dict[str, bytes]:
    """``<stamp>/<path>`` -> bytes of every file the NAS keeps under ``.exlab-wizard/previous/``."""
    root = copy / ".exlab-wizard" / "previous"
    out = {}
    for folder, _dirs, files in os.walk(root):
        for name in files:
            out[(Path(folder) / name).relative_to(root).as_posix()] = (Path(folder) / name).read_bytes()
    return out


async def synced(client: NASSyncClient, run: Path) -> Any:
    await client.enqueue(run)
    await client.wait_idle(timeout=60)
    job = await client.job(run)
    assert job.state == S.VERIFIED, job.last_error
    return job


async def failed_local_damage(client: NASSyncClient, clock: Clock, run: Path) -> Any:
    """Synced, audited, old enough; one byte flipped; the reaper's interlock 6 fails the job."""
    await synced(client, run)
    clock.advance(6)
    await client.audit_once()
    clock.advance(19)
    flip_byte_keep_stat(run / DAMAGED, 42)
    await client.cleanup_once()
    job = await client.job(run)
    assert job.state == S.FAILED and job.error_kind == "local_damage", job.last_error
    return job


async def audited(client: NASSyncClient, clock: Clock, run: Path) -> Any:
    """An audit once the pass is due, the client left to settle; the run's job afterwards."""
    clock.advance(6)
    await client.audit_once()
    await client.wait_idle(timeout=60)
    return await client.job(run)


def transfers(job: Any) -> int:
    """How many times the job went RUNNING: each a transfer."""
    return len([e for e in job.events if e.kind == "transition" and e.to_state == "running"])


def transfers_after(job: Any, moment: dt.datetime) -> list[Any]:
    return [e for e in job.events if e.kind == "transition" and e.to_state == "running" and e.at > moment]


def assert_nas_is_the_manifest(nas: Nas, run: Path, digest: str) -> None:
    """The NAS copy is byte-identical to the verified files, and the local manifest is the verified one."""
    assert data_tree(nas.copy(run)) == FILES
    assert manifest_digest(read_manifest(run)) == digest


# --------------------------------------------------------------------------- never sent


async def test_retry_and_re_enqueue_of_a_local_damage_job_are_refused(nas: Nas) -> None:
    clock = Clock()
    run = nas.lab.make_run(files=FILES)
    async with running(nas.config(), clock) as client:
        job = await failed_local_damage(client, clock, run)
        failed_at = job.updated_at

        with pytest.raises(LocalDamageError) as caught:
            await client.retry(job.id)
        assert caught.value.kind == "local_damage" and caught.value.paths == (DAMAGED,)
        assert "exlab-sync restore" in str(caught.value) and f"retry --accept-local {job.id}" in str(caught.value)
        with pytest.raises(LocalDamageError):
            await client.enqueue(run)
        await client.wait_idle(timeout=60)

        job = await client.job(run)
        assert job.state == S.FAILED and job.error_kind == "local_damage" and DAMAGED in job.last_error
        assert transfers_after(job, failed_at) == []
    assert_nas_is_the_manifest(nas, run, job.manifest_digest)


async def test_audit_driven_retransfer_and_its_mismatch_rewrite_never_send_damage(nas: Nas) -> None:
    """The NAS loses one file; the re-transfer would find the damaged one different and rewrite it."""
    clock = Clock()
    run = nas.lab.make_run(files=FILES)
    async with running(nas.config(enabled=False), clock) as client:
        job = await synced(client, run)
        (nas.copy(run) / "notes.txt").unlink()  # the audit sees it missing: a re-transfer of it
        flip_byte_keep_stat(run / DAMAGED, 7)
        job = await audited(client, clock, run)
        assert job.state == S.FAILED and job.error_kind == "local_damage", job.last_error
        assert (
            f"local damage (content differs from the verified copy or cannot be read, mtime not moved on by an edit): {DAMAGED}"
            in job.last_error
        )
        assert transfers(job) == 1
    assert data_tree(nas.copy(run)) == {k: v for k, v in FILES.items() if k != "notes.txt"}
    assert manifest_digest(read_manifest(run)) == job.manifest_digest


async def test_retry_of_a_job_failed_otherwise_never_lets_the_mismatch_rewrite_send_damage(nas: Nas) -> None:
    """retry resets the mismatch count: the re-transfer would see the damaged file differ and rewrite it."""
    clock = Clock()
    run = nas.lab.make_run(files=FILES)
    async with running(nas.config(enabled=False), clock) as client:
        job = await synced(client, run)
        foreign = nas.copy(run) / "someone else.csv"
        foreign.write_bytes(b"not ours")  # the audit sees an extra file; the re-transfer refuses the folder
        job = await audited(client, clock, run)
        assert job.state == S.FAILED and job.error_kind == "remote_conflict", job.last_error
        foreign.unlink()  # the admin cleans the folder up; meanwhile a local file rotted
        flip_byte_keep_stat(run / DAMAGED, 13)

        await client.retry(job.id)  # not a local_damage job: re-armed; the transfer finds the damage itself
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert job.state == S.FAILED and job.error_kind == "local_damage", job.last_error
        assert DAMAGED in job.last_error and "exlab-sync restore" in job.last_error
    assert_nas_is_the_manifest(nas, run, job.manifest_digest)


async def test_with_the_verified_stats_lost_damage_is_not_sent_and_an_edit_is(nas: Nas) -> None:
    """A crash right after VERIFIED lost the per-file stats: an old mtime is damage, a new one an edit."""
    clock = Clock()
    run = nas.lab.make_run(files=FILES)
    async with running(nas.config(enabled=False), clock) as client:
        job = await synced(client, run)
        queue = client._require_queue()
        with queue.transaction() as conn:
            conn.execute("DELETE FROM verified_files WHERE job_id = ?", (job.id,))
        assert load_verified_stats(queue, job.id) == {}
        # Edited after verification (new mtime): re-synced as before.
        (run / "notes.txt").write_bytes(b"re-acquired\n")
        later = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)).timestamp()
        os.utime(run / "notes.txt", (later, later))
        (nas.copy(run) / "image_001.tif").unlink()  # an audit mismatch sends the job back to a transfer
        job = await audited(client, clock, run)
        assert job.state == S.VERIFIED, job.last_error
        assert (nas.copy(run) / "notes.txt").read_bytes() == b"re-acquired\n"
        assert read_manifest(run)["notes.txt"] == sha(b"re-acquired\n")

        with queue.transaction() as conn:
            conn.execute("DELETE FROM verified_files WHERE job_id = ?", (job.id,))
        flip_byte_keep_stat(run / DAMAGED, 3)  # old mtime: damage, not an edit
        (nas.copy(run) / "image_001.tif").unlink()
        job = await audited(client, clock, run)
        assert job.state == S.FAILED and job.error_kind == "local_damage", job.last_error
    assert (nas.copy(run) / DAMAGED).read_bytes() == FILES[DAMAGED]


# --------------------------------------------------------------------------- restore


async def test_restore_brings_the_verified_bytes_back_and_the_job_to_verified(nas: Nas) -> None:
    clock = Clock()
    run = nas.lab.make_run(files=FILES)
    async with running(nas.config(), clock) as client:
        job = await failed_local_damage(client, clock, run)
        recorded = load_verified_stats(client._require_queue(), job.id)[DAMAGED]

        result = await client.restore(run)
        assert result.ok and result.restored == (DAMAGED,) and result.state == S.VERIFIED
        assert (run / DAMAGED).read_bytes() == FILES[DAMAGED]
        assert os.stat(run / DAMAGED).st_mtime_ns == recorded.mtime_ns
        assert not list((run / ".exlab-wizard").glob(".restore-*"))  # no scratch left
        after = await client.job(run)
        assert after.state == S.VERIFIED and after.manifest_digest == job.manifest_digest
        assert after.verify_passes == job.verify_passes and after.verified_at == job.verified_at
        assert after.error_kind is None and after.last_error is None
        back = [e for e in after.events if e.kind == "transition" and e.from_state == "failed"]
        assert back[-1].to_state == "verified" and f"restored from the NAS: {DAMAGED}" in back[-1].detail
        assert (await client.force_verify(run)).ok
        assert (await client.restore(run)).restored == ()  # nothing left to restore

        # The reaper now finds the run intact again and frees it.
        outcomes = [o for o in await client.cleanup_once() if o.action != "promoted"]
        assert [o.action for o in outcomes] == ["deleted"], outcomes
    assert data_tree(nas.copy(run)) == FILES


async def test_restore_refuses_a_nas_copy_that_does_not_match_the_manifest(nas: Nas) -> None:
    clock = Clock()
    run = nas.lab.make_run(files=FILES)
    async with running(nas.config(), clock) as client:
        await failed_local_damage(client, clock, run)
        flip_byte_keep_stat(nas.copy(run) / DAMAGED, 99)  # the NAS copy rotted too
        local = (run / DAMAGED).read_bytes()

        result = await client.restore(run)
        assert not result.ok and result.restored == ()
        assert "does not match the verified manifest" in result.refused[DAMAGED]
        assert (run / DAMAGED).read_bytes() == local  # left as it was
        after = await client.job(run)
        assert after.state == S.FAILED and after.error_kind == "local_damage"
        assert any(e.kind == "restore" and "not restored" in e.detail for e in after.events)
        assert not list((run / ".exlab-wizard").glob(".restore-*"))

        other = nas.lab.make_run("Run_2026-01-02", files={"a.bin": b"a"})
        with pytest.raises(RestoreError) as caught:
            await client.restore(other)
        assert caught.value.kind == "no_job"


# --------------------------------------------------------------------------- accept-local


async def test_accept_local_keeps_the_replaced_nas_file_and_verifies_the_new_one(nas: Nas) -> None:
    clock = Clock()
    run = nas.lab.make_run(files=FILES)
    async with running(nas.config(enabled=False), clock) as client:
        job = await synced(client, run)
        flip_byte_keep_stat(run / DAMAGED, 11)
        accepted = (run / DAMAGED).read_bytes()
        (nas.copy(run) / "notes.txt").unlink()  # the audit sends the job to a re-transfer, which finds the damage
        job = await audited(client, clock, run)
        assert job.state == S.FAILED and job.error_kind == "local_damage"

        job = await client.retry(job.id, accept_local=True)
        assert job.state == S.QUEUED and job.accept_local_paths == (DAMAGED,) and job.previous_stamp
        stamp = job.previous_stamp
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert job.state == S.VERIFIED, job.last_error
        assert job.accept_local_paths == () and job.previous_stamp is None
        assert [e.kind for e in job.events].count("previous_kept") == 1

        copy = nas.copy(run)
        assert data_tree(copy) == {**FILES, DAMAGED: accepted}
        assert previous_files(copy) == {f"{stamp}/{DAMAGED}": FILES[DAMAGED]}
        assert read_manifest(run)[DAMAGED] == sha(accepted)
        assert read_manifest(copy)[DAMAGED] == sha(accepted)  # the pushed metadata too
        # previous/ is not data: the audit passes.
        clock.advance(6)
        await client.audit_once()
        assert (await client.job(run)).verify_passes == 2


async def test_accept_local_move_is_recorded_and_not_repeated_after_a_failed_push(nas: Nas, monkeypatch) -> None:
    clock = Clock()
    run = nas.lab.make_run(files=FILES)
    async with running(nas.config(), clock) as client:
        job = await failed_local_damage(client, clock, run)
        transport = client._transport(client.config.equipment_by_id(EQ))
        real_push = type(transport).push
        calls = {"keep": 0, "push": 0}
        real_keep = type(transport).keep_previous

        async def keep(self, *args, **kwargs):
            calls["keep"] += 1
            return await real_keep(self, *args, **kwargs)

        async def push_once_down(self, *args, **kwargs):
            calls["push"] += 1
            if calls["push"] == 1:
                from exlab_wizard.sync.transports import (
                    TransportError,
                    TransportErrorKind,
                )

                raise TransportError(TransportErrorKind.NETWORK, "connection reset (injected)")
            return await real_push(self, *args, **kwargs)

        monkeypatch.setattr(type(transport), "keep_previous", keep)
        monkeypatch.setattr(type(transport), "push", push_once_down)
        await client.retry(job.id, accept_local=True)

        async def settled() -> bool:  # wait_idle does not wait for a retry that is not due yet
            await client.wait_idle(timeout=60)
            return (await client.job(run)).state in (S.VERIFIED, S.FAILED)

        await until(settled)
        job = await client.job(run)
        assert job.state == S.VERIFIED, job.last_error
        assert calls == {"keep": 1, "push": 2}  # moved once; the data push twice (the first failed)
        copy = nas.copy(run)
        assert list(previous_files(copy).values()) == [FILES[DAMAGED]]
        assert (copy / DAMAGED).read_bytes() == (run / DAMAGED).read_bytes() != FILES[DAMAGED]
    assert isinstance(transport, MountTransport) == (nas.kind == "mount")


async def test_restore_with_the_share_unmounted_changes_nothing(lab: Lab) -> None:
    nas = Nas("mount", lab, {"type": "mount", "mount_path": str(lab.nas / EQ)}, lab.nas / EQ)
    clock = Clock()
    run = lab.make_run(files=FILES)
    async with running(nas.config(), clock) as client:
        await failed_local_damage(client, clock, run)
        local = (run / DAMAGED).read_bytes()
        (lab.nas / EQ / ".exlab-nas").unlink()  # unmounted: the bare mount point is not the NAS
        with pytest.raises(RestoreError) as caught:
            await client.restore(run)
        assert caught.value.kind == "unreachable"
        assert (run / DAMAGED).read_bytes() == local
        job = await client.job(run)
        assert job.state == S.FAILED and job.error_kind == "local_damage"


# ------------------------------------------------------------------ the local checksums.sha256 deleted or altered
# The job keeps its manifest digest and the per-file SHA-256 recorded at verification; together
# they are a verified manifest even when the local checksums.sha256 is gone.

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
        await _settle_retrying_a_mismatch(client, run)
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
        job = await audited(client, clock, run)
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


async def _settle_retrying_a_mismatch(client, run) -> None:
    """Wait for the client to settle; a job FAILED for another reason than local damage is retried once."""
    await client.wait_idle(timeout=60)
    job = await client.job(run)
    if job.state == S.FAILED and job.error_kind != "local_damage":
        await client.retry(job.id)  # the lab retries a hash_mismatch: its rewrite must not send damage
        await client.wait_idle(timeout=60)


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


# ------------------------------------------------------------------ damage while the verified stats are recorded


def rot_while_the_stats_are_recorded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A tool rewrites DAMAGED's bytes and puts the old mtime back, half done when the verified stats are taken.

    Found by the torture harness: the record caught the new bytes' mtime, and once the old one was back
    the damage looked like an edit and was sent over the verified NAS copy. Returns [the old mtime] once done.
    """
    real = job_runner.record_verified_stat
    done: list[int] = []

    def record(queue: Any, job_id: str, run_path: Any, hashes: Any, now: Any, **kw: Any) -> int:
        if done:
            return real(queue, job_id, run_path, hashes, now, **kw)
        path = Path(run_path) / DAMAGED
        st = os.stat(path)
        done.append(st.st_mtime_ns)
        flip_byte_keep_stat(path, 42)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # the rewrite's own mtime
        try:
            return real(queue, job_id, run_path, hashes, now, **kw)
        finally:
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old one put back

    monkeypatch.setattr(job_runner, "record_verified_stat", record)
    return done


@pytest.mark.parametrize("via", ["cleanup", "audit re-transfer"])
async def test_damage_caught_half_way_by_the_stats_record_is_never_sent(
    nas: Nas, via: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    run = nas.lab.make_run(files=FILES)
    cleanup = {"min_verify_passes": 1, "min_age_hours": 0} if via == "cleanup" else {"enabled": False}
    verified_mtime = rot_while_the_stats_are_recorded(monkeypatch)
    async with running(nas.config(**cleanup), clock) as client:
        await synced(client, run)
        assert (run / DAMAGED).read_bytes() != FILES[DAMAGED]
        if via == "cleanup":
            await client.cleanup_once()
        else:
            (nas.copy(run) / "notes.txt").unlink()  # the audit sends the run back to a transfer
            clock.advance(6)
            await client.audit_once()
        await _settle_retrying_a_mismatch(client, run)
        await _assert_failed_local_damage_and_refused(client, run)
        assert (nas.copy(run) / DAMAGED).read_bytes() == FILES[DAMAGED]
        assert read_manifest(run)[DAMAGED] == sha(FILES[DAMAGED])
        # restore: the verified bytes with the verified mtime (not the half-done rewrite's, which was recorded)
        restored = await client.restore(run)
        assert restored.restored == (DAMAGED,) and restored.ok
    assert (run / DAMAGED).read_bytes() == FILES[DAMAGED]
    assert os.stat(run / DAMAGED).st_mtime_ns == verified_mtime[0]


# ------------------------------------------------------------------ damage landing during a read of the file


def _flip_during_reads_in(monkeypatch: pytest.MonkeyPatch, step: str, name: str, opener: str) -> list[str]:
    """DAMAGED flipped (size and mtime kept) during the first read of it that ``job_runner.<step>`` makes
    through ``local_check.<opener>``, after that read's open: a byte rotting while the client reads it."""
    real_step = getattr(job_runner, step)
    real_open = getattr(local_check, opener)
    armed: list[bool] = []
    flipped: list[str] = []

    def opened(*args: Any, **kwargs: Any) -> Any:
        target = str(args[-1] if opener == "hash_at" else args[0])
        if not armed or flipped or not target.endswith(name):
            return real_open(*args, **kwargs)
        if opener == "open_regular":
            flip_byte_keep_stat(Path(target), 42)  # after the record's stat, before its read
            flipped.append(target)
            return real_open(*args, **kwargs)
        folder, file_name = args
        fd, before = open_regular(file_name, dir_fd=folder)
        try:
            flip_byte_keep_stat(Path(f"/proc/self/fd/{folder}") / file_name, 42)  # after the open
            flipped.append(target)
            digest = hash_fd(fd, memoryview(bytearray(BLOCK_SIZE)))
            return digest, before, os.fstat(fd)
        finally:
            os.close(fd)

    def step_armed(*args: Any, **kwargs: Any) -> Any:
        armed.append(True)
        try:
            return real_step(*args, **kwargs)
        finally:
            armed.clear()

    monkeypatch.setattr(local_check, opener, opened)
    monkeypatch.setattr(job_runner, step, step_armed)
    return flipped


async def test_damage_landing_while_the_record_reads_the_file_again_is_never_sent(
    nas: Nas, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the torture harness: the stats record reads again a file stamped after the hashing began,
    and takes other bytes there for an edit the hashing missed. Bytes flipped between its stat and its read
    were recorded so: the reaper then sent the damage over the verified NAS copy and deleted the good bytes."""
    clock = Clock()
    run = nas.lab.make_run(files=FILES)
    flipped = _flip_during_reads_in(monkeypatch, "record_verified_stat", "stack.raw", "open_regular")
    real_record = job_runner.record_verified_stat

    def record_all_stamped(queue: Any, job_id: str, run_path: Any, hashes: Any, now: Any, **kw: Any) -> int:
        # every file stamped after the hashing began (as files written just before it): each read again
        return real_record(queue, job_id, run_path, hashes, now, hashed_since=now - dt.timedelta(days=1), **kw)

    monkeypatch.setattr(job_runner, "record_verified_stat", record_all_stamped)
    async with running(nas.config(min_verify_passes=1, min_age_hours=0), clock) as client:
        job = await synced(client, run)
        assert flipped == [str(run / DAMAGED)]
        assert load_verified_stats(client._require_queue(), job.id)[DAMAGED].newer_sha256 is None
        await client.cleanup_once()
        await _settle_retrying_a_mismatch(client, run)
        await client.cleanup_once()
        await _assert_failed_local_damage_and_refused(client, run)
    assert data_tree(nas.copy(run)) == FILES
    assert previous_files(nas.copy(run)) == {}


async def test_damage_landing_while_the_pre_transfer_check_reads_the_file_is_never_sent(
    nas: Nas, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the torture harness: a byte flipped while the check before a re-transfer read the file.
    That read saw the ctime move and took the file for one being written: an edit, sent over the verified
    NAS copy (kept under previous/) and verified as the new truth."""
    clock = Clock()
    run = nas.lab.make_run(files=FILES)
    async with running(nas.config(enabled=False), clock) as client:
        await synced(client, run)
        with open(run / "notes.txt", "ab") as f:  # an edit: the audit sends the run back to a transfer
            f.write(b"and a note added later\n")
        flipped = _flip_during_reads_in(monkeypatch, "check_local", "stack.raw", "hash_at")
        clock.advance(6)
        await client.audit_once()
        await _settle_retrying_a_mismatch(client, run)
        assert flipped, "the check before the transfer never read the file"
        await _assert_failed_local_damage_and_refused(client, run)
    assert data_tree(nas.copy(run)) == FILES
    assert previous_files(nas.copy(run)) == {}


async def test_a_bad_sector_under_a_verified_file_is_damage_never_sent(
    nas: Nas, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A verified file the audit cannot read (EIO: a bad sector, its ctime moved by a chmod) is local damage,
    said as such: never sent, its NAS copy never moved aside for it, retry and enqueue refused."""
    clock = Clock()
    run = nas.lab.make_run(files=FILES)
    real_hash_at = local_check.hash_at

    def bad_sector(folder: int, name: str) -> Any:
        if name == Path(DAMAGED).name:
            raise OSError(errno.EIO, "Input/output error", name)
        return real_hash_at(folder, name)

    async with running(nas.config(enabled=False), clock) as client:
        await synced(client, run)
        os.chmod(run / DAMAGED, 0o600)  # the ctime moves: the audit reads the file again
        monkeypatch.setattr(local_check, "hash_at", bad_sector)
        clock.advance(6)
        await client.audit_once()
        await _settle_retrying_a_mismatch(client, run)
        await _assert_failed_local_damage_and_refused(client, run)
        job = await client.job(run)
        # the bytes on disk are intact (the EIO is the read's): the job's history shows nothing was sent again
        assert transfers(job) == 1, job.events
        assert "cannot be read" in job.last_error
    assert data_tree(nas.copy(run)) == FILES
    assert previous_files(nas.copy(run)) == {}


async def test_a_local_damage_job_still_sends_the_metadata_push_it_owes(
    nas: Nas, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the torture harness (seed 21): the NAS away when the job was verified, the local copy damaged
    before the NAS came back. FAILED ``local_damage``, the job never sent the ``checksums.sha256`` it owed: the
    one verified copy left, on the NAS, had no manifest to be checked against but the one on the damaged PC."""
    clock = Clock()
    run = nas.lab.make_run(files=FILES)
    real_try_push = metadata_push.try_push
    away: list[bool] = [True]

    async def try_push(*args: Any, **kwargs: Any) -> Any:
        if away:
            return None, "network: the NAS is away (test)"
        return await real_try_push(*args, **kwargs)

    monkeypatch.setattr(metadata_push, "try_push", try_push)
    async with running(nas.config(enabled=False), clock) as client:
        await synced(client, run)
        assert not (nas.copy(run) / ".exlab-wizard" / "checksums.sha256").exists()
        flip_byte_keep_stat(run / DAMAGED, 42)
        job = await audited(client, clock, run)
        assert job.state == S.FAILED and job.error_kind == "local_damage", job.last_error
        away.clear()  # the NAS is back
        clock.advance(3600)
        nas_manifest = nas.copy(run) / ".exlab-wizard" / "checksums.sha256"

        async def arrived() -> bool:
            return nas_manifest.exists()

        await until(arrived, timeout=30)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert job.state == S.FAILED and job.error_kind == "local_damage" and not job.metadata_push_pending
    assert (nas.copy(run) / ".exlab-wizard" / "checksums.sha256").read_bytes() == manifest_path(run).read_bytes()
    assert manifest_digest(read_manifest(run)) == job.manifest_digest
    assert data_tree(nas.copy(run)) == FILES
