"""A run sent again never carries a local file damaged with its stat kept over its verified NAS copy (rule 2).

Local damage the engine cannot see (bit rot keeps size, mtime, ctime and
inode) must not reach the NAS when the run goes around again (an edit
elsewhere, an audit, a retry): rsync's quick check and the mount transport
compare sizes and mtimes, and rclone, which compares content on a first push
(``--checksum``), does so too for a run verified before (its
``checksums.sha256`` here or on the NAS). The NAS copy keeps the verified
bytes; the next audit finds the local damage instead.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from exlab_wizard.sync.manifest_format import manifest_path
from exlab_wizard.sync.transports.rclone import RcloneTransport
from exlab_wizard.sync.transports.rsync_ssh import RsyncSshTransport
from tests.lab import RUN_REL, rsync_equipment
from tests.lab import make_hostile_run as make_run
from tests.transports.test_rclone import rclone_equipment

pytestmark = pytest.mark.network


def _damage_keeping_size_and_mtime(path):
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF  # one flipped byte
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


async def _repush_after_local_damage(transport, run, remote_run, *, manifest_here: bool):
    await transport.push(run, bwlimit_kibps=None)
    good = (remote_run / "a.bin").read_bytes()
    assert good == (run / "a.bin").read_bytes()
    # What the verification leaves behind: the run's manifest (here, and pushed to the NAS).
    manifest_path(run).parent.mkdir(exist_ok=True)
    manifest_path(run).write_text("verified\n")
    await transport.push_metadata(run)
    if not manifest_here:
        manifest_path(run).unlink()  # the NAS copy of it alone says the run was verified
    _damage_keeping_size_and_mtime(run / "a.bin")
    (run / "added.txt").write_bytes(b"a new file: the run goes around again\n")
    # As the job runner calls it for a job verified with that manifest:
    await transport.push(run, bwlimit_kibps=None, own_manifests=[hashlib.sha256(b"verified\n").hexdigest()])
    assert (remote_run / "added.txt").exists()  # the push did run
    return good, (remote_run / "a.bin").read_bytes()


async def test_rsync_keeps_the_verified_nas_copy(tmp_path, sshd, remote_dir):
    eq = rsync_equipment(tmp_path, sshd, remote_dir)
    run = make_run(eq.local_root, {"a.bin": os.urandom(5000)}, symlink=False)
    good, now = await _repush_after_local_damage(RsyncSshTransport(eq), run, remote_dir / RUN_REL, manifest_here=True)
    assert now == good


@pytest.mark.parametrize("manifest_here", [True, False], ids=["manifest here", "manifest on the NAS only"])
async def test_rclone_keeps_the_verified_nas_copy(tmp_path, sshd, remote_dir, rclone_sftp_config, manifest_here):
    eq = rclone_equipment(tmp_path, "labsftp", str(remote_dir), rclone_sftp_config(sshd))
    run = make_run(eq.local_root, {"a.bin": os.urandom(5000)}, symlink=False)
    good, now = await _repush_after_local_damage(
        RcloneTransport(eq), run, remote_dir / RUN_REL, manifest_here=manifest_here
    )
    assert now == good, "the verified NAS copy was overwritten with the locally damaged bytes"


async def test_rclone_first_push_still_compares_content(tmp_path, sshd, remote_dir, rclone_sftp_config):
    """With no verification behind it, a NAS file of the right size and mtime but other bytes is sent again."""
    eq = rclone_equipment(tmp_path, "labsftp", str(remote_dir), rclone_sftp_config(sshd))
    run = make_run(eq.local_root, {"a.bin": os.urandom(5000)}, symlink=False)
    transport = RcloneTransport(eq)
    await transport.push(run, bwlimit_kibps=None)
    nas = remote_dir / RUN_REL / "a.bin"
    _damage_keeping_size_and_mtime(nas)
    await transport.push(run, bwlimit_kibps=None)
    assert nas.read_bytes() == (run / "a.bin").read_bytes()
