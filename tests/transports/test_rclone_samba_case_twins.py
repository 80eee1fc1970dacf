"""rclone's ``smb`` backend straight to a Samba NAS that folds letter case (found by review).

Samba (``case sensitive = auto``) opens ``a.tif`` for a NAS file ``A.tif``.
rclone compares names exactly: a late ``a.tif`` was "not found at
destination", and with ``--backup-dir`` rclone asked Samba for ``a.tif``, got
the folded ``A.tif``, moved it under ``previous/`` and uploaded ``a.tif``: the
NAS held only the late bytes, the job failed with a false reason after the
write, and after the documented rename for twins it failed ``remote_conflict``
for good. Now the push asks the backend's features first and refuses such a run
before the claim or any write (``remote_write_refused`` naming both), as the
mount transport does; a NAS copy of a cleaned ``A.tif`` against a new local
``a.tif`` is refused on any backend that answers for ``a.tif``.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import pytest

from exlab_wizard.config import parse_config
from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports.base import TransportError, TransportErrorKind
from exlab_wizard.sync.transports.rclone import RcloneTransport
from tests.fixtures.rclone_serve import S3Server
from tests.fixtures.samba_server import SambaServer
from tests.helpers import Clock
from tests.lab import EQ, Lab, retry_now, running, synced
from tests.transports.test_rclone import rclone_equipment

S = SyncJobState
K = TransportErrorKind
VERIFIED = b"verified frame, the only good copy"
LATE = b"another frame written late"
STAMP = "20260101T000000Z"


def _everything(folder: Path) -> list[bytes]:
    return [p.read_bytes() for p in folder.rglob("*") if p.is_file()]


def _config(lab: Lab, samba: SambaServer):
    data = lab.config_data(sync={"backoff_s": [0.01, 0.01], "scan_interval_s": 3600, "audit_interval_s": 6 * 3600})
    data["equipment"] = [{"id": EQ, "local_root": str(lab.local_root), "transport": samba.transport_data()}]
    return parse_config(data)


async def _settle(client) -> None:
    for _ in range(4):
        await client.wait_idle(timeout=120)
        await asyncio.sleep(0.1)


def _run_folder(local_root: Path, *files: tuple[str, bytes]) -> Path:
    run = local_root / EQ / "P" / "Runs" / "Run_1"
    for rel, data in files:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(data)
    return run


@pytest.mark.parametrize(
    ("first", "late"),
    [("A.tif", "a.tif"), ("Sub/A.tif", "sub/A.tif")],
    ids=["file", "folder"],
)
async def test_a_late_case_twin_never_lands_on_the_verified_smb_copy(
    tmp_path: Path, samba: SambaServer, first: str, late: str
) -> None:
    """Rule 2, through the whole client: the audit finds ``late`` added, the run is sent again."""
    lab = Lab.build(tmp_path, equipment=(EQ,))
    run = lab.make_run("Run_1", files={first: VERIFIED})
    clock = Clock()
    async with running(_config(lab, samba), clock) as client:
        await synced(client, run)
        remote_run = samba.root / run.relative_to(lab.local_root / EQ)
        nas_file = remote_run / first
        assert nas_file.read_bytes() == VERIFIED

        (run / late).parent.mkdir(parents=True, exist_ok=True)
        (run / late).write_bytes(LATE)
        clock.advance(7)
        await client.audit_once()  # the local check finds the late file: sent again
        await _settle(client)
        job = await client.job(run)
        kept = _everything(remote_run)
        assert VERIFIED in kept, (
            f"the verified NAS copy of {first} was replaced by the late {late}, nothing kept; "
            f"job {job.state.value} {job.error_kind}: {job.last_error}"
        )
        assert nas_file.is_file() and nas_file.read_bytes() == VERIFIED, (
            f"the verified NAS copy of {first} was replaced (its bytes only under previous/); "
            f"job {job.state.value} {job.error_kind}: {job.last_error}"
        )
        assert job.error_kind == "remote_write_refused", (job.state, job.error_kind, job.last_error)
        assert "rclone did not find" not in (job.last_error or "")


async def test_the_transport_refuses_a_late_case_twin_on_smb(tmp_path: Path, samba: SambaServer) -> None:
    """As mount does: ``remote_write_refused`` naming both, nothing written."""
    local_root = tmp_path / "lab"
    run = _run_folder(local_root, ("A.tif", VERIFIED))
    transport = RcloneTransport(samba.equipment(local_root))
    assert (await transport.push(run, bwlimit_kibps=None)).ok
    nas_run = samba.root / "P" / "Runs" / "Run_1"
    nas_file = nas_run / "A.tif"
    assert nas_file.read_bytes() == VERIFIED
    (run / "a.tif").write_bytes(LATE)
    with pytest.raises(TransportError) as refused:
        await transport.push(run, bwlimit_kibps=None, previous_stamp=STAMP)
    assert nas_file.is_file() and nas_file.read_bytes() == VERIFIED, sorted(
        str(p.relative_to(nas_run)) for p in nas_run.rglob("*")
    )
    assert refused.value.kind is K.REMOTE_WRITE_REFUSED
    assert "'A.tif'" in refused.value.message and "'a.tif'" in refused.value.message


@pytest.mark.parametrize("declared", [True, False], ids=["backend_says_it_folds", "remote_asked"])
async def test_a_new_twin_of_a_cleaned_file_is_refused_on_smb(
    tmp_path: Path, samba: SambaServer, declared: bool
) -> None:
    """The NAS ``A.tif`` is the only copy (cleaned here); a new local ``a.tif`` must not land on it.

    ``remote_asked``: as through a backend that does not say it folds (sftp to such a share).
    """
    local_root = tmp_path / "lab"
    run = _run_folder(local_root, ("A.tif", VERIFIED), ("b.tif", b"b"))
    transport = RcloneTransport(samba.equipment(local_root))
    assert (await transport.push(run, bwlimit_kibps=None)).ok
    os.unlink(run / "A.tif")
    (run / "a.tif").write_bytes(LATE)
    if not declared:
        transport._folds_case = transport._smb = False
    with pytest.raises(TransportError) as refused:
        await transport.push(run, bwlimit_kibps=None, cleaned=frozenset({"A.tif"}), previous_stamp=STAMP)
    assert refused.value.kind is K.REMOTE_WRITE_REFUSED, refused.value.message
    assert "'A.tif'" in refused.value.message and "'a.tif'" in refused.value.message
    nas_run = samba.root / "P" / "Runs" / "Run_1"
    assert sorted(p.name for p in nas_run.iterdir() if p.is_file()) == ["A.tif", "b.tif"]
    assert (nas_run / "A.tif").read_bytes() == VERIFIED


async def test_a_new_twin_of_a_cleaned_file_is_sent_where_case_counts(
    tmp_path: Path, s3_server: S3Server, s3_rclone_config
) -> None:
    """On a remote that tells case apart (S3) the same run is sent: the remote is asked for ``a.tif``."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    eq = rclone_equipment(tmp_path, "labs3", f"{s3_server.bucket}/{prefix}", s3_rclone_config())
    run = _run_folder(eq.local_root, ("A.tif", VERIFIED))
    transport = RcloneTransport(eq)
    assert (await transport.push(run, bwlimit_kibps=None)).ok
    os.unlink(run / "A.tif")
    (run / "a.tif").write_bytes(LATE)
    assert (await transport.push(run, bwlimit_kibps=None, cleaned=frozenset({"A.tif"}), previous_stamp=STAMP)).ok
    on_disk = s3_server.data_dir / s3_server.bucket / prefix / "P" / "Runs" / "Run_1"
    assert (on_disk / "A.tif").read_bytes() == VERIFIED
    assert (on_disk / "a.tif").read_bytes() == LATE


