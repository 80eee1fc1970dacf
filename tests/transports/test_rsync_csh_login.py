"""rsync_ssh on a NAS account whose login shell is csh/tcsh (FreeBSD, TrueNAS CORE accounts).

sshd runs every command as ``$SHELL -c <command>``; csh refuses a newline inside
quotes and runs the lines after it as csh commands. Every remote program goes
as one line (``rsync_ssh.remote_line``) that csh, sh, bash and BusyBox ash all
pass on to sh unchanged. Needs the Debian packages ``busybox`` and ``tcsh``. About 5 s.
"""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from exlab_wizard.sync.transports import rsync_ssh
from exlab_wizard.sync.transports.rsync_ssh import RsyncSshTransport, remote_line
from tests.fixtures.busybox_nas import busybox_nas
from tests.helpers import require_tool
from tests.lab import RUN_REL
from tests.lab import make_hostile_run as make_run
from tests.lab import rsync_equipment as equipment

FILES = {
    "image_001.tif": os.urandom(3000),
    "big.raw": os.urandom((1 << 20) + 7),  # hashed while it is sent (remote_watch.py)
    "new\nline.txt": b"n",
    "bang!it's $HOME `x` \\ %s.txt": b"csh history, quotes, printf format",
    "données µm.csv": "✓".encode(),
}
HASHES = {rel: hashlib.sha256(data).hexdigest() for rel, data in FILES.items()}
KEEP = ["new\nline.txt", "bang!it's $HOME `x` \\ %s.txt", "données µm.csv"]


@pytest.mark.parametrize("shell", ["tcsh", "dash", "bash", "busybox"])
def test_remote_line_runs_any_text_unchanged_under_every_login_shell(shell):
    argv = [require_tool(shell), *(["sh"] if shell == "busybox" else []), "-c"]
    every_byte = bytes(range(1, 256))
    text = os.fsdecode(every_byte)
    command = f"printf '%s' {rsync_ssh.shlex.quote(text)}; printf '\\n%s' \"$#\"; exit 7"
    line = remote_line(command)
    assert "\n" not in line and line.isascii()
    done = subprocess.run([*argv, line], capture_output=True, timeout=30, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (7, every_byte + b"\n0", b"")


@pytest.mark.network
async def test_remote_programs_run_under_a_csh_login_shell(tmp_path, ssh_env, remote_dir):
    shell = require_tool("tcsh")
    with busybox_nas(ssh_env, tmp_path / "sshd", shell=shell, extra={"python3": "/usr/bin/python3"}) as nas:
        eq = equipment(tmp_path, nas.server, remote_dir)
        run = make_run(eq.local_root, FILES, symlink=False)
        transport = RsyncSshTransport(eq)
        rsync_ssh._HOST_TOOLS.pop(transport._host_key(), None)
        await transport.push(run, bwlimit_kibps=None)  # rsync works through csh
        assert await transport.hash_tool(run) == "python3-openssl"
        (remote_dir / RUN_REL / "big.raw").unlink()
        # slow enough (about 1 s) that the remote watcher is up before big.raw lands
        await transport.push(run, bwlimit_kibps=1000)
        assert transport._sent_hashes.get(str(run)), "remote_watch.py did not run under csh"
        manifest = await transport.remote_manifest(run)
        assert manifest.hashes == HASHES
        assert await transport.keep_previous(run, KEEP, "20261205T073000Z", new=True) == sorted(KEEP, key=os.fsencode)
        kept = remote_dir / RUN_REL / ".exlab-wizard/previous/20261205T073000Z"
        assert {k: (kept / k).read_bytes() for k in KEEP} == {k: FILES[k] for k in KEEP}


@pytest.mark.network
async def test_a_busybox_nas_with_a_csh_login_hashes_there(tmp_path, ssh_env, remote_dir):
    with busybox_nas(ssh_env, tmp_path / "sshd", shell=require_tool("tcsh")) as nas:
        eq = equipment(tmp_path, nas.server, remote_dir)
        run = make_run(eq.local_root, FILES, symlink=False)
        transport = RsyncSshTransport(eq)
        rsync_ssh._HOST_TOOLS.pop(transport._host_key(), None)
        await transport.push(run, bwlimit_kibps=None)
        assert await transport.hash_tool(run) == "sha256sum-stdin"
        before = len(nas.syncs())
        assert (await transport.remote_manifest(run)).hashes == HASHES
        assert len(nas.syncs()) > before
