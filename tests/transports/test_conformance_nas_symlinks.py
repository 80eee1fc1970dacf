"""A symlink on the NAS is never a verified file of the run, and never hides a conflict.

On every transport that can hold symlinks (mount, rsync_ssh, rclone over
sftp): a verified file of the run replaced on the NAS by a symlink to another
run's file with the same bytes must not count as verified (the manifest does
not report it hashed), and a push must neither write through the symlink into
the other run's file nor pass it off as the run's own file.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil

import pytest

from exlab_wizard.sync.transports.base import TransportError, TransportErrorKind
from tests.fixtures.sshd import RW_USER
from tests.transports.test_conformance import _FACTORIES, local_root, make_run  # noqa: F401

K = TransportErrorKind
LINKING = ["mount", "rsync_ssh", "rclone_sftp"]
FILES = {"a.raw": b"verified bytes " * 100, "sub/b.txt": b"b"}


@pytest.fixture(params=LINKING)
def remote(request, tmp_path):
    return _FACTORIES[request.param](request, tmp_path)


def _link_to_other_run(remote, rel: str, data: bytes):
    """``rel`` on the NAS becomes a symlink to another run's file holding ``data``."""
    other = remote.run_on_disk.parent / "Other_Run" / "theirs.raw"
    other.parent.mkdir(parents=True, exist_ok=True)
    other.write_bytes(data)
    shutil.chown(other.parent, RW_USER, RW_USER)
    shutil.chown(other, RW_USER, RW_USER)
    target = remote.run_on_disk / rel
    target.unlink()
    target.symlink_to(other)
    os.lchown(target, pwd.getpwnam(RW_USER).pw_uid, pwd.getpwnam(RW_USER).pw_gid)
    remote.settle()
    return other


async def _push_refused_or_symlink_replaced(remote, eq, run, rewrite) -> None:
    """Either the push refuses the folder (REMOTE_CONFLICT) or the symlink is replaced by the run's own file."""
    try:
        await remote.transport(eq).push(run, bwlimit_kibps=None, rewrite=rewrite)
    except TransportError as exc:
        assert exc.kind == K.REMOTE_CONFLICT, exc.message
        assert os.path.islink(remote.run_on_disk / "a.raw")
        return
    on_nas = remote.run_on_disk / "a.raw"
    assert not os.path.islink(on_nas) and on_nas.read_bytes() == (run / "a.raw").read_bytes()


async def test_a_symlink_on_the_nas_is_not_a_verified_file(remote, local_root):
    eq = remote.equipment(local_root)
    run = make_run(eq.local_root, FILES, symlink=False)
    transport = remote.transport(eq)
    await transport.push(run, bwlimit_kibps=None)
    _link_to_other_run(remote, "a.raw", FILES["a.raw"])

    manifest = await remote.transport(eq).remote_manifest(run)
    assert manifest.hashes.get("a.raw") != hashlib.sha256(FILES["a.raw"]).hexdigest(), manifest
    assert "a.raw" not in (await remote.transport(eq).remote_listing(run))


async def test_a_push_never_writes_through_a_symlink_on_the_nas(remote, local_root):
    eq = remote.equipment(local_root)
    run = make_run(eq.local_root, FILES, symlink=False)
    await remote.transport(eq).push(run, bwlimit_kibps=None)
    other = _link_to_other_run(remote, "a.raw", b"their different bytes")  # another size too

    await _push_refused_or_symlink_replaced(remote, eq, run, frozenset())
    assert other.read_bytes() == b"their different bytes"


async def test_a_rewrite_never_writes_through_a_symlink_on_the_nas(remote, local_root):
    eq = remote.equipment(local_root)
    run = make_run(eq.local_root, FILES, symlink=False)
    await remote.transport(eq).push(run, bwlimit_kibps=None)
    other = _link_to_other_run(remote, "a.raw", FILES["a.raw"])  # same bytes, so same size

    os.truncate(run / "a.raw", 10)  # the local copy differs: a rewrite would write it
    await _push_refused_or_symlink_replaced(remote, eq, run, frozenset({"a.raw"}))
    assert other.read_bytes() == FILES["a.raw"]
