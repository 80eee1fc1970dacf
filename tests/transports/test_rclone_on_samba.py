"""The whole flow, cleanup on, with rclone's own ``smb`` backend straight to a real Samba server.

Samba keeps Samba's defaults (``case sensitive = auto``: lookups ignore letter
case). Regression checks from a review that passed as they were: the audit
reads the server's bytes (no SHA-256 on smb: hashed by download), a server
down or killed at each step deletes nothing, an emptied NAS folder is never a
copy, and someone else's file under a name that folds to the run's is a
``remote_conflict``. ``tests/fixtures/samba_server.py`` runs the server.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from exlab_wizard.config import parse_config
from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports.base import TransportError, TransportErrorKind
from exlab_wizard.sync.transports.rclone import RcloneTransport
from tests.fixtures.samba_server import ROOT, SambaServer
from tests.helpers import Clock
from tests.lab import EQ, FILES, Lab, acts, data_intact, ready_run, rewrite_in_place, running, synced

S = SyncJobState
CLEANUP = {"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": True}
SYNC = {"backoff_s": [0.01, 0.01], "audit_interval_s": 6 * 3600, "scan_interval_s": 3600}


def _config(lab: Lab, samba: SambaServer, **cleanup):
    data = lab.config_data(sync=SYNC)
    data["equipment"] = [{"id": EQ, "local_root": str(lab.local_root), "transport": samba.transport_data()}]
    data["nas_cleanup"] = {**CLEANUP, **cleanup}
    return parse_config(data)


def _remote_run(lab: Lab, samba: SambaServer, run: Path) -> Path:
    return samba.root / run.relative_to(lab.local_root / EQ)


def _on_the_server(lab: Lab, samba: SambaServer, run: Path, files: dict[str, bytes] = FILES) -> Path:
    """The run's folder on the server's disk, after asserting it holds ``files``, byte for byte."""
    remote = _remote_run(lab, samba, run)
    for rel, data in files.items():
        assert (remote / rel).read_bytes() == data
    return remote


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return Lab.build(tmp_path, equipment=(EQ,))


async def test_a_run_on_rclone_smb_is_verified_audited_and_cleaned(lab: Lab, samba: SambaServer) -> None:
    async with ready_run(lab, _config(lab, samba), name="Run_1") as (client, _clock, run):
        outcomes = acts(await client.cleanup_once())
        job = await client.job(run)
    assert [o.action for o in outcomes] == ["deleted"], [(o.action, o.reason) for o in outcomes]
    assert job.state == S.CLEANED
    _on_the_server(lab, samba, run)
    assert not any((run / rel).exists() for rel in FILES)


async def test_the_audit_reads_what_the_smb_server_holds(lab: Lab, samba: SambaServer) -> None:
    """No SHA-256 on smb: hashed by download, from the server (a same-size, same-mtime rot is found)."""
    run = lab.make_run("Run_1", files=FILES)
    clock = Clock()
    async with running(_config(lab, samba), clock) as client:
        await synced(client, run)
        nas_file = _remote_run(lab, samba, run) / "image_001.tif"
        rewrite_in_place(nas_file, b"Z" * nas_file.stat().st_size)
        clock.advance(7)
        await client.audit_once()
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert job.verify_passes in (0, 1)
        assert nas_file.read_bytes() == FILES["image_001.tif"], (job.state, job.last_error)
        assert job.state == S.VERIFIED, (job.state, job.last_error)


async def test_server_down_at_the_reapers_last_look_deletes_nothing(lab: Lab, samba: SambaServer) -> None:
    async with ready_run(lab, _config(lab, samba), name="Run_1") as (client, _clock, run):
        samba.stop()
        try:
            outcomes = acts(await client.cleanup_once())
        finally:
            samba.start()
        job = await client.job(run)
        assert data_intact(run), [(o.action, o.reason) for o in outcomes]
        assert job.state in (S.VERIFIED, S.CLEANUP_ELIGIBLE), job.state
        outcomes = acts(await client.cleanup_once())
        assert [o.action for o in outcomes] == ["deleted"], [(o.action, o.reason) for o in outcomes]


async def test_the_nas_run_folder_emptied_is_never_taken_for_a_copy(lab: Lab, samba: SambaServer) -> None:
    async with ready_run(lab, _config(lab, samba), name="Run_1") as (client, _clock, run):
        remote = _remote_run(lab, samba, run)
        for rel in FILES:
            (remote / rel).unlink()
        outcomes = acts(await client.cleanup_once())
        assert data_intact(run), [(o.action, o.reason) for o in outcomes]


async def test_server_killed_mid_push_then_back(lab: Lab, samba: SambaServer, monkeypatch) -> None:
    import threading

    from exlab_wizard.sync.transports import rclone as rclone_mod
    from tests.lab import act_once_in, retry_now

    monkeypatch.setattr(rclone_mod.RcloneTransport, "_bwlimit_args", lambda self, kibps: ["--bwlimit", "4M"])
    files = {**FILES, "big.bin": os.urandom(24 << 20)}
    run = lab.make_run("Run_1", files=files)
    timers: list[threading.Timer] = []

    def later_stop() -> None:
        timers.append(threading.Timer(1.5, samba.stop))
        timers[-1].start()

    fired = act_once_in(monkeypatch, rclone_mod, "run_tool", lambda *a, **kw: kw.get("step") == "push", later_stop)
    clock = Clock()
    async with running(_config(lab, samba), clock) as client:
        await client.enqueue(run)
        await client.wait_idle(timeout=120)
        timers[-1].join()
        job = await client.job(run)
        assert fired and job.state != S.VERIFIED, job.state
        assert job.error_kind == "network", (job.state, job.error_kind, job.last_error)
        assert data_intact(run, files)
        samba.start()
        job = await retry_now(client, clock, run)
        await client.wait_idle(timeout=120)
        job = await client.job(run)
        assert job.state == S.VERIFIED, (job.state, job.error_kind, job.last_error)
    remote = _on_the_server(lab, samba, run, files)
    assert not [p for p in remote.rglob("*.partial")]


async def test_server_killed_before_the_final_push_of_a_cleanup(lab: Lab, samba: SambaServer, monkeypatch) -> None:
    from exlab_wizard.sync.transports import rclone as rclone_mod
    from tests.lab import act_once_in

    async with ready_run(lab, _config(lab, samba, retain_cache=False), name="Run_1") as (client, _clock, run):
        fired = act_once_in(monkeypatch, rclone_mod.RcloneTransport, "push_metadata", lambda *a, **kw: True, samba.stop)
        outcomes = acts(await client.cleanup_once())
        assert fired
        job = await client.job(run)
        assert job.state == S.CLEANUP_ELIGIBLE, (job.state, [(o.action, o.reason) for o in outcomes])
        samba.start()
        outcomes = acts(await client.cleanup_once())
        job = await client.job(run)
        assert job.state == S.CLEANED, (job.state, [(o.action, o.reason) for o in outcomes])
    remote = _on_the_server(lab, samba, run)
    assert (remote / ".exlab-wizard" / "checksums.sha256").is_file()
    assert "local_cleaned" in (remote / ".exlab-wizard" / "creation.json").read_text()


def test_rclone_smb_backend_reaches_samba_and_it_folds_case(samba: SambaServer, tmp_path: Path) -> None:
    (samba.root / "A.tif").write_bytes(b"frame")
    listed = samba.rclone_run("lsjson", f"nas:nas/{ROOT}")
    assert listed.returncode == 0, listed.stderr
    assert '"A.tif"' in listed.stdout
    got = tmp_path / "got"
    copied = samba.rclone_run("copyto", f"nas:nas/{ROOT}/a.tif", str(got))  # another case: the same file
    assert copied.returncode == 0 and got.read_bytes() == b"frame", copied.stderr
    feats = samba.rclone_run("backend", "features", "nas:")
    assert '"sha256"' not in feats.stdout.lower().split('"hashes"')[1].split("]")[0]


K = TransportErrorKind
THEIRS = b"someone else's bytes"


@pytest.mark.parametrize(
    ("nas_rel", "run_rel", "file_rel"),
    [
        ("P/Runs/Run_1/DATA.bin", "P/Runs/Run_1", "data.bin"),
        ("P/Runs/Run_1/SUB/x.bin", "P/Runs/Run_1", "sub/x.bin"),
        ("P/Runs/RUN_1/data.bin", "P/Runs/Run_1", "data.bin"),
        ("p/runs/run_1/data.bin", "P/Runs/Run_1", "data.bin"),
    ],
)
async def test_a_foreign_file_whose_name_folds_to_the_runs_is_a_conflict(
    tmp_path: Path, samba: SambaServer, nas_rel: str, run_rel: str, file_rel: str
) -> None:
    theirs = samba.root / nas_rel
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(THEIRS)
    local_root = tmp_path / "lab"
    run = local_root / EQ / run_rel
    (run / file_rel).parent.mkdir(parents=True, exist_ok=True)
    (run / file_rel).write_bytes(b"our run's bytes, another size")
    transport = RcloneTransport(samba.equipment(local_root))
    with pytest.raises(TransportError) as caught:
        await transport.push(run, bwlimit_kibps=None, fresh=True, owner="0" * 32)
    assert caught.value.kind is K.REMOTE_CONFLICT, caught.value.message
    assert theirs.read_bytes() == THEIRS
    assert [p.name for p in theirs.parent.iterdir()] == [theirs.name]
