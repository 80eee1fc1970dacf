"""A local checksums.sha256 written by a step that then failed never locks the run out of its own NAS folder.

``_promote`` writes the run's local ``checksums.sha256`` before the VERIFIED
transition records its digest. A failure between the two (creation.json not
writable for a moment, a kill) left a local manifest nobody recorded, and the
next push sent it to the NAS with the data. Hit once more after the run gained
a file, the NAS held one unrecorded manifest and the local run another: every
push from then on was REMOTE_CONFLICT ("the verified copy of another run"),
final, for good. The data push no longer sends the manifest: it reaches the
NAS only with the metadata push after its digest is recorded.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from exlab_wizard.sync import job_runner
from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock
from tests.lab import FILES, Lab, cleanup_config, running

S = SyncJobState


async def _settled(client, run: Path):  # type: ignore[no-untyped-def]
    """The job once it is VERIFIED or FAILED (its retries come due within the test's backoff)."""
    for _ in range(400):
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        if job.state in (S.VERIFIED, S.FAILED):
            return job
        await asyncio.sleep(0.02)
    return job


async def test_an_unrecorded_local_manifest_never_blocks_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = Lab.build(tmp_path)
    clock = Clock()
    run = lab.make_run("Run_2026-01-01", files=FILES)
    real = job_runner._mark_synced
    calls: list[int] = []
    broken = [True]

    def flaky(ctx, run_path, remote):  # type: ignore[no-untyped-def]
        calls.append(1)
        if broken[0] and len(calls) <= 2:
            if len(calls) == 1:
                (run / "late.bin").write_bytes(b"written by the instrument afterwards\n")
            raise OSError(28, "No space left on device (creation.json)")
        return real(ctx, run_path, remote)

    monkeypatch.setattr(job_runner, "_mark_synced", flaky)
    async with running(cleanup_config(lab), clock) as client:
        await client.enqueue(run)
        job = await _settled(client, run)
        broken[0] = False  # the transient cause is gone
        if job.state == S.FAILED:
            await client.retry(job.id)
        job = await _settled(client, run)
        nas = lab.nas_copy(run)
        assert job.state == S.VERIFIED, (
            f"job stuck: {job.state} {job.error_kind}: {job.last_error}; "
            f"_mark_synced calls {len(calls)}; NAS holds {sorted(p.name for p in nas.rglob('*') if p.is_file())}"
        )
