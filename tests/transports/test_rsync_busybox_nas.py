"""rsync_ssh against a NAS whose userland is BusyBox (QNAP, older Synology DSM, appliances).

No python3, no openssl, a sha256sum without ``-z``: the run is still hashed on
the NAS (``sha256sum`` of each file on stdin), after a flush there; a NAS with
no working hash tool at all is flushed over ssh before it is read back; a NAS
without ``sync`` verifies nothing. docs/transports.md, "Durable on the NAS
before it is verified". Needs the Debian package ``busybox``. About 15 s.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from exlab_wizard.sync.transports import rsync_ssh
from exlab_wizard.sync.transports.base import TransportError, TransportErrorKind
from exlab_wizard.sync.transports.rsync_ssh import SYNC_THEN_STREAM, RsyncSshTransport
from tests.fixtures.busybox_nas import busybox_nas
from tests.lab import HOSTILE, RUN_REL
from tests.lab import make_hostile_run as make_run
from tests.lab import rsync_equipment as equipment

pytestmark = pytest.mark.network

FILES = {"image_001.tif": os.urandom(3000), "sub/stack.raw": os.urandom(5000), "notes.txt": b"acquired ok\n"}
HASHES = {rel: hashlib.sha256(data).hexdigest() for rel, data in FILES.items()}
KEEP = ["plain.txt", "back\\slash.txt", "new\nline.txt", "sub dir/nested $(x)/deep file.bin", "-leading-dash.txt"]


def fresh(transport: RsyncSshTransport) -> RsyncSshTransport:
    rsync_ssh._HOST_TOOLS.pop(transport._host_key(), None)  # probe this test's own server
    return transport


async def test_a_busybox_nas_hashes_on_the_nas_after_a_flush(tmp_path, ssh_env, remote_dir):
    """It runs commands: its run is flushed there before the hashes that make it VERIFIED."""
    with busybox_nas(ssh_env, tmp_path / "sshd") as nas:
        eq = equipment(tmp_path, nas.server, remote_dir)
        run = make_run(eq.local_root, FILES, symlink=False)
        transport = fresh(RsyncSshTransport(eq))
        await transport.push(run, bwlimit_kibps=None)
        assert await transport.hash_tool(run) == "sha256sum-stdin"
        before = len(nas.syncs())
        manifest = await transport.remote_manifest(run)
        assert manifest.hashes == HASHES
        assert len(nas.syncs()) > before, f"hashed with no flush on the NAS: syncs seen {nas.syncs()}"
        assert await transport.keep_previous(run, ["notes.txt"], "20261205T073000Z") == ["notes.txt"]


async def test_a_nas_with_no_hash_tool_is_flushed_before_it_is_read_back(tmp_path, ssh_env, remote_dir):
    with busybox_nas(ssh_env, tmp_path / "sshd", drop=("sha256sum",)) as nas:
        eq = equipment(tmp_path, nas.server, remote_dir)
        run = make_run(eq.local_root, FILES, symlink=False)
        transport = fresh(RsyncSshTransport(eq))
        await transport.push(run, bwlimit_kibps=None)
        assert await transport.hash_tool(run) == SYNC_THEN_STREAM
        before = len(nas.syncs())
        manifest = await transport.remote_manifest(run)
        assert manifest.hashes == HASHES
        assert len(nas.syncs()) > before, f"read back with no flush on the NAS: syncs seen {nas.syncs()}"


async def test_the_probe_never_picks_a_tool_that_does_not_hash(tmp_path, ssh_env, remote_dir):
    """An ``openssl`` that answers with a wrong digest is passed over for BusyBox's sha256sum."""
    with busybox_nas(ssh_env, tmp_path / "sshd") as nas:
        fake = nas.bin / "openssl"
        fake.write_text(f"#!{nas.bin}/sh\ncat >/dev/null\necho '{'0' * 64} *stdin'\n")
        fake.chmod(0o755)
        transport = fresh(RsyncSshTransport(equipment(tmp_path, nas.server, remote_dir)))
        assert await transport.hash_tool() == "sha256sum-stdin"
        rsync_ssh._HOST_TOOLS.pop(transport._host_key(), None)
        fake.write_text(f'#!{nas.bin}/sh\nexec /usr/bin/openssl "$@"\n')  # the same name, now a real openssl
        assert await transport.hash_tool() == "openssl"


