"""The whole flow with cleanup on a real Samba share mounted with smbnetfs (FUSE).

The lab's NAS (``tmp_path/nas``) is the Samba share ``nas`` (its folder on the
server's disk: ``tmp_path/smb/server``), seen through smbnetfs and bind-mounted
there; the marker lies on the server (:mod:`tests.fixtures.smb_share`).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports.base import PREVIOUS_DIR
from exlab_wizard.sync.transports.mount import MountTransport
from tests.fixtures.smb_share import SmbShare
from tests.helpers import Clock
from tests.lab import (
    EQ,
    FILES,
    Lab,
    act_once_in,
    acts,
    cleanup_config,
    data_intact,
    flip_before_read_back,
    held_files,
    nothing_deleted,
    ready_run,
    retry_now,
    running,
    synced,
)

S = SyncJobState


@pytest.fixture
def share(tmp_path: Path) -> Iterator[tuple[Lab, SmbShare]]:
    lab = Lab.build(tmp_path, equipment=(EQ,), nas_per_equipment=False, marker=None)
    smb = SmbShare(tmp_path / "smb", lab.nas)
    (smb.server_dir / ".exlab-nas").write_text("mounted\n")
    try:
        smb.mount()
        assert (lab.nas / ".exlab-nas").is_file()
        yield lab, smb
    finally:
        smb.close()


def _wait_readable(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            path.read_bytes()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _on_server(lab: Lab, smb: SmbShare, run: Path) -> Path:
    return lab.server_copy(run, smb.server_dir)


async def _late_file_after_verification(client, clock: Clock, run: Path, name: str, data: bytes) -> None:
    """The run synced and verified, then ``name`` written into it: the next audit (6 h on) and what it sends."""
    await synced(client, run)
    (run / name).write_bytes(data)
    clock.advance(6)
    await client.audit_once()
    await client.wait_idle(timeout=90)


async def test_the_whole_flow_with_cleanup_on_smb(share) -> None:
    lab, smb = share
    async with ready_run(lab) as (client, _clock, run):
        outcomes = acts(await client.cleanup_once())
        assert [o.action for o in outcomes] == ["deleted"], outcomes
        assert (await client.job(run)).state == S.CLEANED
    assert not any((run / rel).exists() for rel in FILES)
    assert held_files(_on_server(lab, smb, run)) == FILES


async def test_the_whole_flow_without_retained_cache_on_smb(share) -> None:
    lab, smb = share
    async with ready_run(lab, cleanup_config(lab, retain_cache=False)) as (client, _clock, run):
        acts(await client.cleanup_once())
        job = await client.job(run)
        assert job.state == S.CLEANED, (job.state, job.last_error)
    assert not run.exists()
    assert held_files(_on_server(lab, smb, run)) == FILES


async def test_the_read_back_is_the_server_s_bytes(share, monkeypatch: pytest.MonkeyPatch) -> None:
    """A byte flipped on the server's disk after the write, size and mtime kept: the verification sees it."""
    lab, smb = share
    clock = Clock()
    run = lab.make_run(files=FILES)
    nas = _on_server(lab, smb, run)
    fired = flip_before_read_back(monkeypatch, nas)
    async with running(cleanup_config(lab), clock) as client:
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
    assert fired
    mismatches = [e for e in job.events if "mismatch" in (e.detail or "") or e.kind == "hash_mismatch"]
    assert mismatches, [(e.kind, e.detail) for e in job.events]
    assert held_files(nas) == FILES


async def test_the_last_look_sees_the_run_folder_deleted_on_the_server(share) -> None:
    lab, smb = share
    async with ready_run(lab) as (client, _clock, run):
        [dry] = await client.cleanup_once(dry_run=True)
        assert dry.action == "would_delete", dry
        shutil.rmtree(_on_server(lab, smb, run))  # gone on the server, behind the mount
        outcomes = acts(await client.cleanup_once())
    nothing_deleted(run, outcomes)  # rule 1


async def test_a_file_emptied_on_the_server_is_seen_by_the_last_look(share) -> None:
    """One NAS file truncated and its mtime put back on the server a moment before the pass."""
    lab, smb = share
    async with ready_run(lab) as (client, _clock, run):
        [dry] = await client.cleanup_once(dry_run=True)
        assert dry.action == "would_delete", dry
        target = _on_server(lab, smb, run) / "image_001.tif"
        info = target.stat()
        target.write_bytes(b"")
        os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
        outcomes = acts(await client.cleanup_once())
    nothing_deleted(run, outcomes)  # rule 1


