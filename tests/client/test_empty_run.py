"""A run with no data files (an acquisition that wrote nothing) is audited and cleaned like any other.

Such a run (only its ``.exlab-wizard/``, or only empty folders) is verified
with an empty manifest ("verified 0 files", digest e3b0c442...). The audit
took that ``{}`` for "no recorded manifest": every audit called the NAS copy
a mismatch, sent the run again (a new ``previous/<stamp>/`` reserved on the
NAS each time) and cleared its passes, so it never got a second pass nor
reached cleanup. The reaper refused it too ("manifest lists no files").
Now ``{}`` with the job's digest is the verified manifest: it passes when the
NAS copy holds no data files either, and the reaper cleans the run with
nothing to delete (its cache and run folder with ``retain_cache: false``,
after the proved final push; folders that were empty before are kept).

The same ``{}`` was taken for "none" elsewhere: the local check (a file
written into a verified empty run was never sent by the audit), the queue's
record standing in for a lost ``checksums.sha256`` (an empty record was
refused), and, the reverse, an emptied ``checksums.sha256`` taken for a lost
one (the run sent again instead of the audit refusing to conclude).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from exlab_wizard.sync.manifest_format import manifest_path
from exlab_wizard.sync.reaper.store import CleanupStore
from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports.base import METADATA_DIR
from tests.helpers import Clock
from tests.lab import FILES, Site, running, synced

S = SyncJobState
EMPTY_DIGEST = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def _config(site: Site, *, enabled: bool = True, retain_cache: bool = True) -> Any:
    return site.config(
        sync={"audit_interval_s": 6 * 3600, "scan_interval_s": 3600},
        cleanup={"enabled": enabled, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": retain_cache},
    )


async def _audits(client: Any, clock: Clock, times: int) -> None:
    for _ in range(times):
        clock.advance(6)
        await client.audit_once()
        await client.wait_idle(timeout=60)


def _mismatches(job: Any) -> list[str]:
    return [f"{e.kind}: {e.detail}" for e in job.events if "hash_mismatch" in (e.detail or "")]


def _reserved(job: Any) -> list[str]:
    return [e.detail for e in job.events if e.kind == "previous_reserved"]


async def _audited_and_cleaned(site: Site, run: Path, *, retain_cache: bool) -> Any:
    """Synced, audited three times (6 h apart), then at 37 h one reaper pass."""
    clock = Clock()
    async with running(_config(site, retain_cache=retain_cache), clock) as client:
        job = await synced(client, run)
        assert job.manifest_digest == EMPTY_DIGEST, job.manifest_digest
        await _audits(client, clock, 3)
        audited = await client.job(run)
        assert audited.state == S.VERIFIED and audited.verify_passes == 4, (
            audited.state,
            audited.verify_passes,
            _mismatches(audited),
        )
        clock.advance(19)
        await client.cleanup_once()
        await client.wait_idle(timeout=60)
        return await client.job(run)


async def test_a_run_with_no_data_files_gets_its_audit_passes_and_is_cleaned(site: Site) -> None:
    run = site.make_run("Run_1", files={})  # only .exlab-wizard/creation.json
    job = await _audited_and_cleaned(site, run, retain_cache=True)
    assert job.state == S.CLEANED, (job.state, job.last_error, [e.detail for e in job.events][-4:])
    assert not _mismatches(job)
    assert not _reserved(job), "sent again after its verification"
    # Nothing to delete: the run's cache stays (retain_cache), its record says so.
    record = json.loads((run / METADATA_DIR / "creation.json").read_text())
    assert record["local_cleaned"]["files"] == 0 and record["local_cleaned"]["manifest_digest"] == EMPTY_DIGEST
    nas = site.nas_copy(run)
    assert (nas / METADATA_DIR / "checksums.sha256").read_bytes() == b""
    assert not (nas / METADATA_DIR / "previous").exists()


async def test_a_run_with_no_data_files_and_no_cache_kept_leaves_its_record_on_the_nas(site: Site) -> None:
    run = site.make_run("Run_1", files={})
    creation = (run / METADATA_DIR / "creation.json").read_bytes()
    job = await _audited_and_cleaned(site, run, retain_cache=False)
    assert job.state == S.CLEANED, (job.state, job.last_error, [e.detail for e in job.events][-4:])
    assert not _mismatches(job)
    # The run folder goes only after the final push is proved: the NAS holds the run's record.
    assert not run.exists()
    nas = site.nas_copy(run)
    assert (nas / METADATA_DIR / "checksums.sha256").read_bytes() == b""
    record = json.loads((nas / METADATA_DIR / "creation.json").read_text())
    assert record["paths"]["local"] == json.loads(creation)["paths"]["local"] and record["sync_status"] == "synced"
    assert record["local_cleaned"]["files"] == 0


async def test_a_run_of_empty_folders_gets_its_audit_passes_and_keeps_its_folders(site: Site) -> None:
    run = site.make_run("Run_1", files={})
    (run / "ch1" / "raw").mkdir(parents=True)
    (run / "ch2").mkdir()
    job = await _audited_and_cleaned(site, run, retain_cache=False)
    assert job.state == S.CLEANED, (job.state, job.last_error, [e.detail for e in job.events][-4:])
    assert not _mismatches(job)
    assert not _reserved(job), "sent again after its verification"
    # Folders that were empty before the cleanup are kept (they may be markers); only the cache goes.
    assert (run / "ch1" / "raw").is_dir() and (run / "ch2").is_dir()
    assert not (run / METADATA_DIR).exists()
    nas = site.nas_copy(run)
    assert (nas / "ch1" / "raw").is_dir() and (nas / METADATA_DIR / "creation.json").is_file()


async def test_a_file_written_into_a_verified_empty_run_is_sent_by_the_audit(site: Site) -> None:
    """Cleanup off: the audit's local check is what finds the file (the reaper never looks)."""
    run = site.make_run("Run_1", files={})
    clock = Clock()
    async with running(_config(site, enabled=False), clock) as client:
        await synced(client, run)
        (run / "late.bin").write_bytes(b"the instrument wrote after all\n")
        await _audits(client, clock, 1)
        job = await client.job(run)
    assert job.state == S.VERIFIED and job.manifest_digest != EMPTY_DIGEST, (job.state, job.manifest_digest)
    assert any("the run changed since verification" in (e.detail or "") for e in job.events)
    assert (site.nas_copy(run) / "late.bin").read_bytes() == b"the instrument wrote after all\n"


