"""The mount transport as a service account that does not own every file on the share.

The service rarely runs as root, and on NFS (root_squash, uid-mapped) or SMB
shares the account does not own every file it finds there. The mount guard
and the reaper's last look open files on the share (an open goes to the
server; a stat may be a cache's), but a permission refusal is no file gone:

* a marker the account may not read (``sudo touch`` under ``umask 077``, a
  root-owned 0600 file on a root_squash export) is there: the share is
  mounted, as ``exlab-sync doctor`` says, never "not mounted" for ever;
* one file in the NAS run folder the account may not read (a colleague's
  analysis output written with umask 077) is listed with the server's stat
  of it and does not fail the whole listing (the reaper would refuse the run
  for ever, although the file is not one it deletes).

Both run in a forked child that drops to uid/gid 65534 (the suite runs as
root, which no permission stops).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from exlab_wizard.config.models import EquipmentConfig
from exlab_wizard.sync import doctor
from exlab_wizard.sync.equipment_log import EquipmentLog
from exlab_wizard.sync.transports.mount import MountTransport

NOBODY = 65534


def _as_nobody(fn) -> dict:
    """Run ``fn()`` (returning a JSON-able value) in a forked child with uid/gid 65534."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                out = {"ok": fn()}
            except BaseException as exc:
                out = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(write, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(write)
    data = b""
    while chunk := os.read(read, 65536):
        data += chunk
    os.close(read)
    os.waitpid(pid, 0)
    return json.loads(data or b'{"error": "child wrote nothing"}')


@pytest.fixture
def place():
    if os.geteuid() != 0:
        pytest.fail("needs root to drop to another uid", pytrace=False)
    top = Path(tempfile.mkdtemp(prefix="exlab-share-permissions-"))
    top.chmod(0o755)
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _world(top: Path) -> tuple[EquipmentConfig, Path, Path]:
    local = top / "local"
    nas = top / "nas"
    run = local / "CONFOCAL_01" / "PROJ-0042" / "Runs" / "Run_1"
    run.mkdir(parents=True)
    (run / "a.raw").write_bytes(b"a" * 10)
    nas.mkdir()
    (nas / ".exlab-nas").write_text("mounted\n")
    remote = nas / "PROJ-0042" / "Runs" / "Run_1"
    remote.mkdir(parents=True)
    (remote / "a.raw").write_bytes(b"a" * 10)
    for folder in [local, *local.rglob("*"), nas, *nas.rglob("*")]:
        os.chown(folder, NOBODY, NOBODY)
    equipment = EquipmentConfig.model_validate(
        {
            "id": "CONFOCAL_01",
            "local_root": str(local),
            "transport": {"type": "mount", "mount_path": str(nas), "mount_marker": ".exlab-nas"},
        }
    )
    return equipment, run, remote


def test_a_marker_the_service_may_not_read_is_not_a_share_gone(place: Path) -> None:
    equipment, run, _ = _world(place)
    marker = place / "nas" / ".exlab-nas"
    os.chown(marker, 0, 0)
    marker.chmod(0o600)  # there, the share mounted; made by an admin whose umask is 077

    def look() -> dict:
        transport = MountTransport(equipment, log=EquipmentLog(equipment))
        checks = doctor._mount(equipment, equipment.transport)
        return {
            "mounted": transport._mounted(),
            "doctor": {c.name: [c.ok, c.detail] for c in checks if c.name == "mount_marker"},
        }

    seen = _as_nobody(look)
    assert "error" not in seen, seen
    said = seen["ok"]
    assert said["doctor"]["mount_marker"][0], said  # doctor: "present", the check passes
    assert said["mounted"], (
        "the marker is there (doctor says so) but cannot be opened by the service account: the transport "
        f"takes the share for unmounted, and every job of the equipment fails 'not mounted' for ever: {said}"
    )


def test_a_foreign_unreadable_file_in_the_nas_folder_does_not_block_the_listing(place: Path) -> None:
    equipment, run, remote = _world(place)
    theirs = remote / "analysis_by_colleague.xlsx"
    theirs.write_bytes(b"results")
    os.chown(theirs, 0, 0)
    theirs.chmod(0o600)

    def look() -> dict:
        transport = MountTransport(equipment, log=EquipmentLog(equipment))
        return {rel: [f.size] for rel, f in asyncio.run(transport.remote_stats(run)).items()}

    seen = _as_nobody(look)
    assert "error" not in seen, (
        "one file in the NAS run folder the service may not read (not one of the run's, never deleted) "
        f"fails the reaper's whole last look: the run is never cleaned: {seen}"
    )
    assert seen["ok"].get("a.raw") == [10], seen
