"""rsync_ssh hashes large files on the remote while the push still runs; the verify pass reuses
those hashes only for files whose remote inode is unchanged since they were read."""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
from pathlib import Path

import pytest

from exlab_wizard.sync.transports import rsync_ssh
from exlab_wizard.sync.transports.rsync_ssh import HASH_WHILE_SENDING_MIN_BYTES, RsyncSshTransport
from tests.lab import RUN_REL
from tests.lab import make_hostile_run as make_run
from tests.lab import rsync_equipment as equipment

pytestmark = pytest.mark.network

BIG = HASH_WHILE_SENDING_MIN_BYTES + 12345
FILES = {
    "big one.bin": os.urandom(BIG),
    "sub/big x'; touch PWNED; '.bin": os.urandom(BIG),
    "new\nline big.bin": os.urandom(BIG),
    "small.txt": b"small",
    ".exlab-wizard/creation.json": b'{"schema_version": "1.0", "level": "run"}\n',
}
BIG_NAMES = {name for name, data in FILES.items() if len(data) >= HASH_WHILE_SENDING_MIN_BYTES}
#: slow enough (about 1 s for FILES) that the remote watcher is up before the push ends
SLOW_KIBPS = 3000


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def records(raw: bytes) -> dict[str, str]:
    out = {}
    for rec in raw.split(b"\0"):
        if rec:
            out[os.fsdecode(rec[66:].partition(b"  ")[2])] = rec[:64].decode()
    return out


async def test_large_files_are_hashed_while_sending_and_the_manifest_is_exact(tmp_path, sshd, remote_dir):
    eq = equipment(tmp_path, sshd, remote_dir)
    run = make_run(eq.local_root, FILES, symlink=False)
    transport = RsyncSshTransport(eq)
    assert (await transport.push(run, bwlimit_kibps=SLOW_KIBPS)).ok

    sent = records(transport._sent_hashes[str(run)])
    assert set(sent) <= BIG_NAMES and sent  # small files are left to the verify pass
    assert all(sent[name] == sha(FILES[name]) for name in sent)

    manifest = await transport.remote_manifest(run)
    assert manifest.hashes == {name: sha(data) for name, data in FILES.items()}
    assert str(run) not in transport._sent_hashes  # used once
    assert not (remote_dir / RUN_REL / "PWNED").exists() and not Path("PWNED").exists()

    again = await transport.push(run, bwlimit_kibps=None)  # nothing large to send: no watcher
    assert again.ok and str(run) not in transport._sent_hashes


async def test_a_file_changed_after_it_was_hashed_is_hashed_again(tmp_path, sshd, remote_dir):
    """Same size, same mtime, other bytes on the remote: the stale hash must not be reused."""
    eq = equipment(tmp_path, sshd, remote_dir)
    run = make_run(eq.local_root, FILES, symlink=False)
    transport = RsyncSshTransport(eq)
    await transport.push(run, bwlimit_kibps=SLOW_KIBPS)
    assert "big one.bin" in records(transport._sent_hashes[str(run)])

    target = remote_dir / RUN_REL / "big one.bin"
    before = target.stat()
    with open(target, "r+b") as handle:  # in place: same inode, same size
        handle.seek(100)
        handle.write(b"\xff" * 8)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime put back; ctime cannot be
    damaged = target.read_bytes()
    assert damaged != FILES["big one.bin"]

    manifest = await transport.remote_manifest(run)
    assert manifest.hashes["big one.bin"] == sha(damaged)
    assert manifest.hashes["sub/big x'; touch PWNED; '.bin"] == sha(FILES["sub/big x'; touch PWNED; '.bin"])


