"""Names Samba cannot show as they are, through rclone's ``smb`` backend (found by review).

rclone's smb encoding stores ``:*?"<>|\\`` and trailing dots/spaces as look-alikes
and lists them back: those verify. Windows device names (``CON``, ``aux.txt``,
``LPT1.raw``) Samba stores as they are but lists under a mangled 8.3 name
(``AHY9U3~9.TXT``): the run's file was "missing" on the NAS and a stranger
"there", and the re-send called the run's own file foreign (``remote_conflict``
for good). Such a run is now refused before any write, naming the file.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from exlab_wizard.config import parse_config
from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports.base import TransportError, TransportErrorKind
from exlab_wizard.sync.transports.rclone import RcloneTransport
from tests.fixtures.samba_server import EQ as SAMBA_EQ
from tests.fixtures.samba_server import SambaServer
from tests.helpers import Clock
from tests.lab import EQ, FILES, Lab, running

S = SyncJobState


def _override(rule: str, n: int) -> dict:
    return {
        "id": f"0b6f9c1e-2c7a-4a64-9a57-6d0f2e6f1a0{n}",
        "problem_class": rule,
        "operator": "asmith",
        "recorded_at": "2026-01-01T00:00:00Z",
        "expires_at": None,
        "reason": "the instrument names its files so",
        "revoked": False,
    }


OVERRIDES = [_override("illegal_filesystem_character", 1), _override("reserved_filesystem_name", 2)]


def _config(lab: Lab, samba: SambaServer):
    data = lab.config_data(sync={"backoff_s": [0.01, 0.01], "scan_interval_s": 3600, "audit_interval_s": 6 * 3600})
    data["equipment"] = [{"id": EQ, "local_root": str(lab.local_root), "transport": samba.transport_data()}]
    return parse_config(data)


async def test_names_smb_cannot_store_verify_through_rclones_encoding(tmp_path: Path, samba: SambaServer) -> None:
    lab = Lab.build(tmp_path, equipment=(EQ,))
    files = {
        **FILES,
        "a:b.tif": b"colon",
        'q"x': b"q",
        "x*": b"star",
        "trail.": b"dot",
        "trail ": b"space",
        "back\\slash": b"bs",
        "dir./f.bin": b"f",
    }
    run = lab.make_run("Run_1", files=files, overrides=OVERRIDES)
    async with running(_config(lab, samba), Clock()) as client:
        handle = await client.enqueue(run)
        assert not handle.blocking_findings
        await client.wait_idle(timeout=120)
        job = await client.job(run)
    assert job.state == S.VERIFIED, (job.state, job.error_kind, job.last_error)


async def test_a_windows_device_name_in_a_run_on_rclone_smb(tmp_path: Path, samba: SambaServer) -> None:
    """An operator overrode ``reserved_filesystem_name`` ("the instrument names its port AUX"): the run syncs.

    Samba stores ``aux.txt`` but lists it as ``AHY9U3~9.TXT``: the verify pass
    finds ``aux.txt`` missing and a stranger there, the re-send then calls the
    run's own file someone else's data: FAILED ``remote_conflict`` for good.
    Either it verifies or it is refused before any write, naming the file.
    """
    lab = Lab.build(tmp_path, equipment=(EQ,))
    run = lab.make_run("Run_1", files={**FILES, "aux.txt": b"instrument aux channel\n"}, overrides=OVERRIDES)
    async with running(_config(lab, samba), Clock()) as client:
        handle = await client.enqueue(run)
        assert not handle.blocking_findings
        for _ in range(5):
            await client.wait_idle(timeout=120)
            await asyncio.sleep(0.2)
        job = await client.job(run)
    refused_clearly = job.error_kind == "remote_write_refused" and "aux.txt" in (job.last_error or "")
    assert job.state == S.VERIFIED or refused_clearly, (job.state, job.error_kind, job.last_error)


@pytest.mark.parametrize("name", ["aux.txt", "CON", "LPT1.raw", "com3/x.bin", "nul.tar.gz"])
async def test_a_windows_device_name_is_refused_before_any_write(tmp_path: Path, samba: SambaServer, name: str) -> None:
    local_root = tmp_path / "lab"
    run = local_root / SAMBA_EQ / "P" / "Runs" / "Run_1"
    (run / name).parent.mkdir(parents=True)
    (run / name).write_bytes(b"instrument aux channel\n")
    (run / "frame.tif").write_bytes(b"frame")
    with pytest.raises(TransportError) as refused:
        await RcloneTransport(samba.equipment(local_root)).push(run, bwlimit_kibps=None)
    assert refused.value.kind is TransportErrorKind.REMOTE_WRITE_REFUSED
    named = name.split("/")[0]  # a folder so named is named itself
    assert repr(named) in refused.value.message and "rename it" in refused.value.message
    assert list(samba.root.iterdir()) == []
