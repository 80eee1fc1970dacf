"""A run's creation.json on the NAS is never replaced by a poorer one the engine wrote anew.

Where the local creation.json was lost (deleted by hand, or by a reaper pass
killed while it removed the cache with ``retain_cache: false``), the engine
writes a new, nearly empty one: the minimal file before a push, the reaper's
``local_cleaned`` record. The metadata push sent that file over the run's
full record on the NAS (its provenance, overrides, note), and with
``retain_cache: false`` the local one was then removed: the record was gone
everywhere. Every metadata push now first brings the NAS's keys into the
local file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from exlab_wizard.sync.states import SyncJobState as S
from tests.client.test_audit_and_cleanup import first_final_push_fails
from tests.helpers import Clock
from tests.lab import FILES, Lab, acts, ready, running, synced
from tests.lab import cleanup_config as config

CREATION = Path(".exlab-wizard") / "creation.json"


def record(folder: Path) -> dict:
    return json.loads((folder / CREATION).read_text())


async def test_retain_cache_false_a_lost_local_record_never_replaces_the_nas_one(lab: Lab) -> None:
    clock = Clock()
    run = lab.make_run(files=FILES)
    nas = lab.nas_copy(run)
    async with running(config(lab, retain_cache=False), clock) as client:
        await ready(client, clock, run)
        before = record(nas)
        first_final_push_fails(client)  # the job waits with the local data deleted, its cache kept
        assert [o.action for o in acts(await client.cleanup_once())] == ["waiting"]
        (run / CREATION).unlink()  # as a pass killed while it removed the cache leaves it
        for _ in range(3):
            acts(await client.cleanup_once())
            if (await client.job(run)).state == S.CLEANED:
                break
        job = await client.job(run)
        assert job.state == S.CLEANED, [e.detail for e in job.events][-4:]
    assert not run.exists()
    after = record(nas)
    assert {key: after.get(key) for key in before if key != "sync_status"} == {
        key: value for key, value in before.items() if key != "sync_status"
    }
    assert after["local_cleaned"]["manifest_digest"] == job.manifest_digest


async def test_a_record_deleted_by_hand_is_brought_back_before_the_next_push(lab: Lab) -> None:
    clock = Clock()
    run = lab.make_run(files=FILES)
    nas = lab.nas_copy(run)
    async with running(lab.config(), clock) as client:
        await synced(client, run)
        await client.wait_idle(timeout=30)  # its metadata push
        before = record(nas)
        assert before.get("lab_note") is not None or len(before) > 3
        (run / CREATION).unlink()
        edited = run / next(iter(FILES))
        edited.write_bytes(b"an edit")
        os.utime(edited, (clock().timestamp() + 60,) * 2)
        await client.enqueue(run)  # the minimal creation.json is written before the push
        await client.wait_idle(timeout=30)
        assert (await client.job(run)).state == S.VERIFIED
    after, local = record(nas), record(run)
    assert set(before) <= set(after), set(before) - set(after)
    assert {k: after[k] for k in before if k not in ("sync_status", "paths")} == {
        k: v for k, v in before.items() if k not in ("sync_status", "paths")
    }
    assert after == local


async def test_overrides_only_the_nas_record_holds_are_kept(lab: Lab) -> None:
    clock = Clock()
    run = lab.make_run(files=FILES)
    nas = lab.nas_copy(run)
    async with running(lab.config(), clock) as client:
        await synced(client, run)
        await client.wait_idle(timeout=30)
        nas_record = record(nas)
        entry = {"id": "ovr-on-the-nas", "rule": "x", "reason": "kept on the NAS", "revoked": False}
        nas_record["validation_overrides"] = [*nas_record.get("validation_overrides", []), entry]
        (nas / CREATION).write_text(json.dumps(nas_record))
        edited = run / next(iter(FILES))
        edited.write_bytes(b"another edit")
        os.utime(edited, (clock().timestamp() + 60,) * 2)
        await client.enqueue(run)
        await client.wait_idle(timeout=30)
        assert (await client.job(run)).state == S.VERIFIED
    assert entry in record(nas)["validation_overrides"]
    assert entry in record(run)["validation_overrides"]
