"""A file sent again after a hash mismatch never replaces its NAS copy: it is kept first (rule 2).

Found by review: a verified file X is edited (A -> B); a re-transfer writes B
to the NAS and stops before its verification (a share that drops, a kill);
before the next attempt the local B rots with its size and mtime kept (C). The
damage check compares C with the old manifest (A) and, its mtime being later,
counts it as an edit; the push skips X (same size and mtime on both sides);
the verification finds NAS B against local C and sends C again. Which side
rotted, no check can tell, and the NAS's B was the only copy of the edit: the
engine now moves every NAS copy it is about to send over after a mismatch
under ``.exlab-wizard/previous/<stamp>/`` first, as it does for accepted local
changes; and, since a later review, every file changed since the verification
before the first re-transfer already.
"""

from __future__ import annotations

import os

from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports import make_transport
from tests.helpers import Clock, flip_byte_keep_stat
from tests.lab import EQ, Lab, events, ready, running, synced
from tests.lab import cleanup_config as config

S = SyncJobState
X = "sub/stack.raw"
FILES = {"image_001.tif": os.urandom(4000), X: os.urandom(5000), "notes.txt": b"acquired ok\n"}


def _previous(nas_run) -> dict[str, bytes]:
    kept = nas_run / ".exlab-wizard" / "previous"
    return {str(p.relative_to(kept)): p.read_bytes() for p in kept.rglob("*") if p.is_file()} if kept.exists() else {}


async def test_an_edit_that_reached_the_nas_survives_its_local_copy_rotting(lab: Lab) -> None:
    clock = Clock()
    cfg = config(lab, enabled=True)
    run = lab.make_run(files=FILES)
    nas = lab.nas_copy(run)
    async with running(cfg, clock) as client:
        await ready(client, clock, run)
        # An edit (new bytes, a later mtime), and a re-transfer that wrote it to the NAS and then
        # stopped before its verification (the real transport's push, nothing else).
        edit = os.urandom(5000)
        (run / X).write_bytes(edit)
        await make_transport(cfg.equipment_by_id(EQ)).push(run, bwlimit_kibps=None)
        assert (nas / X).read_bytes() == edit
        # The local copy rots meanwhile: one byte, size and mtime kept.
        flip_byte_keep_stat(run / X, 100)
        rotten = (run / X).read_bytes()
        # The reaper sees the changed local file and sends the run again.
        await client.cleanup_once()
        await client.wait_idle(timeout=60)
        job = await client.job(run)
    assert (nas / X).read_bytes() == edit or edit in _previous(nas).values(), (
        f"the NAS's copy of the edit is gone; job {job.state.value}: {job.last_error}"
    )
    # What happened is on the record: the NAS copy kept before the file was sent again (X changed
    # since the verification, so it is kept before the first re-transfer, before any mismatch).
    kept = [e.detail for e in events(job, "previous_kept")]
    assert kept and X in kept[-1], [e.detail for e in job.events]
    assert rotten != edit


async def test_a_file_sent_again_after_an_audit_mismatch_has_its_nas_copy_kept_first(lab: Lab) -> None:
    clock = Clock()
    cfg = config(lab, enabled=False)
    run = lab.make_run(files=FILES)
    nas = lab.nas_copy(run)
    async with running(cfg, clock) as client:
        await synced(client, run)
        flip_byte_keep_stat(nas / X, 7)  # the NAS copy differs now; which side is right, no check can tell
        differing = (nas / X).read_bytes()
        clock.advance(6)
        await client.audit_once()
        await client.wait_idle(timeout=60)
        job = await client.job(run)
    assert job.state == S.VERIFIED, job.last_error
    assert (nas / X).read_bytes() == FILES[X]
    assert differing in _previous(nas).values()
    kept = [e.detail for e in events(job, "previous_kept")]
    assert kept and X in kept[-1], [e.detail for e in job.events]
