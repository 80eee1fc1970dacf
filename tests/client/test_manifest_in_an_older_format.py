"""A ``checksums.sha256`` an older engine wrote is still the run's verified manifest.

Engines before a root file named ``-`` was written ``./-`` wrote its line as
``<hex>  -``. The job's manifest digest is the SHA-256 of that file (the NAS
holds the same bytes); read and rendered anew it has another digest. The
audit and the reaper compare the file's bytes first, then its entries
rendered either way (the queue's per-file record stands in for a lost file).
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

from exlab_wizard.sync.manifest_format import format_manifest, has_digest, parse_manifest
from exlab_wizard.sync.states import SyncJobState
from tests.client.upgrade import as_version
from tests.helpers import Clock
from tests.lab import FILES, Lab, cleanup_config, events, running, synced

S = SyncJobState
DASHED = {**FILES, "-": b"a root file named dash\n"}


async def _verified_by_an_older_engine(lab: Lab, clock: Clock) -> Path:
    """A run with a root file ``-``, verified once, its manifest and digest as an older engine left them."""
    run = lab.make_run(files=DASHED)
    async with running(cleanup_config(lab), clock) as client:
        job = await synced(client, run)
        await client.wait_idle(timeout=60)
    manifest = run / ".exlab-wizard" / "checksums.sha256"
    old_bytes = manifest.read_bytes().replace(b"  ./-\n", b"  -\n")
    assert old_bytes != manifest.read_bytes()
    old_digest = hashlib.sha256(old_bytes).hexdigest()
    for where in (manifest, lab.nas_copy(run) / ".exlab-wizard" / "checksums.sha256"):
        where.write_bytes(old_bytes)

    def older_engine(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE jobs SET manifest_digest = ? WHERE id = ?", (old_digest, job.id))
        conn.execute(
            "UPDATE events SET detail = replace(detail, ?, ?) WHERE job_id = ?",
            (job.manifest_digest[:12], old_digest[:12], job.id),
        )

    as_version(lab.state / "queue.db", 9, edit=older_engine)
    return run


async def test_a_run_verified_by_an_older_engine_is_audited_and_cleaned(lab: Lab) -> None:
    clock = Clock()
    run = await _verified_by_an_older_engine(lab, clock)
    async with running(cleanup_config(lab), clock) as client:
        for _ in range(5):
            clock.advance(6)
            await client.audit_once()
            out = await client.cleanup_once()
            await client.wait_idle(timeout=60)
        job = await client.job(run)
    assert job.state == S.CLEANED, (job.state, job.last_error, [o.reason for o in out], job.events[-4:])
    assert not events(job, "audit_skipped")
    nas = lab.nas_copy(run)
    assert all((nas / rel).read_bytes() == data for rel, data in DASHED.items())


async def test_its_lost_manifest_is_stood_in_for_by_the_queue_record(lab: Lab) -> None:
    """The local file gone: the per-file SHA-256 the queue recorded, rendered as that engine did, stand in."""
    clock = Clock()
    run = await _verified_by_an_older_engine(lab, clock)
    (run / ".exlab-wizard" / "checksums.sha256").unlink()
    async with running(cleanup_config(lab), clock) as client:
        clock.advance(6)
        await client.audit_once()
        await client.wait_idle(timeout=60)
        job = await client.job(run)
    assert job.state == S.VERIFIED and job.verify_passes == 2, (job.state, job.last_error, job.events[-3:])


def test_has_digest_knows_both_renderings_and_nothing_else() -> None:
    hashes = {"-": "a" * 64, "b/c": "b" * 64}
    new = format_manifest(hashes)
    old = new.replace(b"  ./-\n", b"  -\n")
    assert parse_manifest(old) == parse_manifest(new) == hashes
    for rendering in (new, old):
        digest = hashlib.sha256(rendering).hexdigest()
        assert has_digest(hashes, digest)
        assert has_digest({}, digest, file_sha256=digest)  # the file's own bytes first
        assert not has_digest({**hashes, "-": "c" * 64}, digest)
    assert not has_digest(hashes, None) and not has_digest(hashes, "")
