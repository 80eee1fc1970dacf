"""A file grown after its copy, its verified stat recorded by an engine before queue migration 10: never cut back.

Found by review (upgrade): the scenario of test_grown_after_its_copy.py under
an engine before migration 10. That engine recorded the file's *new* size and
mtime beside the *old* hash, untrusted, and did not read the file again.
Migration 10 added ``newer_sha256`` as NULL, which reads "this stat stands for
the verified bytes": the upgraded engine failed the job ``local_damage``, and
``exlab-sync restore`` (the documented way out) put the shorter NAS copy over
the local file; the appended frame, never on the NAS, was gone (rule 1).
Migration 11 marks such rows: bytes under their stat are an edit, sent again
(the push keeps the replaced NAS copy under ``previous/``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from exlab_wizard.sync import queue as queue_mod
from exlab_wizard.sync.reaper.store import VerifiedStat
from exlab_wizard.sync.states import SyncJobState
from tests.client.test_grown_after_its_copy import FRAME, GROWN, _a_day_of_audits_and_cleanup, _grown_while_verified
from tests.client.upgrade import as_version, user_version
from tests.helpers import Clock
from tests.lab import cleanup_config, running, synced

S = SyncJobState


def _kept_on_the_nas(nas_run: Path) -> list[bytes]:
    kept = nas_run / ".exlab-wizard" / "previous"
    return [p.read_bytes() for p in kept.rglob("*") if p.is_file()] if kept.is_dir() else []


@pytest.mark.parametrize("k", [8, 9, 10])
async def test_a_file_grown_after_its_copy_under_an_older_engine_is_never_cut_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, k: int
) -> None:
    lab, run = _grown_while_verified(tmp_path, monkeypatch)
    clock = Clock()
    async with running(cleanup_config(lab), clock) as client:
        await synced(client, run)  # its stats recorded after the frame was appended
    assert (run / GROWN).read_bytes().endswith(FRAME)
    db = lab.state / "queue.db"
    as_version(db, k)  # the rows as schema k had them (no newer_sha256 below 10)
    assert user_version(db) == k
    async with running(cleanup_config(lab), clock) as client:  # the upgraded engine
        await _a_day_of_audits_and_cleanup(client, clock)
        job = await client.job(run)
        verdict = (job.state.value, job.error_kind, job.last_error)
        if job.error_kind == "local_damage":
            await client.restore(run)  # what recovery.md tells the operator to do about local damage
        after = (run / GROWN).read_bytes() if (run / GROWN).exists() else b""
        on_nas = (lab.nas_copy(run) / GROWN).read_bytes()
    assert FRAME in after or FRAME in on_nas, (
        f"the appended frame is on neither side: job went {verdict}; local file now {len(after)} bytes, "
        f"NAS {len(on_nas)} bytes"
    )
    assert verdict[1] != "local_damage", f"a file that only grew was called local damage: {verdict}"


async def test_restore_after_the_upgrade_never_cuts_a_file_an_engine_at_10_called_damaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job an engine at 10 failed ``local_damage`` on such a row: the operator's restore after the upgrade keeps the frame."""
    lab, run = _grown_while_verified(tmp_path, monkeypatch)
    clock = Clock()
    async with running(cleanup_config(lab), clock) as client:
        await synced(client, run)
    verified = (lab.nas_copy(run) / GROWN).read_bytes()
    assert not verified.endswith(FRAME)
    db = lab.state / "queue.db"
    as_version(db, 8)
    with monkeypatch.context() as at_10:
        at_10.setattr(queue_mod, "MIGRATIONS", queue_mod.MIGRATIONS[:10])
        # Nor did it know of stats from another boot (migration 13), whose unchanged stat holds an edit.
        at_10.setattr(VerifiedStat, "unstamped", property(lambda _: False))
        async with running(cleanup_config(lab), clock) as client:  # upgraded to 10
            await _a_day_of_audits_and_cleanup(client, clock)
            job = await client.job(run)
            assert (job.state, job.error_kind) == (S.FAILED, "local_damage")  # as engines at 10 judged it
    async with running(cleanup_config(lab), clock) as client:  # upgraded on, to 11
        result = await client.restore(run)
        assert result.restored == ()
        assert (run / GROWN).read_bytes().endswith(FRAME)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
    assert (run / GROWN).read_bytes().endswith(FRAME)
    assert job.state == S.VERIFIED, (job.state.value, job.error_kind, job.last_error)
    assert (lab.nas_copy(run) / GROWN).read_bytes() == (run / GROWN).read_bytes()  # sent again, as an edit
    assert verified in _kept_on_the_nas(lab.nas_copy(run))  # the replaced NAS copy kept (rule 2)
