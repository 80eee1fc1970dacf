"""An audit that read the NAS before a re-verification must not count its pass for the new copy (it used to).

The audit compares the recorded manifest it read with the NAS manifest it read,
then re-reads the job and adds a verify pass if the job is still VERIFIED or
CLEANUP_ELIGIBLE (``sync/audit.py``, ``audit_job``). It does not check that the
job is still the *same verification* (manifest digest, ``verified_at``) it
checked. Meanwhile another actor (the reaper: a late file in the run) can send
the job back to QUEUED, and the dispatcher re-push and re-verify it. The audit
then credits the new verification with a second pass it never read, and moves
``last_verify_at`` forward.

With the defaults (2 passes, 24 h, audit every 24 h) that pass is the audit
which is meant to stand between a verification and the deletion (docs/
reliability.md: "The defaults (2 passes, 24 h) put an audit between the
verification and the deletion"). Here the NAS copy rots after the
re-verification; at 24.5 h the audit loop is not due yet (its clock was moved by
the stale pass) and the reaper deletes the local copy: the file is gone locally
and damaged on the NAS.
"""

from __future__ import annotations

import asyncio

from exlab_wizard.sync import audit as audit_mod
from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock, flip_byte_keep_stat
from tests.lab import EQ, FILES, Lab, running, synced

S = SyncJobState


def defaults_config(lab: Lab):
    """Cleanup on with the shipped defaults: 2 passes, 24 h, an audit every 24 h; loops driven by the test."""
    cfg = lab.config(audit_interval_s=86400, scan_interval_s=3600)
    opts = {"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": True}
    return cfg.model_copy(update={"nas_cleanup": cfg.nas_cleanup.model_copy(update=opts)})


async def test_audit_pass_read_before_a_reverification_is_not_counted_for_the_new_copy(lab: Lab) -> None:
    clock = Clock()
    cfg = defaults_config(lab)
    run = lab.make_run(files=FILES)
    async with running(cfg, clock) as client:
        await synced(client, run)  # pass 1
        clock.advance(25)
        await client.audit_once()  # pass 2, 25 h old: eligible
        job = await client.job(run)
        assert job.state == S.VERIFIED and job.verify_passes == 2

        # The next audit of this (large) run reads the NAS, and takes a while to finish.
        ctx = client._ctx
        transport = ctx.remotes.transport(cfg.equipment_by_id(EQ))
        real = transport.remote_manifest
        hold = [True]
        held, release = asyncio.Event(), asyncio.Event()

        async def hashsum(r):
            answer = await real(r)
            if hold and hold.pop():  # only the audit's read is slow; the verification's is not
                held.set()
                await release.wait()
            return answer

        ctx.remotes._hashsums[EQ] = hashsum
        audit = asyncio.create_task(client.audit_once())
        await asyncio.wait_for(held.wait(), 30)

        # Meanwhile a late file arrives; the reaper sends the run back, and it is re-pushed and re-verified.
        (run / "image_002.tif").write_bytes(b"C" * 2000)
        outcomes = await client.cleanup_once()
        assert [o.action for o in outcomes if o.action != "promoted"] == ["requeued"]
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert job.state == S.VERIFIED and job.verify_passes == 1, job.last_error
        reverified_at = job.verified_at

        # After this verification the NAS copy rots (what the audit between verification and deletion is for).
        nas_file = lab.nas_copy(run) / "sub" / "stack.raw"
        flip_byte_keep_stat(nas_file, 7)

        # The audit that read the NAS *before* the re-push now finishes, an hour later.
        clock.advance(1)
        release.set()
        await asyncio.wait_for(audit, 30)
        after_audit = await client.job(run)

        # 24.5 h after the re-verification: the loops take their turn (audit loop first, then the reaper).
        clock.advance(23.5)
        await audit_mod.audit_pass(ctx, force=False)
        await client.cleanup_once()
        await client.wait_idle(timeout=60)
        final = await client.job(run)

    local = run / "sub" / "stack.raw"
    local_ok = local.is_file() and local.read_bytes() == FILES["sub/stack.raw"]
    nas_ok = nas_file.is_file() and nas_file.read_bytes() == FILES["sub/stack.raw"]
    assert local_ok or nas_ok, (
        "sub/stack.raw lost: deleted locally while its NAS copy is damaged. "
        f"Re-verified at {reverified_at}; after the stale audit: verify_passes={after_audit.verify_passes}, "
        f"last_verify_at={after_audit.last_verify_at} (no read of the re-verified NAS copy happened); "
        f"final state {final.state.value}"
    )
