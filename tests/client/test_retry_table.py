"""Each row of the retry table, forced with injected push/hashsum callables."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports import TransportError, TransportErrorKind, TransportResult
from exlab_wizard.sync.transports.mount import MountTransport
from tests.lab import Lab, make_client

K = TransportErrorKind


def _hashes(run: Path) -> dict[str, str]:
    out = {}
    for dirpath, _d, files in os.walk(run):
        for name in files:
            path = Path(dirpath) / name
            rel = path.relative_to(run).as_posix()
            if not rel.startswith(".exlab-wizard/"):
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


class Script:
    """An injected push that fails with the scripted errors, then succeeds; hashsum reads the local run."""

    def __init__(self, failures: list[Any], hash_failures: list[Any] | None = None):
        self.failures = list(failures)
        self.hash_failures = list(hash_failures or [])
        self.pushes = 0
        self.remote: dict[str, str] = {}
        self.hashsums = 0

    def push_factory(self, equipment: Any):
        async def push(run_path: Path, *, bwlimit_kibps: int | None) -> TransportResult:
            self.pushes += 1
            self.remote = _hashes(run_path)  # what the "NAS" holds after this push
            if self.failures:
                failure = self.failures.pop(0)
                if isinstance(failure, TransportResult):
                    return failure
                if callable(failure) and not isinstance(failure, Exception):
                    failure(run_path)
                    return TransportResult(ok=True)
                raise failure
            return TransportResult(ok=True)

        return push

    def hashsum_factory(self, equipment: Any):
        async def hashsum(run_path: Path) -> dict[str, str]:
            self.hashsums += 1
            if self.hash_failures:
                failure = self.hash_failures.pop(0)
                if isinstance(failure, dict):
                    return failure
                if callable(failure) and not isinstance(failure, Exception):
                    return failure(run_path)
                raise failure
            return dict(self.remote)

        return hashsum


async def _run(lab: Lab, script: Script, run: Path, **sync: Any):
    client = make_client(
        lab.config(**sync),
        push_callable_factory=script.push_factory,
        hashsum_callable_factory=script.hashsum_factory,
        remote_stat_callable=lambda job: True,
    )
    await client.init()
    try:
        await client.enqueue(run)
        for _ in range(500):
            row = await client.job(run)
            if row.state in (SyncJobState.VERIFIED, SyncJobState.FAILED):
                break
            await asyncio.sleep(0.01)
        return await client.job(run)
    finally:
        await client.close()


@pytest.mark.parametrize("kind", [K.NETWORK, K.UNKNOWN])
async def test_backoff_then_success(lab: Lab, kind: K) -> None:
    run = lab.make_run()
    script = Script([TransportError(kind, "connection refused"), TransportError(kind, "reset")])
    row = await _run(lab, script, run, backoff_s=[0.01, 0.01, 0.01])
    assert row.state == SyncJobState.VERIFIED and script.pushes >= 3
    queued_again = [e for e in row.events if e.from_state == "running" and e.to_state == "queued"]
    assert len(queued_again) == 2 and all(kind.value in e.detail for e in queued_again)


@pytest.mark.parametrize("kind", [K.NETWORK, K.UNKNOWN])
async def test_backoff_exhausted_after_len_plus_one_attempts(lab: Lab, kind: K) -> None:
    run = lab.make_run()
    script = Script([TransportError(kind, "timeout")] * 10)
    row = await _run(lab, script, run, backoff_s=[0.01, 0.01])
    assert row.state == SyncJobState.FAILED and row.error_kind == kind.value
    assert script.pushes == 3 and row.attempts == 3
    assert "timeout" in row.last_error


@pytest.mark.parametrize("kind", [K.AUTH, K.REMOTE_WRITE_REFUSED, K.REMOTE_CONFLICT, K.LOCAL_FILE_VANISHED])
async def test_fail_at_once(lab: Lab, kind: K) -> None:
    run = lab.make_run()
    script = Script([TransportError(kind, f"forced {kind.value}")] * 3)
    row = await _run(lab, script, run, backoff_s=[0.01, 0.01])
    assert row.state == SyncJobState.FAILED and row.error_kind == kind.value and script.pushes == 1
    assert row.last_error
    creation = (run / ".exlab-wizard" / "creation.json").read_text()
    assert '"sync_status": "failed"' in creation


async def test_result_form_is_accepted_like_the_exception_form(lab: Lab) -> None:
    run = lab.make_run()
    script = Script([TransportResult(ok=False, error_kind="auth", message="Permission denied (publickey)")])
    row = await _run(lab, script, run)
    assert row.state == SyncJobState.FAILED and row.error_kind == "auth"
    assert "publickey" in row.last_error


async def test_hash_mismatch_once_retransfers_then_verifies(lab: Lab) -> None:
    run = lab.make_run(files={"a.dat": b"A" * 100, "b.dat": b"B" * 100})
    wrong = lambda r: {**_hashes(r), "a.dat": "0" * 64}  # noqa: E731
    script = Script([], hash_failures=[wrong])
    row = await _run(lab, script, run)
    assert row.state == SyncJobState.VERIFIED and script.pushes >= 2
    assert any(e.to_state == "queued" and "mismatch" in e.detail for e in row.events)


async def test_second_hash_mismatch_fails(lab: Lab) -> None:
    run = lab.make_run(files={"a.dat": b"A" * 100})
    wrong = lambda r: {**_hashes(r), "a.dat": "0" * 64}  # noqa: E731
    script = Script([], hash_failures=[wrong, wrong, wrong])
    row = await _run(lab, script, run)
    assert row.state == SyncJobState.FAILED and row.error_kind == "hash_mismatch"
    assert "a.dat" in row.last_error


async def test_hashsum_that_raises_never_reaches_verified(lab: Lab) -> None:
    run = lab.make_run()
    script = Script([], hash_failures=[TransportError(K.AUTH, "host key verification failed")])
    row = await _run(lab, script, run)
    assert row.state == SyncJobState.FAILED and row.error_kind == "auth"
    assert not any(e.to_state == "verified" for e in row.events)


async def test_hashsum_missing_file_is_a_mismatch_not_a_pass(lab: Lab) -> None:
    run = lab.make_run(files={"a.dat": b"A", "b.dat": b"B"})
    partial = lambda r: {k: v for k, v in _hashes(r).items() if k != "b.dat"}  # noqa: E731
    script = Script([], hash_failures=[partial, partial])
    row = await _run(lab, script, run)
    assert row.state == SyncJobState.FAILED and row.error_kind == "hash_mismatch"


async def test_local_file_vanished_between_transfer_and_verify(lab: Lab) -> None:
    run = lab.make_run(files={"a.dat": b"A", "b.dat": b"B"})
    script = Script([lambda r: (r / "b.dat").unlink()])
    row = await _run(lab, script, run)
    assert row.state == SyncJobState.FAILED and row.error_kind == "local_file_vanished"
    assert "b.dat" in row.last_error


async def test_one_corrupted_nas_byte_between_transfer_and_verify_is_caught(lab: Lab) -> None:
    """Real mount transport; one byte of the NAS copy flipped after the copy."""
    run = lab.make_run(files={"image.tif": os.urandom(256 * 1024), "other.dat": b"o" * 10})
    corruptions = []

    def factory(equipment):
        transport = MountTransport(equipment)

        async def hashsum(run_path: Path):
            target = lab.nas_copy(run_path) / "image.tif"
            if not corruptions:
                data = bytearray(target.read_bytes())
                data[12345] ^= 0xFF
                stat = os.stat(target)
                target.write_bytes(bytes(data))
                os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # size and mtime unchanged
                corruptions.append(target)
            return await transport.remote_manifest(run_path)

        return hashsum

    # the real push (so the re-transfer's rewrite is the real one); corruption before the readback
    client = make_client(lab.config(), hashsum_callable_factory=factory)
    await client.init()
    try:
        await client.enqueue(run)
        for _ in range(500):
            row = await client.job(run)
            if row.state in (SyncJobState.VERIFIED, SyncJobState.FAILED):
                break
            await asyncio.sleep(0.01)
        row = await client.job(run)
    finally:
        await client.close()
    assert corruptions, "the corruption was never applied"
    mismatch = [e for e in row.events if e.to_state == "queued" and "mismatch" in e.detail]
    assert mismatch and "image.tif" in mismatch[0].detail
    # The re-transfer rewrote the damaged file although its size and mtime matched.
    assert row.state == SyncJobState.VERIFIED, row.last_error
    assert (lab.nas_copy(run) / "image.tif").read_bytes() == (run / "image.tif").read_bytes()


async def test_local_file_gone_after_the_transfer_fails_even_with_the_remote_down(lab: Lab) -> None:
    # The remote manifest is asked for while the local files are checked for: a local
    # file deleted after it was hashed fails the job, whatever the remote answers.
    run = lab.make_run(files={"a.dat": b"A" * 100, "sub/b.dat": b"B" * 100})
    script = Script([], hash_failures=[TransportError(K.NETWORK, "NAS down")] * 3)
    pushed = script.push_factory(None)

    def push_factory(equipment: Any):
        async def push(run_path: Path, *, bwlimit_kibps: int | None) -> TransportResult:
            result = await pushed(run_path, bwlimit_kibps=bwlimit_kibps)
            await asyncio.sleep(0.3)  # the local hashing, overlapped with the push, is done
            (run_path / "sub" / "b.dat").unlink()
            return result

        return push

    client = make_client(
        lab.config(backoff_s=[0.01, 0.01]),
        push_callable_factory=push_factory,
        hashsum_callable_factory=script.hashsum_factory,
        remote_stat_callable=lambda job: True,
    )
    await client.init()
    try:
        await client.enqueue(run)
        await client.wait_idle(timeout=30)
        row = await client.job(run)
    finally:
        await client.close()
    assert row.state == SyncJobState.FAILED and row.error_kind == K.LOCAL_FILE_VANISHED.value, row.last_error
    assert "sub/b.dat" in row.last_error and "between transfer and verify" in row.last_error
    assert script.pushes == 1


@pytest.mark.parametrize(
    ("reason", "shown", "kind"),
    [
        ("verify_skipped_oversize", "larger than verify_max_stream_bytes", "verify_skipped_oversize"),
        # A file the NAS could not read is not "oversize" (issue 10).
        ("unreadable: Permission denied", "unreadable", "verify_unreadable"),
        ("remote_read_error", "remote_read_error", "verify_unreadable"),
    ],
)
async def test_a_file_the_nas_could_not_hash_is_never_verified_and_the_reason_is_shown(
    lab: Lab, reason: str, shown: str, kind: str
) -> None:
    from exlab_wizard.sync.transports.base import RemoteManifest

    run = lab.make_run(files={"a.dat": b"A" * 100, "huge.raw": b"H" * 100})

    def partly(run_path: Path) -> RemoteManifest:
        known = _hashes(run_path)
        return RemoteManifest(hashes={"a.dat": known["a.dat"]}, unverifiable={"huge.raw": reason})

    row = await _run(lab, Script([], hash_failures=[partly]), run)
    assert row.state == SyncJobState.FAILED and row.error_kind == kind
    assert "huge.raw" in row.last_error and shown in row.last_error
