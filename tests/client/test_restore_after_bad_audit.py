"""A job the audit FAILED ``local_damage`` used to keep its verification, and ``restore`` revived it.

The audit found NAS copies that do not match the manifest, and one of those
files is damaged locally too: FAILED ``local_damage`` (``sync/audit.py``,
``_audit_failed(final=True)`` via ``job_runner.fail``), which keeps
``verified_at``, ``verify_passes`` and ``pass_times``. ``restore`` then moves any
FAILED ``local_damage`` job whose run matches its manifest back to VERIFIED
"with the same manifest: its verify passes and verified_at are kept (the NAS
copy was never touched)" (``sync/recovery.py``, ``_after_restore``). Here the
NAS copy was found bad, so the job is treated as verified with a NAS copy the
engine knows is damaged, and the reaper deletes the local copies behind a
listing that only compares sizes.
"""

from __future__ import annotations

import os

from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock, flip_byte_keep_stat
from tests.lab import FILES, Lab, cleanup_config, ready, running

S = SyncJobState


async def test_restore_never_revives_a_job_whose_nas_copy_the_audit_found_bad(lab: Lab) -> None:
    clock = Clock()
    cfg = cleanup_config(lab)
    run = lab.make_run(files=FILES)
    nas = lab.nas_copy(run)
    async with running(cfg, clock) as client:
        await ready(client, clock, run)  # 2 passes, 25 h old
        # Both NAS copies rot (same size); the local copy of one of them rots too.
        flip_byte_keep_stat(nas / "image_001.tif", 5)
        flip_byte_keep_stat(nas / "sub" / "stack.raw", 7)
        local_stack = run / "sub" / "stack.raw"
        st = os.stat(local_stack)
        flip_byte_keep_stat(local_stack, 9)
        clock.advance(6)
        await client.audit_once()
        job = await client.job(run)
        assert job.state == S.FAILED and job.error_kind == "local_damage", job.last_error
        assert "audit mismatch: 2 different" in job.last_error

        # restore cannot help (the NAS copy is bad too); the operator puts the verified bytes back
        # from a backup (cp -p), and asks restore again, which finds nothing damaged any more.
        first = await client.restore(run)
        assert not first.ok
        local_stack.write_bytes(FILES["sub/stack.raw"])
        os.utime(local_stack, ns=(st.st_atime_ns, st.st_mtime_ns))
        second = await client.restore(run)
        after_restore = await client.job(run)

        outcomes = await client.cleanup_once()
        await client.wait_idle(timeout=60)

    image_local = run / "image_001.tif"
    local_ok = image_local.is_file() and image_local.read_bytes() == FILES["image_001.tif"]
    nas_ok = (nas / "image_001.tif").read_bytes() == FILES["image_001.tif"]
    assert local_ok or nas_ok, (
        "image_001.tif lost: its NAS copy was found bad by the audit, yet restore made the job "
        f"{second.state.value} (verify_passes={after_restore.verify_passes}, verified_at={after_restore.verified_at}) "
        f"and the reaper deleted the local copy: {[(o.action, o.reason) for o in outcomes]}"
    )