def test_a_fold_clash_is_a_run_path_the_remote_holds_under_another_spelling() -> None:
    from exlab_wizard.sync.transports.conflict import fold_clash

    assert fold_clash(["a.tif"], [], ["A.tif"]) == ("a.tif", "A.tif")
    assert fold_clash(["A.tif", "a.tif"], [], ["A.tif"]) == ("a.tif", "A.tif")
    assert fold_clash(["A.tif"], [], ["A.tif", "b.tif"]) is None
    assert fold_clash(["sub/A.tif"], ["sub"], ["Sub/A.tif"]) == ("sub", "Sub")
    assert fold_clash(["d/caf\u00e9.raw"], ["d"], ["d/cafe\u0301.raw"]) == ("d/caf\u00e9.raw", "d/cafe\u0301.raw")
    assert fold_clash(["x/a.tif"], ["x"], ["y/A.tif"]) is None


async def test_renamed_as_the_docs_say_the_run_syncs_again(tmp_path: Path, samba: SambaServer) -> None:
    """The way out documented for twins ("rename one and retry") works here too.

    The refused-too-late push used to leave the late bytes on the NAS as
    ``a.tif`` (the verified ``A.tif`` only under ``previous/``); after the
    rename that ``a.tif`` was "someone else's": FAILED ``remote_conflict`` on
    every retry.
    """
    lab = Lab.build(tmp_path, equipment=(EQ,))
    run = lab.make_run("Run_1", files={"A.tif": VERIFIED})
    clock = Clock()
    async with running(_config(lab, samba), clock) as client:
        await synced(client, run)
        (run / "a.tif").write_bytes(LATE)
        clock.advance(7)
        await client.audit_once()
        await _settle(client)
        os.rename(run / "a.tif", run / "b.tif")
        await retry_now(client, clock, run)
        await _settle(client)
        job = await client.job(run)
        remote_run = samba.root / run.relative_to(lab.local_root / EQ)
        assert job.state == S.VERIFIED, (job.state, job.error_kind, job.last_error)
        assert (remote_run / "A.tif").read_bytes() == VERIFIED
        assert (remote_run / "b.tif").read_bytes() == LATE