async def test_an_empty_run_whose_checksums_file_is_lost_still_gets_its_pass(site: Site) -> None:
    """The queue's record (no files, the job's digest) stands in for the lost local checksums.sha256."""
    run = site.make_run("Run_1", files={})
    clock = Clock()
    async with running(_config(site, enabled=False), clock) as client:
        await synced(client, run)
        manifest_path(run).unlink()
        await _audits(client, clock, 1)
        job = await client.job(run)
    assert job.state == S.VERIFIED and job.verify_passes == 2, (job.state, job.verify_passes, _mismatches(job))
    assert not _mismatches(job) and not _reserved(job)


async def test_an_emptied_checksums_file_is_not_taken_for_a_lost_one(site: Site) -> None:
    """A run with files whose checksums.sha256 was emptied, the queue's record lost: the audit concludes nothing.

    It used to read the empty file as "no recorded manifest" and send the run again; a manifest
    that is not the job's digest is skipped, as an edited one is (and the reaper refuses it too).
    """
    run = site.make_run("Run_1", files=FILES)
    clock = Clock()
    async with running(_config(site, enabled=False), clock) as client:
        job = await synced(client, run)
        CleanupStore(client._ctx.require_queue()).forget_verified(job.id)
        manifest_path(run).write_bytes(b"")
        await _audits(client, clock, 1)
        job = await client.job(run)
    assert job.state == S.VERIFIED and job.verify_passes == 1, (job.state, job.verify_passes, _mismatches(job))
    assert not _mismatches(job) and not _reserved(job)
    assert job.events[-1].kind == "audit_skipped", job.events[-1].detail
    assert job.events[-1].detail == "recorded manifest changed since verification"
