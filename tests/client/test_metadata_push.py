"""The metadata push after VERIFIED (and the reaper's final one) sends ``.exlab-wizard/`` alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from exlab_wizard.sync.metadata_push import data_only, push_once
from exlab_wizard.sync.nas_client import SyncHandleState
from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports.base import (
    RemoteManifest,
    Transport,
    TransportCapabilities,
    TransportResult,
)
from exlab_wizard.sync.transports.mount import MountTransport
from tests.lab import Lab, make_client, synced

FILES = {"image_001.tif": b"\x01" * 5000, "sub/stack.raw": b"\x02" * 3000}


async def test_after_verified_only_the_metadata_folder_is_pushed(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_push, real_metadata = MountTransport.push, MountTransport.push_metadata

    async def push(self: MountTransport, run_path: Path, **kwargs: Any) -> TransportResult:
        calls.append("push")
        return await real_push(self, run_path, **kwargs)

    async def push_metadata(self: MountTransport, run_path: Path, **kwargs: Any) -> TransportResult:
        calls.append("push_metadata")
        result = await real_metadata(self, run_path, **kwargs)
        assert result.local_hashes is not None
        assert all(rel.startswith(".exlab-wizard/") for rel in result.local_hashes)
        return result

    monkeypatch.setattr(MountTransport, "push", push)
    monkeypatch.setattr(MountTransport, "push_metadata", push_metadata)
    run = lab.make_run(files=FILES)
    client = make_client(lab.config())
    await client.init()
    try:
        handle = await client.enqueue(run)
        assert handle.state == SyncHandleState.QUEUED, handle.blocking_findings
        await client.wait_idle(timeout=60)
        row = await client.job(run)
        assert row.state == SyncJobState.VERIFIED, row.last_error
    finally:
        await client.close()
    assert calls == ["push", "push_metadata"]
    nas = lab.nas_copy(run)
    for name in ("checksums.sha256", "creation.json"):
        assert (nas / ".exlab-wizard" / name).read_bytes() == (run / ".exlab-wizard" / name).read_bytes()


async def test_a_killed_manifest_writes_temp_file_never_reaches_the_nas(lab: Lab) -> None:
    """Found by the torture harness: a SIGKILL mid-write of checksums.sha256 left its temp, which a push sent."""
    run = lab.make_run(files=FILES)
    stale = run / ".exlab-wizard" / ".checksums.sha256.0123456789ab.tmp"
    stale.write_bytes(b"half a manifest: its writer was killed before the rename")
    client = make_client(lab.config())
    await client.init()
    try:
        await synced(client, run)  # enqueued, idle, VERIFIED
    finally:
        await client.close()
    nas = lab.nas_copy(run) / ".exlab-wizard"
    assert sorted(p.name for p in nas.iterdir() if p.name.endswith(".tmp")) == []
    assert not stale.exists()
    assert (nas / "checksums.sha256").read_bytes() == (run / ".exlab-wizard" / "checksums.sha256").read_bytes()


class _WholeRunOnly(Transport):
    """A transport with push() alone: the contract's default push_metadata sends the whole run."""

    capabilities = TransportCapabilities()

    def __init__(self, equipment: Any) -> None:
        super().__init__(equipment)
        self.pushes: list[dict[str, Any]] = []

    async def push(
        self,
        run_path: Path,
        *,
        bwlimit_kibps: int | None,
        rewrite: frozenset[str] = frozenset(),
        progress: Any = None,
        cleaned: frozenset[str] = frozenset(),
    ) -> TransportResult:
        self.pushes.append({"run": Path(run_path), "cleaned": cleaned})
        return TransportResult(ok=True)

    async def remote_manifest(self, run_path: Path) -> RemoteManifest:
        return RemoteManifest(hashes={})

    async def reachable(self, run_path: Path) -> bool:
        return True


async def test_a_transport_without_metadata_push_gets_the_whole_run_push_with_cleaned(lab: Lab) -> None:
    cfg = lab.config()
    equipment = cfg.equipment_by_id("CONFOCAL_01")
    run = lab.make_run(files=FILES)
    transport = _WholeRunOnly(equipment)
    assert (await transport.push_metadata(run, bwlimit_kibps=None)).ok  # the default: push() of the run
    assert transport.pushes == [{"run": run, "cleaned": frozenset()}]

    client = make_client(cfg)
    await client.init(run_workers=False)
    try:
        client._transports[equipment.id] = transport
        await client.enqueue(run)
        job = await client.job(run)
        transport.pushes.clear()
        assert await push_once(client._ctx, job, equipment)
        cleaned = frozenset({"image_001.tif"})
        assert await push_once(client._ctx, job, equipment, cleaned=cleaned)
        assert transport.pushes == [{"run": run, "cleaned": frozenset()}, {"run": run, "cleaned": cleaned}]
    finally:
        await client.close()


def test_data_only_keeps_a_file_named_like_the_metadata_folder():
    hashes = {".exlab-wizard": "a", ".exlab-wizard/creation.json": "b", ".Exlab-Wizard/x": "c", "d/e": "d"}
    assert data_only(hashes) == {".exlab-wizard": "a", ".Exlab-Wizard/x": "c", "d/e": "d"}
