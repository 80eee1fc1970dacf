"""The mount transport on a real sshfs share (FUSE over the loopback sshd): what the server says, not sshfs's cache.

sshfs answers a stat of a path from its own cache for up to 20 s
(``cache_timeout``), ``statx`` with ``AT_STATX_FORCE_SYNC`` by path
included; an open goes to the server. So:

* an ENOENT creating a plain name (``image_001.tif``) in a run folder removed
  on the server while the push has it open is a folder gone (``network``,
  retried: the folder is made again), never "a name the share cannot store"
  (failed for good) because sshfs's cached stat of the folder says it is
  there;
* a file or marker the sftp login may not open is there, and its stat right
  after the refused open is the server's (sshfs drops the name from its
  cache), so a marker removed on the server is seen gone at once and a file
  grown on the server is listed with its new size.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from exlab_wizard.config.models import EquipmentConfig
from exlab_wizard.sync.equipment_log import EquipmentLog
from exlab_wizard.sync.transports import TransportErrorKind
from exlab_wizard.sync.transports.mount import MountTransport
from tests.fixtures.fuse_shares import sshfs_lab
from tests.lab import Lab

pytestmark = pytest.mark.network


@pytest.fixture
def share(tmp_path: Path, sshd_factory, remote_dir: Path) -> Iterator[tuple[Lab, MountTransport]]:
    """A one-equipment lab whose NAS is ``remote_dir`` on the sshd, mounted with sshfs (login ``exlabt_rw``)."""
    with sshfs_lab(tmp_path, sshd_factory(), remote_dir) as (lab, _mount):
        equipment = EquipmentConfig.model_validate(lab.equipment_data())
        yield lab, MountTransport(equipment, log=EquipmentLog(equipment))


def _not_the_login_s(path: Path) -> None:
    """``path`` on the server: root's, 0600 (the sftp login may not open it)."""
    os.chown(path, 0, 0)
    path.chmod(0o600)


def test_a_run_folder_removed_on_the_server_is_not_a_name_the_share_cannot_store(share, remote_dir: Path) -> None:
    lab, transport = share
    folder = lab.nas / "PROJ" / "Runs" / "Run_1"
    folder.mkdir(parents=True)  # through the mount, as a push makes it
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.stat(folder)  # looked at through the mount: in sshfs's cache now
        shutil.rmtree(remote_dir / "PROJ" / "Runs" / "Run_1")  # removed on the server meanwhile
        with pytest.raises(OSError) as made:
            os.close(os.open("image_001.tif", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=fd))
        assert made.value.errno == errno.ENOENT
        error = transport._create_error(made.value, str(folder / "image_001.tif"), dir_fd=fd)
    finally:
        os.close(fd)
    assert error.kind != TransportErrorKind.REMOTE_WRITE_REFUSED, (
        f"a run folder removed on the NAS is read as a name the share cannot store (failed for good, never "
        f"retried): {error.message}"
    )
    assert error.kind is TransportErrorKind.NETWORK, error


def test_a_marker_the_login_may_not_open_is_there_until_removed_on_the_server(share, remote_dir: Path) -> None:
    lab, transport = share
    marker = remote_dir / ".exlab-nas"
    _not_the_login_s(marker)
    with pytest.raises(PermissionError):
        open(lab.nas / ".exlab-nas", "rb").close()  # refused by the server
    assert transport._mounted()  # rule 3 the other way: a marker there is a share mounted
    os.stat(lab.nas / ".exlab-nas")  # looked at through the mount: in sshfs's cache now
    marker.unlink()  # the share is not the NAS any more
    assert not transport._mounted()


def test_a_file_the_login_may_not_open_is_listed_as_the_server_has_it(share, remote_dir: Path) -> None:
    lab, transport = share
    run = lab.make_run(files={"a.raw": b"a" * 10})
    nas = remote_dir / lab.nas_copy(run).relative_to(lab.nas)
    nas.mkdir(parents=True)
    (nas / "a.raw").write_bytes(b"a" * 10)
    theirs = nas / "analysis_by_colleague.xlsx"
    theirs.write_bytes(b"results")
    _not_the_login_s(theirs)
    first = asyncio.run(transport.remote_stats(run))
    assert {rel: f.size for rel, f in first.items()} == {"a.raw": 10, "analysis_by_colleague.xlsx": 7}
    with open(theirs, "ab") as grown:  # on the server, a moment after the look through the mount
        grown.write(b" and more")
    (nas / "a.raw").unlink()
    second = asyncio.run(transport.remote_stats(run))
    assert {rel: f.size for rel, f in second.items()} == {"analysis_by_colleague.xlsx": 16}
    theirs.unlink()
    assert asyncio.run(transport.remote_stats(run)) == {}