@pytest.mark.parametrize("drop", [(), ("sha256sum",)], ids=["openssl", "no hash tool"])
async def test_a_nas_without_sync_verifies_nothing_and_says_so(tmp_path, ssh_env, remote_dir, drop):
    extra = {} if drop else {"openssl": "/usr/bin/openssl"}
    with busybox_nas(ssh_env, tmp_path / "sshd", extra=extra, drop=("sync", *drop)) as nas:
        eq = equipment(tmp_path, nas.server, remote_dir)
        run = make_run(eq.local_root, FILES, symlink=False)
        transport = fresh(RsyncSshTransport(eq))
        await transport.push(run, bwlimit_kibps=None)
        assert await transport.hash_tool(run) == ("openssl" if extra else SYNC_THEN_STREAM)
        with pytest.raises(TransportError) as caught:
            await transport.remote_manifest(run)
        assert caught.value.kind == TransportErrorKind.REMOTE_WRITE_REFUSED
        assert "sync not found or failed" in caught.value.message
        with pytest.raises(TransportError) as kept:
            await transport.keep_previous(run, ["notes.txt"], "20261205T073000Z")
        assert "sync not found or failed" in kept.value.message


@pytest.mark.parametrize("tools", ["busybox only", "openssl", "python3"])
async def test_hostile_names_hash_and_keep_on_busybox(tmp_path, ssh_env, remote_dir, tools):
    extra = {} if tools == "busybox only" else {tools: f"/usr/bin/{tools}"}
    with busybox_nas(ssh_env, tmp_path / "sshd", extra=extra) as nas:
        eq = equipment(tmp_path, nas.server, remote_dir)
        run = make_run(eq.local_root)
        transport = fresh(RsyncSshTransport(eq))
        await transport.push(run, bwlimit_kibps=None)
        assert await transport.hash_tool(run) == {"busybox only": "sha256sum-stdin", "openssl": "openssl"}.get(
            tools, "python3-openssl"
        )
        manifest = await transport.remote_manifest(run)
        assert manifest.hashes == {k: hashlib.sha256(v).hexdigest() for k, v in HOSTILE.items()}
        assert await transport.keep_previous(run, KEEP, "20261205T073000Z", new=True) == sorted(KEEP)
        kept = remote_dir / RUN_REL / ".exlab-wizard/previous/20261205T073000Z"
        assert {k: (kept / k).read_bytes() for k in KEEP} == {k: HOSTILE[k] for k in KEEP}
        with pytest.raises(rsync_ssh.PreviousStampTaken):
            await transport.keep_previous(run, ["with space.dat"], "20261205T073000Z", new=True)


async def test_banner_on_stdout_is_a_clear_failure(tmp_path, ssh_env, remote_dir):
    with busybox_nas(
        ssh_env, tmp_path / "sshd", banner="Welcome  to  DSM 7.2", extra={"python3": "/usr/bin/python3"}
    ) as nas:
        eq = equipment(tmp_path, nas.server, remote_dir)
        run = make_run(eq.local_root, {"a.txt": b"a"}, symlink=False)
        transport = fresh(RsyncSshTransport(eq))
        with pytest.raises(TransportError) as caught:
            await transport.push(run, bwlimit_kibps=None)
        assert caught.value.kind == TransportErrorKind.AUTH and "shell clean" in caught.value.message
        (remote_dir / RUN_REL).mkdir(parents=True)
        (remote_dir / RUN_REL / "a.txt").write_bytes(b"a")
        manifest = await transport.remote_manifest(run)
        assert "a.txt" not in manifest.hashes  # the banner glued to the first record: never a verified hash
