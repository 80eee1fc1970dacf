"""A file the instrument appends to after it was copied is an edit, never "local damage".

Found by review: it was judged damage, and the documented way out
(``restore``) then cut the appended bytes off for good.

The watcher enqueues a run at its sentinel; the instrument appends one more
frame to a file already copied while the push (or its verification) is still
going. The push's hashes (mount hashes in the copy pass) match the NAS, the
job goes VERIFIED, and ``record_verified_stat`` then records the file's
*new* size and mtime beside the *old* hash (untrusted, as its times are past
the hashing start). The interlock-6 rule "new content, the recorded mtime"
then calls it damage: FAILED ``local_damage`` whatever the size, though the
file only grew and its size is not the one the NAS holds. The operator's
remedy ``exlab-sync restore`` fetches the shorter NAS copy and renames it
over the local file: the appended bytes, never on the NAS, were gone
(rule 1). Now the record reads such a file again and marks its row
``newer``: its own mtime means an edit, the job is sent again.
"""

from __future__ import annotations

import os
from pathlib import Path

from exlab_wizard.sync import job_runner
from exlab_wizard.sync.reaper import load_verified_stats
from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock
from tests.lab import FILES, Lab, act_once_in, cleanup_config, running, synced

S = SyncJobState
GROWN = "sub/stack.raw"
FRAME = os.urandom(4096)


def _append_frame(run: Path) -> None:
    with open(run / GROWN, "ab") as f:  # the instrument's last frame, after the file was copied
        f.write(FRAME)


def _grown_while_verified(tmp_path: Path, monkeypatch) -> tuple[Lab, Path]:
    """A run whose ``GROWN`` gets a frame appended right before its verified stats are recorded."""
    lab = Lab.build(tmp_path)
    run = lab.make_run("Run_2026-01-01", files={**FILES, "acquisition_complete.flag": b""})
    act_once_in(monkeypatch, job_runner, "record_verified_stat", lambda *a, **k: True, lambda: _append_frame(run))
    return lab, run


async def _a_day_of_audits_and_cleanup(client, clock: Clock) -> None:
    for _ in range(5):  # the reaper's local check comes once the run is 24 h old
        clock.advance(6)
        await client.audit_once()
        await client.cleanup_once()
        await client.wait_idle(timeout=60)


async def test_a_file_grown_after_its_copy_is_never_cut_back(tmp_path: Path, monkeypatch) -> None:
    lab, run = _grown_while_verified(tmp_path, monkeypatch)
    clock = Clock()
    async with running(cleanup_config(lab), clock) as client:
        job = await synced(client, run)
        assert (run / GROWN).read_bytes().endswith(FRAME)
        await _a_day_of_audits_and_cleanup(client, clock)
        job = await client.job(run)
        verdict = (job.state.value, job.error_kind, job.last_error)
        if job.state == S.FAILED and job.error_kind == "local_damage":
            await client.restore(run)  # what recovery.md tells the operator to do about local damage
        after = (run / GROWN).read_bytes() if (run / GROWN).exists() else b""
        on_nas = (lab.nas_copy(run) / GROWN).read_bytes()
    assert FRAME in after or FRAME in on_nas, (
        f"the appended frame is on neither side: job went {verdict}; local file now {len(after)} bytes, "
        f"NAS {len(on_nas)} bytes"
    )
    assert verdict[1] != "local_damage", f"a file that only grew was called local damage: {verdict}"


def _flip_a_bit_keeping_the_stat(path: Path) -> bytes:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    with open(path, "r+b") as f:  # in place: same inode, same size
        f.write(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # bit rot keeps the mtime
    return bytes(data)


async def test_bit_rot_in_a_file_recorded_newer_is_never_sent_over_the_nas_copy(tmp_path: Path, monkeypatch) -> None:
    """Found by review: the edit's mtime alone made any bytes under it an edit, and a later bit flip was sent (rule 2)."""
    lab, run = _grown_while_verified(tmp_path, monkeypatch)
    clock = Clock()
    async with running(cleanup_config(lab), clock) as client:
        job = await synced(client, run)
        queue = client._ctx.require_queue()
        assert load_verified_stats(queue, job.id)[GROWN].newer_sha256 is not None  # the edit's bytes are recorded
        nas_before = (lab.nas_copy(run) / GROWN).read_bytes()

        damaged = _flip_a_bit_keeping_the_stat(run / GROWN)  # later: bit rot at rest, stat kept

        await _a_day_of_audits_and_cleanup(client, clock)
        job = await client.job(run)
        on_nas = (lab.nas_copy(run) / GROWN).read_bytes()

    assert on_nas != damaged, (
        f"local damage (a bit flipped, size and mtime kept) was sent over the verified NAS copy as an edit; "
        f"job {job.state.value} {job.error_kind}; NAS had {len(nas_before)} verified bytes"
    )
    assert job.error_kind == "local_damage", (job.state.value, job.error_kind, job.last_error)
