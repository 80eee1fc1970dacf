"""A local change between the job's local check and the push's own look is never sent over a verified copy unkept.

``run_job`` checks a run verified before against its verified manifest and
keeps, under ``previous/``, the NAS copies of the files that check finds
changed. The push then lists the run afresh and decides what to send. A
change made between the two (the run folder swapped for another of the same
name, a file damaged: truncated, its mtime put back) used to go over the
verified NAS copy with nothing kept. The push now keeps every NAS file it
replaces itself (``previous_stamp``), decided from its own listing. The hook on
``_mark_pending`` only places the change in that window.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from exlab_wizard.sync import job_runner
from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock
from tests.lab import FILES, Lab, act_once_in, cleanup_config, running, swap_folder, synced

S = SyncJobState
FOREIGN = {rel: b"F" * (len(data) + 7) for rel, data in FILES.items()}


def _kept(nas_run: Path) -> list[Path]:
    return [p for p in nas_run.rglob("*") if "previous" in p.parts and p.is_file()]


@pytest.mark.parametrize("action", ["swap_folder", "damage_file"])
async def test_a_change_before_the_push_never_replaces_the_verified_copy_unkept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, action: str
) -> None:
    lab = Lab.build(tmp_path)
    clock = Clock()
    run = lab.make_run("Run_2026-01-01", files=FILES)
    other = lab.make_run("Run_2026-01-09", files=FOREIGN)
    async with running(cleanup_config(lab), clock) as client:
        await synced(client, run)
        nas = lab.nas_copy(run)
        assert all((nas / rel).read_bytes() == data for rel, data in FILES.items())

        edited = sorted(FILES)[-1]
        (run / edited).write_bytes(b"an edit\n")  # an ordinary edit: the run is sent again

        def change() -> None:
            if action == "swap_folder":  # the user renames folders while the job starts
                swap_folder(run, other)
            else:  # a file damaged: truncated, its mtime put back
                target = run / sorted(FILES)[0]
                st = target.stat()
                target.write_bytes(FILES[sorted(FILES)[0]][:10])
                os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))

        fired = act_once_in(monkeypatch, job_runner, "_mark_pending", lambda ctx, run_path, _: run_path == run, change)
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert fired
        kept = _kept(nas)
        lost = [
            rel
            for rel, data in FILES.items()
            if rel != edited
            and (nas / rel).read_bytes() != data
            and not any(p.name == Path(rel).name and p.read_bytes() == data for p in kept)
        ]
        assert not lost, (
            f"verified NAS copy replaced with nothing kept: {lost}; job {job.state} {job.error_kind} {job.last_error}"
        )
