"""``remote_marker`` (rsync_ssh, rclone): the network transports' ``mount_marker``.

A ``remote_path`` that is the NAS data volume's own mount point exists, empty,
while the volume is not mounted. With ``remote_marker`` set, every look at the
NAS (reachable, push, metadata push, listing, manifest, fetch, keep previous)
needs ``<remote root>/<remote_marker>``: without it the NAS is unreachable
(``NETWORK``, "remote unreachable ... (no <marker>)"), never empty, and
nothing is written. The engine never creates the marker. Against the loopback
sshd: a read-write account, an rrsync account (no commands, rsync reads only)
and an sftp-only account; rclone's sftp backend.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from exlab_wizard.config.models import EquipmentConfig
from exlab_wizard.sync.equipment_log import EquipmentLog
from exlab_wizard.sync.transports.base import Transport, TransportError, TransportErrorKind
from exlab_wizard.sync.transports.rclone import RcloneTransport
from exlab_wizard.sync.transports.rsync_ssh import RsyncSshTransport
from tests.fixtures.sshd import SFTP_USER
from tests.lab import EQ, MARKER, make_hostile_run, rsync_equipment

pytestmark = pytest.mark.network
K = TransportErrorKind
FILES = {"a.txt": b"a" * 100, "sub/b.bin": b"b" * 300, ".exlab-wizard/creation.json": b"{}"}


def _rclone(tmp_path: Path, remote_dir: Path, conf: Path) -> EquipmentConfig:
    transport = {
        "type": "rclone",
        "rclone_remote": "labsftp",
        "rclone_remote_path": str(remote_dir),
        "rclone_config": str(conf),
        "remote_marker": MARKER,
    }
    return EquipmentConfig.model_validate({"id": EQ, "local_root": str(tmp_path / "lab"), "transport": transport})


async def _unreachable(call) -> str:
    with pytest.raises(TransportError) as caught:
        await call
    assert caught.value.kind == K.NETWORK, caught.value.message
    assert "remote unreachable" in caught.value.message and f"no {MARKER}" in caught.value.message
    return caught.value.message


def _nas_tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


async def _every_look_waits(transport: Transport, run: Path, remote_dir: Path) -> None:
    """The marker missing: unreachable everywhere, nothing written; the marker touched: all works again."""
    before = _nas_tree(remote_dir)
    assert not await transport.reachable(run)
    await _unreachable(transport.push(run, bwlimit_kibps=None))
    await _unreachable(transport.push_metadata(run))
    await _unreachable(transport.remote_listing(run))
    await _unreachable(transport.remote_stats(run))
    await _unreachable(transport.remote_manifest(run))
    await _unreachable(transport.fetch(run, ["a.txt"], run.parent))
    await _unreachable(transport.keep_previous(run, ["a.txt"], "20240501T000000Z"))
    assert _nas_tree(remote_dir) == before, "written into a NAS root without its marker"
    assert not (remote_dir / MARKER).exists()  # never created by the engine

    (remote_dir / MARKER).write_text("the NAS data volume is mounted\n")
    assert await transport.reachable(run)
    await transport.push(run, bwlimit_kibps=None)
    assert await transport.remote_listing(run) == {rel: len(data) for rel, data in FILES.items()}
    assert set((await transport.remote_manifest(run)).hashes) == set(FILES)

    os.unlink(remote_dir / MARKER)  # the volume went away after a verified copy: no listing, no manifest
    await _unreachable(transport.remote_stats(run))
    await _unreachable(transport.remote_manifest(run))
    assert not await transport.reachable(run)


async def test_rsync_ssh_needs_its_marker(tmp_path, sshd, remote_dir):
    eq = rsync_equipment(tmp_path, sshd, remote_dir, remote_marker=MARKER)
    run = make_hostile_run(eq.local_root, FILES, symlink=False)
    await _every_look_waits(RsyncSshTransport(eq, log=EquipmentLog(eq)), run, remote_dir)


async def test_rclone_needs_its_marker(tmp_path, sshd, remote_dir, rclone_sftp_config):
    eq = _rclone(tmp_path, remote_dir, rclone_sftp_config(sshd))
    run = make_hostile_run(eq.local_root, FILES, symlink=False)
    await _every_look_waits(RcloneTransport(eq, log=EquipmentLog(eq)), run, remote_dir)


async def test_rrsync_and_sftp_only_accounts_check_the_marker_too(tmp_path, sshd, remote_dir):
    eq = rsync_equipment(tmp_path, sshd, remote_dir, remote_marker=MARKER)
    run = make_hostile_run(eq.local_root, FILES, symlink=False)
    (remote_dir / MARKER).write_text("mounted\n")
    await RsyncSshTransport(eq).push(run, bwlimit_kibps=None)
    os.unlink(remote_dir / MARKER)

    rrsync = rsync_equipment(tmp_path, sshd, remote_dir, key=sshd.env.rrsync_key, remote_marker=MARKER)
    sftp_only = rsync_equipment(tmp_path, sshd, remote_dir, user=SFTP_USER, remote_marker=MARKER)
    for restricted in (rrsync, sftp_only):
        transport = RsyncSshTransport(restricted, log=EquipmentLog(restricted))
        await _unreachable(transport.remote_listing(run))
        await _unreachable(transport.remote_manifest(run))
    assert not await RsyncSshTransport(rrsync).reachable(run)

    (remote_dir / MARKER).write_text("mounted\n")
    expected = {rel: len(data) for rel, data in FILES.items()}
    for restricted in (rrsync, sftp_only):
        transport = RsyncSshTransport(restricted, log=EquipmentLog(restricted))
        assert await transport.remote_listing(run) == expected
        assert set((await transport.remote_manifest(run)).hashes) == set(FILES)
    assert await RsyncSshTransport(rrsync).reachable(run)


def test_the_marker_is_a_plain_name(tmp_path):
    for bad in ("", "a/b", ".", ".."):
        with pytest.raises(ValueError, match="plain file name"):
            EquipmentConfig.model_validate(
                {
                    "id": EQ,
                    "local_root": str(tmp_path),
                    "transport": {"type": "rclone", "rclone_remote": "x", "remote_marker": bad},
                }
            )
