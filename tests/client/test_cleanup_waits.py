"""The reaper never waits in silence, finishes when the NAS cannot show .exlab-wizard/, and keeps cleanup off."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pytest

from exlab_wizard.sync.nas_client import NASSyncClient
from exlab_wizard.sync.transports.base import METADATA_DIR
from tests.lab import Site, make_client

FILES = {"image_001.tif": b"\x01" * 5000, "sub/stack.raw": b"\x02" * 3000}
PREFIX = METADATA_DIR + "/"


def manifest_factory(holder: dict[str, Any]) -> Any:
    """A hashsum over the real transport that shows the data files only, or lies about creation.json."""

    def factory(equipment: Any) -> Any:
        async def hashsum(run_path: Path) -> Any:
            answer = await holder["client"]._transport(equipment).remote_manifest(run_path)
            if holder["mode"] == "data_only":
                data = {k: v for k, v in answer.hashes.items() if not k.startswith(PREFIX)}
                return dataclasses.replace(answer, hashes=data)
            if holder["mode"] == "stale_creation":
                return dataclasses.replace(answer, hashes={**answer.hashes, PREFIX + "creation.json": "0" * 64})
            return answer

        return hashsum

    return factory


async def synced(client: NASSyncClient, run: Path) -> Any:
    await client.enqueue(run)
    await client.wait_idle(timeout=60)
    job = await client.job(run)
    assert job.state.value == "verified" and not getattr(job, "metadata_push_pending", False), job.last_error
    return job


def cleanup(retain_cache: bool, enabled: bool = True) -> dict[str, Any]:
    return {"enabled": enabled, "min_verify_passes": 1, "min_age_hours": 0, "retain_cache": retain_cache}


async def test_retain_cache_false_finishes_when_the_remote_manifest_lists_data_files_only(site: Site) -> None:
    holder: dict[str, Any] = {"mode": "data_only"}
    run = site.make_run(files=FILES)
    nas = site.nas_copy(run)
    client = make_client(
        site.config(cleanup=cleanup(retain_cache=False)), hashsum_callable_factory=manifest_factory(holder)
    )
    holder["client"] = client
    await client.init()
    try:
        await synced(client, run)
        outcomes = [o for o in await client.cleanup_once() if o.action != "promoted"]
        job = await client.job(run)
    finally:
        await client.close()
    assert [o.action for o in outcomes] == ["deleted"], [(o.action, o.reason) for o in outcomes]
    assert job.state.value == "cleaned", [e.detail for e in job.events]
    assert "final metadata push accepted: the remote manifest does not list .exlab-wizard/" in job.events[-1].detail
    assert not [e for e in job.events if e.kind == "cleanup_refused"]
    assert not run.exists()
    # What the local copy held is on the NAS: the data, verified, and the final .exlab-wizard/.
    assert all((nas / rel).read_bytes() == data for rel, data in FILES.items())
    record = json.loads((nas / METADATA_DIR / "creation.json").read_text())
    assert record["sync_status"] == "synced" and record["local_cleaned"]["files"] == len(FILES)
    assert (nas / METADATA_DIR / "checksums.sha256").is_file()
    assert any("proof=" in line for line in site.log_lines("cleanup_run_folder_removed"))


@pytest.mark.parametrize("site", ["mount"], indirect=True)
async def test_a_final_push_the_nas_contradicts_waits_once_with_the_file_named(site: Site) -> None:
    holder: dict[str, Any] = {"mode": "stale_creation"}
    run = site.make_run(files=FILES)
    client = make_client(
        site.config(cleanup=cleanup(retain_cache=False)), hashsum_callable_factory=manifest_factory(holder)
    )
    holder["client"] = client
    await client.init()
    try:
        await synced(client, run)
        for _ in range(3):
            outcomes = [o for o in await client.cleanup_once() if o.action != "promoted"]
        job = await client.job(run)
        assert job.state.value == "cleanup_eligible"
        assert [o.action for o in outcomes] == ["waiting"]
        refusals = [e.detail for e in job.events if e.kind == "cleanup_refused"]
        assert refusals == [
            "waiting: final metadata push not verified: missing or different on the NAS: .exlab-wizard/creation.json"
        ]
        assert len(site.log_lines("cleanup_waiting")) == 1
        assert (run / METADATA_DIR / "creation.json").is_file()  # the local evidence stays
        holder["mode"] = "honest"
        outcomes = [o for o in await client.cleanup_once() if o.action != "promoted"]
        job = await client.job(run)
    finally:
        await client.close()
    assert [o.action for o in outcomes] == ["deleted"] and job.state.value == "cleaned"
    assert "final metadata push verified" in job.events[-1].detail
    assert not run.exists()


async def test_with_cleanup_disabled_verified_jobs_stay_verified(site: Site) -> None:
    run = site.make_run(files=FILES)
    client = make_client(site.config(cleanup=cleanup(retain_cache=True, enabled=False), sync={"scan_interval_s": 0.05}))
    await client.init()
    try:
        await synced(client, run)
        deadline = time.monotonic() + 30
        while not [e for e in (await client.job(run)).events if e.kind == "cleanup_refused"]:
            assert time.monotonic() < deadline, "the reaper never looked at the job"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # several more reaper passes
        job = await client.job(run)
    finally:
        await client.close()
    assert job.state.value == "verified", [e.detail for e in job.events]
    assert [e.detail for e in job.events if e.kind == "cleanup_refused"] == ["cleanup disabled"]
    assert all((run / rel).read_bytes() == data for rel, data in FILES.items())
