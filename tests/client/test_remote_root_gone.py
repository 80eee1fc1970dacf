"""Rule 3 on the client: a NAS whose volume is not mounted (the server answers, the
configured remote root folder is gone) is never an empty NAS.

The three-rules property found it on rsync_ssh: ``--mkpath`` recreated the missing
root on the NAS's own disk, the run verified there and cleanup deleted the local
copy, whose only other copy was then hidden under the volume once it was mounted
again. Here as a plain test on rsync_ssh and mount.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from exlab_wizard.sync.nas_client import NASSyncClient
from exlab_wizard.sync.states import SyncJobState as S
from tests.helpers import tree
from tests.lab import Site, make_client

FIRST = {"image_001.tif": b"\x01" * 5000, "sub/stack.raw": b"\x02" * 3000}
SECOND = {"image_002.tif": b"\x03" * 4000, "notes.txt": b"second run\n"}


def cleanup() -> dict[str, Any]:
    return {"enabled": True, "min_verify_passes": 1, "min_age_hours": 0, "retain_cache": False}


async def settled(client: NASSyncClient, run: Path) -> Any:
    """The run's job once no attempt is in flight or due (the backoff in these tests is 0.01 s)."""
    for _ in range(500):
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        if job.state not in (S.QUEUED, S.RUNNING, S.AWAITING_VERIFY):
            return job
        await asyncio.sleep(0.02)
    raise AssertionError(f"{run.name} did not settle: {job.state} {job.last_error}")


def data_files(run: Path) -> dict[str, bytes]:
    return {rel: data for rel, data in tree(run).items() if not rel.startswith(".exlab-wizard/")}


async def test_a_run_sent_while_the_remote_root_is_gone_never_verifies_and_nothing_is_deleted(site: Site) -> None:
    first = site.make_run("Run_01", files=FIRST)
    client = make_client(site.config(cleanup=cleanup()))
    await client.init()
    try:
        await client.enqueue(first)
        assert (await settled(client, first)).state == S.VERIFIED

        second = site.make_run("Run_02", files=SECOND)
        root = site.nas_root
        away = root.with_name(root.name + "-volume-not-mounted")
        root.rename(away)  # the volume is not mounted: the root's parent is there, the root is not
        await client.enqueue(second)
        job = await settled(client, second)
        assert job.state == S.FAILED, (job.state, job.last_error)
        assert job.error_kind == "network", (job.error_kind, job.last_error)
        for _ in range(3):
            await client.cleanup_once()
        assert not root.exists(), "a write recreated the missing remote root"
        assert data_files(first) == FIRST and data_files(second) == SECOND  # cleanup deleted nothing
        states = {Path(j.run_path).name: j.state for j in await client.jobs()}
        assert S.CLEANED not in states.values(), states

        away.rename(root)  # mounted again: the run syncs
        await client.retry(job.id)
        job = await settled(client, second)
        assert job.state == S.VERIFIED, (job.state, job.last_error)
    finally:
        await client.close()
    assert data_files(site.nas_copy(second)) == SECOND
    assert data_files(site.nas_copy(first)) == FIRST