async def test_the_server_stopped_before_the_pass_is_never_an_empty_nas(share) -> None:
    lab, smb = share
    async with ready_run(lab) as (client, _clock, run):
        smb.stop_server()
        await client.audit_once()
        outcomes = acts(await client.cleanup_once())
        job = await client.job(run)
    nothing_deleted(run, outcomes, job.state, job.last_error)  # rules 1 and 3


@pytest.mark.parametrize("step", ["_opened_stat", "delete_batch"])
async def test_the_server_stopped_mid_cleanup(share, monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    """The server goes while the reaper takes its last look (or right before its deletion): nothing lost."""
    from exlab_wizard.sync.transports import mount as mount_module

    lab, smb = share
    async with ready_run(lab) as (client, _clock, run):
        if step == "_opened_stat":
            fired = act_once_in(monkeypatch, mount_module, "_opened_stat", lambda *a, **k: True, smb.stop_server)
        else:
            from exlab_wizard.sync.reaper import deletion

            fired = act_once_in(monkeypatch, deletion, "delete_batch", lambda *a, **k: True, smb.stop_server)
        outcomes = acts(await client.cleanup_once())
        job = await client.job(run)
    assert fired
    gone = [rel for rel in FILES if not (run / rel).exists()]
    server = held_files(_on_server(lab, smb, run))
    # rule 1: whatever went locally is on the server, verified bytes
    assert all(server.get(rel) == FILES[rel] for rel in gone), (gone, outcomes, job.state)


@pytest.mark.parametrize("step", ["_rename", "_read_back", "_sync_dir"])
async def test_the_server_stopped_mid_push_then_back(share, monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    lab, smb = share
    clock = Clock()
    run = lab.make_run(files=FILES)
    fired = act_once_in(monkeypatch, MountTransport, step, lambda *a, **k: True, smb.stop_server)
    async with running(cleanup_config(lab), clock) as client:
        await client.enqueue(run)
        await client.wait_idle(timeout=90)
        job = await client.job(run)
        assert fired
        assert job.state != S.VERIFIED, job.state  # rule 3: not verified against a server gone
        smb.start_server()
        _wait_readable(lab.nas / ".exlab-nas")  # smbnetfs's negative cache (3 s) forgets the failures
        job = await retry_now(client, clock, run)
    assert job.state == S.VERIFIED, (job.state, job.last_error)
    assert held_files(_on_server(lab, smb, run)) == FILES
    assert data_intact(run)


async def test_a_late_file_the_share_stores_under_a_verified_file_s_name(share) -> None:
    """A verified run holding ``x``; a late ``x?`` (smbnetfs cuts a name at ``?``: the NAS file ``x``) is
    written after verification. The verified NAS copy of ``x`` must survive (rule 2)."""
    lab, smb = share
    clock = Clock()
    files = {**FILES, "x": b"verified frame"}
    run = lab.make_run(files=files)
    async with running(cleanup_config(lab), clock) as client:
        await _late_file_after_verification(client, clock, run, "x?", b"late frame, another")
        job = await retry_now(client, clock, run)
    nas = _on_server(lab, smb, run)
    kept = [p.read_bytes() for p in nas.rglob("*") if p.is_file()]
    assert [e for e in job.events if e.kind == "gate_hold"], job.events  # the gate holds the late "x?"
    assert b"verified frame" in kept, (
        job.state,
        job.last_error,
        sorted(str(p.relative_to(nas)) for p in nas.rglob("*")),
    )


async def test_a_late_file_re_pushes_only_itself(share) -> None:
    """The times the push sets stay on the share: a verified run's re-push sends the late file alone and
    keeps nothing under previous/ (Samba stamped every file's write time at close, so every file looked
    changed and the whole run moved to previous/<stamp>/)."""
    lab, smb = share
    clock = Clock()
    run = lab.make_run(files=FILES)
    async with running(cleanup_config(lab), clock) as client:
        await _late_file_after_verification(client, clock, run, "late.tif", b"late frame")
        job = await client.job(run)
    assert job.state == S.VERIFIED, (job.state, job.last_error)
    nas = _on_server(lab, smb, run)
    assert (nas / "late.tif").read_bytes() == b"late frame"
    kept = nas / PREVIOUS_DIR
    assert not kept.exists() or not [p for p in kept.rglob("*") if p.is_file()], sorted(kept.rglob("*"))