async def test_forged_records_cannot_vouch_for_a_file(tmp_path, sshd, remote_dir):
    """A record whose inode identity does not match the file is ignored, whatever hash it claims."""
    eq = equipment(tmp_path, sshd, remote_dir)
    run = make_run(eq.local_root, {"a.bin": os.urandom(BIG)}, symlink=False)
    transport = RsyncSshTransport(eq)
    await transport.push(run, bwlimit_kibps=None)
    transport._sent_hashes[str(run)] = b"0" * 64 + b"  1:2:3:4:5  a.bin\0"
    manifest = await transport.remote_manifest(run)
    assert manifest.hashes == {"a.bin": sha((run / "a.bin").read_bytes())}


async def test_hosts_without_python_hash_after_the_push_as_before(tmp_path, sshd, remote_dir, monkeypatch):
    eq = equipment(tmp_path, sshd, remote_dir)
    run = make_run(eq.local_root, FILES, symlink=False)
    transport = RsyncSshTransport(eq)
    monkeypatch.setitem(rsync_ssh._HOST_TOOLS, transport._host_key(), "sha256sum")
    await transport.push(run, bwlimit_kibps=None)
    assert str(run) not in transport._sent_hashes
    manifest = await transport.remote_manifest(run)
    assert manifest.hashes == {name: sha(data) for name, data in FILES.items()}


def test_aes_gcm_goes_first_only_in_ssh_own_default_list(tmp_path, monkeypatch):
    from exlab_wizard.sync.transports.rsync_ssh import preferred_ciphers

    ssh = shutil.which("ssh")
    assert ssh is not None
    monkeypatch.setattr(rsync_ssh, "_cpu_has_aes", lambda: True)
    chosen = preferred_ciphers([ssh, "-F", os.devnull, "-p", "2222"], "user@nas.example.org")
    assert chosen is not None and chosen.split(",")[:2] == ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"]
    assert "chacha20-poly1305@openssh.com" in chosen.split(",")  # nothing dropped: any server still connects

    pinned = tmp_path / "ssh_config"
    pinned.write_text("Host *\n    Ciphers chacha20-poly1305@openssh.com\n")
    assert preferred_ciphers([ssh, "-F", str(pinned)], "user@nas.example.org") is None  # the lab's choice stands

    monkeypatch.setattr(rsync_ssh, "_cpu_has_aes", lambda: False)
    assert preferred_ciphers([ssh, "-F", os.devnull], "user@nas.example.org") is None


@pytest.mark.parametrize("limit", [None, 50_000])
async def test_a_large_push_at_full_speed_has_the_nas_flush_while_it_runs(
    tmp_path, sshd, remote_dir, monkeypatch, limit
):
    """The watcher is started with a flush interval for a push of at least FLUSH_WHILE_SENDING_MIN_BYTES
    at full speed (the verify pass's own flush then finds little left), never under a bandwidth limit
    (the kernel's writeback keeps up); the run verifies exactly either way."""
    monkeypatch.setattr(rsync_ssh, "FLUSH_WHILE_SENDING_MIN_BYTES", BIG)
    started: list[list[str]] = []
    real_start = rsync_ssh._RemoteWatcher.start

    async def start(self, argv: list[str], header: bytes) -> None:
        started.append(argv)
        await real_start(self, argv, header)

    monkeypatch.setattr(rsync_ssh._RemoteWatcher, "start", start)
    eq = equipment(tmp_path, sshd, remote_dir)
    small = {f"f{i}.dat": os.urandom(BIG // 8) for i in range(10)}  # no file large enough to hash while sending
    run = make_run(eq.local_root, small, symlink=False)
    transport = RsyncSshTransport(eq)
    assert (await transport.push(run, bwlimit_kibps=limit)).ok
    line = rsync_ssh._line_text(f"{shlex.quote(str(remote_dir / RUN_REL))} {rsync_ssh.FLUSH_WHILE_SENDING_S}")
    if limit is None:
        assert len(started) == 1 and started[0][-1].endswith(f"{line}'"), started
    else:
        assert started == []  # nothing to hash while sending, nothing to flush
    assert str(run) not in transport._sent_hashes  # it hashed nothing
    manifest = await transport.remote_manifest(run)
    assert manifest.hashes == {name: sha(data) for name, data in small.items()}
