"""The rsync_ssh transport against a real sshd on 127.0.0.1.

Every failure here is the real one: a key the server does not know, a server
that is down or killed mid-transfer, a folder the login user cannot write, a
file deleted while rsync runs. Someone else's files in the run folder
(``remote_conflict``) are tested for every transport in test_conformance.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from exlab_wizard.sync import verifier
from exlab_wizard.sync.equipment_log import EquipmentLog, log_path_for
from exlab_wizard.sync.transports import _process, rsync_ssh
from exlab_wizard.sync.transports._process import local_tree
from exlab_wizard.sync.transports.base import TransportError, TransportErrorKind
from exlab_wizard.sync.transports.rsync_ssh import PARTIAL_DIR, RsyncSshTransport
from tests.fixtures.sshd import RW_USER, SFTP_USER
from tests.helpers import assert_sha256sum_check, data_only, sha256_tree, tree, wait_until
from tests.lab import HOSTILE, RUN_REL
from tests.lab import make_hostile_run as make_run
from tests.lab import rsync_equipment as equipment

pytestmark = pytest.mark.network
K = TransportErrorKind


def leftovers(root: Path) -> list[str]:
    found = []
    for folder, dirs, files in os.walk(root):
        found += [os.path.join(folder, d) for d in dirs if d == PARTIAL_DIR]
        found += [os.path.join(folder, f) for f in files if f.startswith(".") and f[-7:-6] == "."]
    return found


def receiving(remote_run: Path, name: str) -> bool:
    """rsync is writing ``name`` (its temporary ``.name.XXXXXX``, partial file, or the file in place has bytes)."""
    if not remote_run.exists():
        return False
    for folder, _dirs, files in os.walk(remote_run):
        for f in files:
            in_place = Path(folder) == remote_run and f == name  # a fresh run folder is written in place
            if in_place or f.startswith(f".{name}.") or (Path(folder).name == PARTIAL_DIR and f == name):
                try:
                    if os.path.getsize(os.path.join(folder, f)) > 0:
                        return True
                except FileNotFoundError:
                    pass
    return False


# --------------------------------------------------------------- end to end


class _Progress:
    """A progress callback that records the totals it is told."""

    def __init__(self, totals: list[int]):
        self.totals = totals

    def __call__(self, delta: int) -> None:
        pass

    def set_total(self, total: int) -> None:
        self.totals.append(total)


async def test_hostile_names_end_to_end(tmp_path, sshd, remote_dir):
    eq = equipment(tmp_path, sshd, remote_dir)
    run = make_run(eq.local_root)
    transport = RsyncSshTransport(eq)
    assert transport.capabilities.hashes_while_sending and transport.capabilities.reports_total

    totals: list[int] = []
    progress = _Progress(totals)
    result = await transport.push(run, bwlimit_kibps=None, progress=progress)
    assert result.ok and result.files_sent == len(HOSTILE)
    assert result.bytes_sent == sum(len(v) for v in HOSTILE.values())
    # The local manifest comes from the push's own listing: every data file, hashed here.
    assert result.local_hashes == {
        k: hashlib.sha256(v).hexdigest() for k, v in HOSTILE.items() if not k.startswith(".exlab-wizard/")
    }
    assert totals == [sum(len(v) for v in HOSTILE.values())]

    remote_run = remote_dir / RUN_REL
    assert transport.remote_run_path(run) == f"{remote_dir}/{RUN_REL.as_posix()}"
    assert tree(remote_run) == HOSTILE  # byte-identical, symlinks not copied
    assert not leftovers(remote_dir)
    assert_sha256sum_check(remote_run, run)

    manifest = await transport.remote_manifest(run)
    assert manifest.hashes == {k: hashlib.sha256(v).hexdigest() for k, v in HOSTILE.items()}
    assert manifest.unverifiable == {}

    again = await transport.push(run, bwlimit_kibps=None)  # idempotent: nothing to send
    assert again.ok and again.files_sent == 0
    log = (eq.equipment_root / ".exlab-wizard").glob("wizard.*.log")
    text = "".join(p.read_text() for p in log)
    assert "tool_start" in text and "push_done" in text and "remote_manifest" in text


@pytest.mark.parametrize("tool", ["python3-openssl", "openssl", "sha256sum"])
async def test_every_remote_hash_tool_survives_hostile_names(tmp_path, sshd, remote_dir, tool, monkeypatch):
    eq = equipment(tmp_path, sshd, remote_dir)
    run = make_run(eq.local_root)
    transport = RsyncSshTransport(eq)
    await transport.push(run, bwlimit_kibps=None)
    monkeypatch.setitem(rsync_ssh._HOST_TOOLS, transport._host_key(), tool)
    manifest = await transport.remote_manifest(run)
    assert manifest.hashes == {k: hashlib.sha256(v).hexdigest() for k, v in HOSTILE.items()}


async def test_probe_picks_openssl_backed_python(tmp_path, sshd, remote_dir):
    transport = RsyncSshTransport(equipment(tmp_path, sshd, remote_dir))
    rsync_ssh._HOST_TOOLS.pop(transport._host_key(), None)
    assert await transport.hash_tool() == "python3-openssl"


async def test_shell_injection_in_names_and_remote_path(tmp_path, sshd, remote_dir):
    remote_root = remote_dir / "lab share $(touch PWNED)" / "it's `touch PWNED` here"
    remote_root.mkdir(parents=True)
    shutil.chown(remote_root, RW_USER, RW_USER)
    shutil.chown(remote_root.parent, RW_USER, RW_USER)
    eq = equipment(tmp_path, sshd, remote_root)
    files = {"x'; touch PWNED; '": b"a", "$(touch PWNED)": b"b", "ok.txt": b"c"}
    run = make_run(eq.local_root, files, symlink=False)
    transport = RsyncSshTransport(eq)
    cwd_before = set(os.listdir("."))

    await transport.push(run, bwlimit_kibps=None)
    manifest = await transport.remote_manifest(run)
    assert await transport.reachable(run)

    assert tree(remote_root / RUN_REL) == files
    assert set(manifest.hashes) == set(files)
    everything = [p for where in (remote_dir, sshd.env.homes[RW_USER], tmp_path) for p in where.rglob("*")]
    assert not [p for p in everything if p.name == "PWNED"]
    assert set(os.listdir(".")) == cwd_before


async def test_rewrite_resends_a_damaged_file_with_same_size_and_mtime(tmp_path, sshd, remote_dir):
    eq = equipment(tmp_path, sshd, remote_dir)
    run = make_run(eq.local_root, {"a.bin": os.urandom(5000), "b.txt": b"b"}, symlink=False)
    transport = RsyncSshTransport(eq)
    await transport.push(run, bwlimit_kibps=None)
    damaged = remote_dir / RUN_REL / "a.bin"
    stat = damaged.stat()
    damaged.write_bytes(b"\0" * stat.st_size)
    os.utime(damaged, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    await transport.push(run, bwlimit_kibps=None)  # quick check: same size and mtime, not sent
    assert damaged.read_bytes() == b"\0" * 5000
    result = await transport.push(run, bwlimit_kibps=None, rewrite=frozenset({"a.bin"}))
    assert damaged.read_bytes() == (run / "a.bin").read_bytes()
    assert result.files_sent == 1

    with pytest.raises(TransportError) as caught:
        await transport.push(run, bwlimit_kibps=None, rewrite=frozenset({"gone.bin"}))
    assert caught.value.kind == K.LOCAL_FILE_VANISHED


async def test_follows_the_schedule_by_restarting_at_the_window_edge(tmp_path, sshd, remote_dir):
    # Working hours end one second into the transfer: the limit is lifted then.
    bandwidth = {"upload_mbps": 1.6, "schedule": [{"days": ["mon"], "from": "08:00", "to": "18:00"}]}
    eq = equipment(tmp_path, sshd, remote_dir, bandwidth=bandwidth)
    payload = os.urandom(1_000_000)
    run = make_run(eq.local_root, {"big.bin": payload, "small.txt": b"s"}, symlink=False)
    start = time.monotonic()
    monday_evening = dt.datetime(2024, 1, 8, 17, 59, 59).astimezone()  # 2024-01-08 was a Monday

    def clock() -> dt.datetime:
        return monday_evening + dt.timedelta(seconds=time.monotonic() - start)

    transport = RsyncSshTransport(eq, now=clock)
    result = await transport.push(run, bwlimit_kibps=195)
    elapsed = time.monotonic() - start
    assert result.ok
    assert (remote_dir / RUN_REL / "big.bin").read_bytes() == payload
    assert elapsed < 3.5, f"limit not lifted at the edge ({elapsed:.1f}s; 1 MB at 195 KiB/s takes 5s)"
    log = "".join(p.read_text() for p in (eq.equipment_root / ".exlab-wizard").glob("wizard.*.log"))
    assert "bandwidth_window_edge" in log and "new_kibps=unlimited" in log
    starts = [line for line in log.splitlines() if "tool_start" in line and "step=push" in line]
    assert "--bwlimit=195" in starts[0] and "--bwlimit" not in starts[-1]
    assert not leftovers(remote_dir)


# ------------------------------------------------------------- error classes


async def test_key_not_in_authorized_keys_is_auth(tmp_path, sshd, remote_dir):
    eq = equipment(tmp_path, sshd, remote_dir, key=sshd.env.stranger_key)
    run = make_run(eq.local_root, {"a.txt": b"a"}, symlink=False)
    transport = RsyncSshTransport(eq)
    with pytest.raises(TransportError) as caught:
        await transport.push(run, bwlimit_kibps=None)
    assert caught.value.kind == K.AUTH
    assert "Permission denied (publickey" in caught.value.message
    with pytest.raises(TransportError) as caught:
        await transport.remote_manifest(run)
    assert caught.value.kind == K.AUTH
    assert not await transport.reachable(run)
    assert list(remote_dir.iterdir()) == []


async def test_changed_host_key_is_auth(tmp_path, sshd, remote_dir):
    eq = equipment(tmp_path, sshd, remote_dir, known_hosts=sshd.wrong_known_hosts)
    run = make_run(eq.local_root, {"a.txt": b"a"}, symlink=False)
    with pytest.raises(TransportError) as caught:
        await RsyncSshTransport(eq).push(run, bwlimit_kibps=None)
    assert caught.value.kind == K.AUTH
    assert list(remote_dir.iterdir()) == []


async def test_server_down_is_network(tmp_path, sshd_factory, remote_dir):
    server = sshd_factory()
    eq = equipment(tmp_path, server, remote_dir)
    run = make_run(eq.local_root, {"a.txt": b"a"}, symlink=False)
    transport = RsyncSshTransport(eq)
    assert await transport.reachable(run)
    server.stop()
    with pytest.raises(TransportError) as caught:
        await transport.push(run, bwlimit_kibps=None)
    assert caught.value.kind == K.NETWORK
    assert "Connection refused" in caught.value.message
    with pytest.raises(TransportError) as caught:
        await transport.remote_manifest(run)
    assert caught.value.kind == K.NETWORK
    assert not await transport.reachable(run)


async def test_server_killed_mid_transfer_then_restarted_completes(tmp_path, sshd_factory, remote_dir):
    server = sshd_factory()
    eq = equipment(tmp_path, server, remote_dir)
    payload = os.urandom(600_000)
    run = make_run(eq.local_root, {"big.bin": payload, "a.txt": b"a"}, symlink=False)
    transport = RsyncSshTransport(eq)
    remote_run = remote_dir / RUN_REL

    push = asyncio.create_task(transport.push(run, bwlimit_kibps=150))
    await wait_until(lambda: receiving(remote_run, "big.bin"), what="rsync receiving big.bin")
    server.stop()  # the NAS goes away: listener and every session killed
    with pytest.raises(TransportError) as caught:
        await push
    assert caught.value.kind == K.NETWORK

    server.start()  # back after the backoff
    result = await transport.push(run, bwlimit_kibps=None)
    assert result.ok
    assert tree(remote_run) == {"big.bin": payload, "a.txt": b"a"}
    assert not leftovers(remote_dir), "no partial or temporary file survives a completed push"
    assert (await transport.remote_manifest(run)).hashes == sha256_tree(run)


@pytest.mark.parametrize("where", ["parent", "run_folder"])
async def test_read_only_remote_folder_is_remote_write_refused(tmp_path, sshd, remote_dir, where):
    # The login user is unprivileged: permission bits bind it (root would ignore them).
    locked = remote_dir / "locked"
    target_root = locked if where == "parent" else remote_dir
    if where == "run_folder":  # exists, owned by root, not writable by the login user
        (remote_dir / RUN_REL).mkdir(parents=True)
        locked = remote_dir / RUN_REL
    else:
        locked.mkdir()
    locked.chmod(0o555)
    eq = equipment(tmp_path, sshd, target_root)
    run = make_run(eq.local_root, {"a.txt": b"a", "sub/b.txt": b"b"}, symlink=False)
    with pytest.raises(TransportError) as caught:
        await RsyncSshTransport(eq).push(run, bwlimit_kibps=None)
    assert caught.value.kind == K.REMOTE_WRITE_REFUSED, caught.value.message
    assert "Permission denied" in caught.value.message or "Operation not permitted" in caught.value.message
    assert not any(p.is_file() for p in locked.rglob("*"))


async def test_local_file_removed_during_transfer_is_local_file_vanished(tmp_path, sshd, remote_dir):
    eq = equipment(tmp_path, sshd, remote_dir)
    run = make_run(eq.local_root, {"a_big.bin": os.urandom(400_000), "z_small.txt": b"z"}, symlink=False)
    transport = RsyncSshTransport(eq)
    push = asyncio.create_task(transport.push(run, bwlimit_kibps=200))
    await wait_until(lambda: receiving(remote_dir / RUN_REL, "a_big.bin"), what="rsync receiving a_big.bin")
    (run / "z_small.txt").unlink()
    with pytest.raises(TransportError) as caught:
        await push
    assert caught.value.kind == K.LOCAL_FILE_VANISHED, caught.value.message
    assert "vanished" in caught.value.message


async def test_own_leftovers_are_not_a_conflict_and_are_removed(tmp_path, sshd, remote_dir):
    eq = equipment(tmp_path, sshd, remote_dir)
    run = make_run(eq.local_root, {"a.txt": b"a", "sub/b.txt": b"b"}, symlink=False)
    remote_run = remote_dir / RUN_REL
    (remote_run / PARTIAL_DIR).mkdir(parents=True)
    (remote_run / "sub" / PARTIAL_DIR).mkdir(parents=True)
    (remote_run / PARTIAL_DIR / "gone.bin").write_bytes(b"partial of a file no longer in the run")
    (remote_run / "sub" / PARTIAL_DIR / "b.txt").write_bytes(b"partial")
    (remote_run / ".a.txt.Xy12Zq").write_bytes(b"rsync temporary of a killed receiver")
    (remote_run / ".exlab-wizard").mkdir()
    (remote_run / ".exlab-wizard" / "sync.old.log").write_bytes(b"metadata pushed earlier")
    subprocess.run(["chown", "-R", f"{RW_USER}:{RW_USER}", str(remote_dir)], check=True)

    await RsyncSshTransport(eq).push(run, bwlimit_kibps=None)
    assert tree(remote_run) == {
        "a.txt": b"a",
        "sub/b.txt": b"b",
        ".exlab-wizard/sync.old.log": b"metadata pushed earlier",
    }
    assert not leftovers(remote_dir)


async def test_a_sibling_differing_only_in_case_is_never_taken_for_a_missing_run_folder(
    tmp_path, sshd, remote_dir, monkeypatch
):
    """On a NAS that folds case (SMB, exFAT) ``Run_a`` opens ``Run_A``: such a sibling makes the push list the run's path.

    The parent's listing alone would say "missing" (rsync matches names exactly) and the push would write in
    place into the other run's folder. Here the NAS is case-sensitive: the listing finds nothing, the run
    lands in its own folder and the sibling is untouched.
    """
    eq = equipment(tmp_path, sshd, remote_dir)
    run = make_run(eq.local_root, {"a.txt": b"a"}, symlink=False)
    sibling = (remote_dir / RUN_REL).with_name(RUN_REL.name.swapcase())
    sibling.mkdir(parents=True)
    (sibling / "a.txt").write_bytes(b"another run's")
    subprocess.run(["chown", "-R", f"{RW_USER}:{RW_USER}", str(remote_dir)], check=True)
    transport = RsyncSshTransport(eq)
    listed: list[str] = []
    real = transport._list_remote

    async def spy(run_path, remote_path, **kwargs):
        listed.append(str(remote_path).rstrip("/"))
        return await real(run_path, remote_path, **kwargs)

    monkeypatch.setattr(transport, "_list_remote", spy)
    await transport.push(run, bwlimit_kibps=None)
    assert str(remote_dir / RUN_REL) in listed  # asked as the NAS resolves it, not assumed missing
    assert tree(remote_dir / RUN_REL) == {"a.txt": b"a"}
    assert tree(sibling) == {"a.txt": b"another run's"}


# ------------------------------------------------ manifests and reachability


async def test_missing_run_folder_is_empty_and_missing_root_is_network(tmp_path, sshd, remote_dir):
    eq = equipment(tmp_path, sshd, remote_dir)
    run = make_run(eq.local_root, {"a.txt": b"a"}, symlink=False)
    transport = RsyncSshTransport(eq)
    assert (await transport.remote_manifest(run)).hashes == {}
    assert await transport.reachable(run)

    gone = equipment(tmp_path, sshd, remote_dir / "no-such-root")
    transport = RsyncSshTransport(gone)
    with pytest.raises(TransportError) as caught:
        await transport.remote_manifest(run)
    assert caught.value.kind == K.NETWORK
    assert not await transport.reachable(run)


async def test_command_refusing_rrsync_remote_streams_back_and_skips_oversize(tmp_path, sshd, remote_dir):
    eq = equipment(tmp_path, sshd, remote_dir)
    files = {"small.txt": b"s" * 100, "big.bin": os.urandom(5000), "sub/new\nline": b"n"}
    run = make_run(eq.local_root, files, symlink=False)
    await RsyncSshTransport(eq).push(run, bwlimit_kibps=None)

    # Same user, but a key forced to `rrsync -ro /`: no commands, rsync reads only.
    restricted = equipment(tmp_path, sshd, remote_dir, key=sshd.env.rrsync_key)
    transport = RsyncSshTransport(restricted, verify_max_stream_bytes=1000)
    assert await transport.hash_tool() is None
    manifest = await transport.remote_manifest(run)
    expected = {k: hashlib.sha256(v).hexdigest() for k, v in files.items() if len(v) <= 1000}
    assert manifest.hashes == expected
    assert manifest.unverifiable == {"big.bin": "verify_skipped_oversize"}
    assert await transport.reachable(run)
    with pytest.raises(TransportError) as caught:  # -ro: the server refuses writes
        await transport.push(run, bwlimit_kibps=None)
    assert caught.value.kind in (K.REMOTE_WRITE_REFUSED,), caught.value.message


def log_lines(eq) -> list[str]:
    path = log_path_for(eq)
    return path.read_text().splitlines() if path.exists() else []


async def test_probing_a_command_refusing_remote_writes_nothing_to_the_equipment_log(tmp_path, sshd, remote_dir):
    # rrsync refuses `test -d` and serves rsync: reachable, and its refusal is no failure to log
    # (the reaper and the audit probe per job on every pass).
    restricted = equipment(tmp_path, sshd, remote_dir, key=sshd.env.rrsync_key)
    run = make_run(restricted.local_root, {"a.txt": b"a"}, symlink=False)
    transport = RsyncSshTransport(restricted)
    for _ in range(3):
        assert await transport.reachable(run)
    assert log_lines(restricted) == []


async def test_a_failing_probe_is_logged_once_per_outage(tmp_path, sshd_factory, remote_dir):
    server = sshd_factory()
    eq = equipment(tmp_path, server, remote_dir)
    run = make_run(eq.local_root, {"a.txt": b"a"}, symlink=False)
    transport = RsyncSshTransport(eq)
    assert await transport.reachable(run)
    assert log_lines(eq) == []  # a probe that succeeds writes nothing
    server.stop()
    for _ in range(3):
        assert not await transport.reachable(run)
    first = log_lines(eq)
    assert len(first) == 1 and " tool_exit tool=ssh step=reachable rc=255 " in first[0], first
    assert "Connection refused" in first[0]  # ssh's reason, for whoever reads the log
    server.start()
    assert await transport.reachable(run)
    server.stop()
    for _ in range(3):
        assert not await transport.reachable(run)
    assert len(log_lines(eq)) == 2  # the next outage is logged once again


async def test_sftp_only_remote_streams_back_over_sftp(tmp_path, sshd, remote_dir):
    eq = equipment(tmp_path, sshd, remote_dir)
    files = {"small.txt": b"s" * 100, "big.bin": os.urandom(5000), "odd 'name' $(x)": b"q", "new\nline": b"n"}
    run = make_run(eq.local_root, files, symlink=False)
    await RsyncSshTransport(eq).push(run, bwlimit_kibps=None)

    sftp_only = equipment(tmp_path, sshd, remote_dir, user=SFTP_USER)
    transport = RsyncSshTransport(sftp_only, verify_max_stream_bytes=1000, log=EquipmentLog(sftp_only))
    assert await transport.hash_tool() is None
    manifest = await transport.remote_manifest(run)
    assert manifest.hashes == {k: hashlib.sha256(v).hexdigest() for k, v in files.items() if len(v) <= 1000}
    assert manifest.unverifiable == {"big.bin": "verify_skipped_oversize"}
    with pytest.raises(TransportError) as caught:  # this account may not run rsync at all
        await transport.push(run, bwlimit_kibps=None)
    assert caught.value.kind == K.AUTH


async def test_remote_listing_through_rrsync_and_sftp_only_accounts(tmp_path, sshd, remote_dir):
    eq = equipment(tmp_path, sshd, remote_dir)
    files = {"a.txt": b"a" * 10, "sub/new\nline": b"n", "#hash 'q' $(x).bin": b"h" * 300}
    run = make_run(eq.local_root, files, symlink=False)
    await RsyncSshTransport(eq).push(run, bwlimit_kibps=None)
    (remote_dir / RUN_REL / "link").symlink_to("a.txt")
    expected = {name: len(data) for name, data in files.items()}

    restricted = equipment(tmp_path, sshd, remote_dir, key=sshd.env.rrsync_key)  # no commands, rsync reads only
    assert await RsyncSshTransport(restricted).remote_listing(run) == expected
    sftp_only = equipment(tmp_path, sshd, remote_dir, user=SFTP_USER)  # may not run rsync: listed over sftp
    transport = RsyncSshTransport(sftp_only, log=EquipmentLog(sftp_only))
    assert await transport.remote_listing(run) == expected
    shutil.rmtree(remote_dir / RUN_REL)
    assert await transport.remote_listing(run) == {}
    gone = equipment(tmp_path, sshd, remote_dir / "no-such-root", user=SFTP_USER)
    with pytest.raises(TransportError) as caught:
        await RsyncSshTransport(gone, log=EquipmentLog(gone)).remote_listing(run)
    assert caught.value.kind == K.NETWORK, caught.value.message


# ----------------------------------------------------- parallel rsync streams


def _folder_times(root: Path) -> dict[str, int]:
    return {
        Path(folder).relative_to(root).as_posix(): os.lstat(folder).st_mtime_ns // 1_000_000_000
        for folder, _dirs, _files in os.walk(root)
    }


def _push_steps(eq) -> list[str]:
    return [line for line in _log_lines(eq) if "tool_start" in line and "step=push" in line]


async def _push_and_check(eq, run: Path, files: dict[str, bytes], remote_dir: Path) -> None:
    """Push ``run`` with no limit; everything arrives, folders with their times, and a second push sends nothing."""
    old = time.time() - 86_400 * 30
    for folder, _dirs, _files in os.walk(run):
        os.utime(folder, (old, old))  # the remote folders must get these times, not "now"
    transport = RsyncSshTransport(eq)
    progress: list[int] = []
    result = await transport.push(run, bwlimit_kibps=None, progress=progress.append)
    remote_run = remote_dir / RUN_REL
    assert result.files_sent == len(files) and result.bytes_sent == sum(map(len, files.values()))
    assert tree(remote_run) == files
    assert (remote_run / "empty folder" / "inside").is_dir()
    assert _folder_times(remote_run) == _folder_times(run)
    assert sum(progress) == result.bytes_sent
    assert_sha256sum_check(remote_run, run)
    assert not leftovers(remote_dir)
    assert data_only((await transport.remote_manifest(run)).hashes) == data_only(sha256_tree(run))
    assert (await transport.push(run, bwlimit_kibps=None)).files_sent == 0


@pytest.mark.parametrize("parent", ["missing", "there"])  # there: the streams' rsyncs must make the run folder
async def test_a_large_run_goes_as_streams_over_its_top_level_entries(tmp_path, sshd, remote_dir, monkeypatch, parent):
    monkeypatch.setattr(rsync_ssh, "STREAMS_MIN_AVERAGE_BYTES", 0)
    eq = equipment(tmp_path, sshd, remote_dir)
    if parent == "there":
        (remote_dir / RUN_REL).parent.mkdir(parents=True)
        subprocess.run(["chown", "-R", f"{RW_USER}:{RW_USER}", str(remote_dir)], check=True)
    files = {f"frames_{i % 7}/f{i:04d}.raw": os.urandom(5000) for i in range(rsync_ssh.STREAMS_MIN_FILES)}
    files |= {"stack.tif": os.urandom(3 << 20), **HOSTILE}  # names rsync reads as wildcards among them
    run = make_run(eq.local_root, files, symlink=False)
    (run / "empty folder" / "inside").mkdir(parents=True)
    await _push_and_check(eq, run, files, remote_dir)
    streams = [line for line in _push_steps(eq) if "step=push:" in line]
    assert len(streams) == 2 * rsync_ssh.PUSH_STREAMS == 4, streams  # two pushes of two streams
    assert "--exclude-from=-" in streams[0] and "--include-from=-" in streams[1]
    assert not any("--files-from" in line for line in streams)  # rsync lists as it goes


@pytest.mark.parametrize("parent", ["missing", "there"])
async def test_a_run_whose_top_level_is_one_folder_goes_as_streams_given_file_lists(
    tmp_path, sshd, remote_dir, monkeypatch, parent
):
    monkeypatch.setattr(rsync_ssh, "STREAMS_MIN_AVERAGE_BYTES", 0)
    eq = equipment(tmp_path, sshd, remote_dir)
    if parent == "there":
        (remote_dir / RUN_REL).parent.mkdir(parents=True)
        subprocess.run(["chown", "-R", f"{RW_USER}:{RW_USER}", str(remote_dir)], check=True)
    files = {f"frames/{i % 7}/f{i:04d}.raw": os.urandom(5000) for i in range(rsync_ssh.STREAMS_MIN_FILES)}
    files |= {"stack.tif": os.urandom(3 << 20), **HOSTILE}
    run = make_run(eq.local_root, files, symlink=False)
    (run / "empty folder" / "inside").mkdir(parents=True)
    await _push_and_check(eq, run, files, remote_dir)
    streams = [line for line in _push_steps(eq) if "step=push:" in line]
    assert len(streams) == 4 and all("--files-from=-" in line for line in streams), streams


async def test_a_run_of_small_files_goes_as_one_rsync(tmp_path, sshd, remote_dir):
    """Many small files: their round trips bind the push, and one rsync lists as it sends."""
    eq = equipment(tmp_path, sshd, remote_dir)
    files = {f"frames_{i % 7}/f{i:04d}.raw": os.urandom(5000) for i in range(rsync_ssh.STREAMS_MIN_FILES)}
    files |= HOSTILE
    run = make_run(eq.local_root, files, symlink=False)
    (run / "empty folder" / "inside").mkdir(parents=True)
    await _push_and_check(eq, run, files, remote_dir)
    steps = _push_steps(eq)
    assert len(steps) == 2 and all("step=push " in line for line in steps), steps  # two pushes, one rsync each


async def test_a_run_folder_made_by_the_push_is_written_in_place_and_an_existing_one_never(tmp_path, sshd, remote_dir):
    """In place only where there is no NAS copy to keep whole: a folder the same push made."""
    eq = equipment(tmp_path, sshd, remote_dir)
    run = make_run(eq.local_root, {"a.txt": b"a", "sub/b.txt": b"b"}, symlink=False)
    transport = RsyncSshTransport(eq)
    await transport.push(run, bwlimit_kibps=None)
    (run / "a.txt").write_bytes(b"a changed, longer")
    await transport.push(run, bwlimit_kibps=None)
    first, second = _push_steps(eq)
    assert "--inplace" in first and "--partial-dir" not in first
    assert "--inplace" not in second and f"--partial-dir={PARTIAL_DIR}" in second
    assert tree(remote_dir / RUN_REL) == {"a.txt": b"a changed, longer", "sub/b.txt": b"b"}


def _log_lines(eq) -> list[str]:
    return "".join(p.read_text() for p in (eq.equipment_root / ".exlab-wizard").glob("wizard.*.log")).splitlines()


def _conflict_checks(eq) -> list[str]:
    return [line for line in _log_lines(eq) if "step=conflict_check" in line]


@pytest.mark.parametrize("name", [RUN_REL.name, "Run_[1]*?x"])  # the second: a pattern to rsync's remote side
async def test_a_new_run_is_found_missing_through_its_parent_without_an_rsync_error(tmp_path, sshd, remote_dir, name):
    """rsync pauses 0.1 s before it exits with an error: a new run's listing must not be one."""
    rel = RUN_REL.with_name(name)
    eq = equipment(tmp_path, sshd, remote_dir)
    run = make_run(eq.local_root, {"a.txt": b"a"}, rel=rel, symlink=False)
    sibling = (remote_dir / rel).with_name(name + "_b")  # a run whose name starts with ours
    sibling.mkdir(parents=True)
    (sibling / "other.txt").write_bytes(b"another run's file")
    subprocess.run(["chown", "-R", f"{RW_USER}:{RW_USER}", str(remote_dir)], check=True)

    await RsyncSshTransport(eq).push(run, bwlimit_kibps=None)
    assert tree(remote_dir / rel) == {"a.txt": b"a"}
    assert tree(sibling) == {"other.txt": b"another run's file"}
    failed = [line for line in _conflict_checks(eq) if "tool_exit" in line and " rc=0" not in line]
    assert not failed, failed
    # Its parent listed, the push's own rsync makes the run folder: no separate round trip for it. A name
    # rsync's remote side reads as a pattern names the folder only once it exists: made first.
    made = [line for line in _log_lines(eq) if "step=make_run_folder" in line]
    assert bool(made) == (name != RUN_REL.name), made
    # Pushed again: the listing finds the run's own files (no conflict, nothing foreign, nothing resent).
    assert (await RsyncSshTransport(eq).push(run, bwlimit_kibps=None)).files_sent == 0
    assert tree(remote_dir / rel) == {"a.txt": b"a"}


@pytest.mark.parametrize("kind", ["file", "symlink"])
async def test_a_file_or_symlink_in_place_of_the_run_folder_is_a_conflict(tmp_path, sshd, remote_dir, kind):
    eq = equipment(tmp_path, sshd, remote_dir)
    run = make_run(eq.local_root, {"a.txt": b"a"}, symlink=False)
    remote_run = remote_dir / RUN_REL
    elsewhere = remote_dir / "elsewhere"
    elsewhere.mkdir()
    remote_run.parent.mkdir(parents=True)
    if kind == "file":
        remote_run.write_bytes(b"someone's file under the run's name")
    else:
        remote_run.symlink_to(elsewhere)  # a push through it would write outside the run's place
    subprocess.run(["chown", "-R", "-h", f"{RW_USER}:{RW_USER}", str(remote_dir)], check=True)

    with pytest.raises(TransportError) as caught:
        await RsyncSshTransport(eq).push(run, bwlimit_kibps=None)
    assert caught.value.kind == K.REMOTE_CONFLICT, caught.value.message
    assert list(elsewhere.iterdir()) == []
    assert remote_run.is_symlink() if kind == "symlink" else remote_run.read_bytes().startswith(b"someone")


def test_top_level_streams_send_every_file_exactly_once(tmp_path, monkeypatch):
    """The real rsync, dry run, given each stream's filters: together every file, no file twice."""
    monkeypatch.setattr(rsync_ssh, "STREAMS_MAX_SHARE", 1.0)
    files = {**HOSTILE, **{f"folder {i}/f{i}.raw": b"x" * (i + 1) for i in range(6)}, "top.bin": b"t"}
    run = make_run(tmp_path / "lab", files, symlink=False)
    local = local_tree(run)
    units = rsync_ssh._split_top_level(run, local, 3)
    assert len(units) == 3 and all(len(group) >= 2 for group in units)
    sent: list[set[str]] = []
    for args, stdin in zip(*rsync_ssh._top_level_filters(units), strict=True):
        done = subprocess.run(
            ["rsync", "-a", "-n", "--out-format=%n", *args, f"{run}/", f"{tmp_path / 'nowhere'}/"],
            input=stdin,
            capture_output=True,
            check=True,
            timeout=60,
        )
        names = {rsync_ssh._unescape(line) for line in done.stdout.split(b"\n") if line}
        sent.append({name for name in names if name in local.files})
    assert set().union(*sent) == set(local.files)
    assert sum(map(len, sent)) == len(local.files), "a file went in two streams"


def test_streams_split_by_size_and_count():
    files = {"huge": 100 << 20, **{f"s{i}": 4096 for i in range(2000)}, "big": 60 << 20, "mid": 40 << 20}
    groups = rsync_ssh._split_for_streams(files, 2)
    assert sorted(sum(groups, [])) == sorted(files)  # every file once
    cost = [sum(files[f] + rsync_ssh.STREAM_FILE_COST for f in g) for g in groups]
    assert max(cost) / min(cost) < 1.1
    assert rsync_ssh._split_for_streams({"a": 10, "b": 20}, 2) == []  # small: one rsync
    assert rsync_ssh._split_for_streams({"a": 64 << 20}, 2) == []  # one file: one rsync


async def test_a_stream_that_fails_stops_the_others_and_names_the_file(tmp_path, sshd, remote_dir, monkeypatch):
    eq = equipment(tmp_path, sshd, remote_dir)
    # one top-level folder: streams given file lists, which name each file
    files = {"data/a_big.bin": os.urandom(24 << 20), "data/b_big.bin": os.urandom(24 << 20), "data/c.txt": b"c"}
    run = make_run(eq.local_root, files, symlink=False)
    real_split = rsync_ssh._split_for_streams

    def split_then_delete(local_files, streams):
        groups = real_split(local_files, streams)
        (run / "data" / "c.txt").unlink()  # gone between the listing and its stream
        return groups

    monkeypatch.setattr(rsync_ssh, "_split_for_streams", split_then_delete)
    with pytest.raises(TransportError) as caught:
        await RsyncSshTransport(eq).push(run, bwlimit_kibps=None)
    assert caught.value.kind == K.LOCAL_FILE_VANISHED, caught.value.message
    assert "c.txt" in caught.value.message
    monkeypatch.setattr(rsync_ssh, "_split_for_streams", real_split)
    result = await RsyncSshTransport(eq).push(run, bwlimit_kibps=None)  # the retry completes
    assert tree(remote_dir / RUN_REL) == {k: v for k, v in files.items() if k != "data/c.txt"}
    assert result.ok and not leftovers(remote_dir)


async def test_streams_share_a_limit_that_starts_mid_transfer(tmp_path, sshd, remote_dir):
    eq = equipment(tmp_path, sshd, remote_dir)
    run = make_run(eq.local_root, {"a.txt": b"a"}, symlink=False)
    transport = RsyncSshTransport(eq)
    await transport._rsync_following_schedule(
        run, ["-a", "--mkpath"], str(remote_dir / RUN_REL), 200, step="push:1/2", streams=2
    )
    log = "".join(p.read_text() for p in (eq.equipment_root / ".exlab-wizard").glob("wizard.*.log"))
    assert "--bwlimit=100" in log and "--bwlimit=200" not in log


async def test_streams_write_into_read_only_folders_and_leave_their_modes(tmp_path, sshd, remote_dir, monkeypatch):
    # The login user is unprivileged, so a 0555 folder binds it: one stream finishing must
    # not lock the other out of a folder they share.
    monkeypatch.setattr(rsync_ssh, "STREAMS_MIN_BYTES", 0)
    monkeypatch.setattr(rsync_ssh, "STREAMS_MIN_FILES", 0)
    monkeypatch.setattr(rsync_ssh, "STREAMS_MIN_AVERAGE_BYTES", 0)
    eq = equipment(tmp_path, sshd, remote_dir)
    files = {f"locked/f{i:03d}.raw": os.urandom(2000 + i) for i in range(300)} | {"top.txt": b"t"}
    run = make_run(eq.local_root, files, symlink=False)
    (run / "locked").chmod(0o555)
    try:
        result = await RsyncSshTransport(eq).push(run, bwlimit_kibps=None)
        remote_run = remote_dir / RUN_REL
        assert result.ok and tree(remote_run) == files
        assert (remote_run / "locked").stat().st_mode & 0o777 == 0o555
        assert not leftovers(remote_dir)
    finally:
        (run / "locked").chmod(0o755)
        if (remote_dir / RUN_REL / "locked").exists():
            (remote_dir / RUN_REL / "locked").chmod(0o755)


async def test_keep_previous_of_many_files_is_split_under_the_remote_argument_limit(
    tmp_path, sshd, remote_dir, monkeypatch
):
    """The remote shell gets the command as one argument (128 KiB on Linux): many paths go in several calls."""
    monkeypatch.setattr(rsync_ssh, "_ARGS_MAX_BYTES", 300)
    files = {f"folder {i:03d}/file 'quoted' {i:03d}.bin": b"%d" % i for i in range(40)}
    run = make_run(tmp_path / "lab", files, symlink=False)
    transport = RsyncSshTransport(equipment(tmp_path, sshd, remote_dir))
    await transport.push(run, bwlimit_kibps=None)
    kept = await transport.keep_previous(run, list(files), "20261205T073000Z")
    assert kept == sorted(files, key=os.fsencode)
    assert tree(remote_dir / RUN_REL / ".exlab-wizard" / "previous" / "20261205T073000Z") == files


async def test_a_listing_whose_connection_drops_after_the_missing_folder_is_not_local_damage(
    tmp_path, sshd, remote_dir, monkeypatch
):
    """rsync exits 255 after the NAS said the run folder is missing: an empty listing, not local_file_vanished."""
    from exlab_wizard.sync.transports._process import ToolResult

    eq = equipment(tmp_path, sshd, remote_dir)
    transport = RsyncSshTransport(eq)
    run = make_run(eq.local_root)
    stderr = b'rsync: [sender] change_dir "/srv/x/Run" failed: No such file or directory (2)\n'

    real = transport._list_remote_raw

    async def dropped(*args, **kwargs):
        if kwargs.get("step") == "remote_listing":  # the run folder's listing; the root's is real
            return ToolResult(["rsync"], 255, b"", stderr, 0.1)
        return await real(*args, **kwargs)

    monkeypatch.setattr(transport, "_list_remote_raw", dropped)
    assert await transport.remote_listing(run) == {}


@pytest.mark.parametrize("call", ["push", "fetch"])
async def test_a_listing_of_a_missing_folder_cut_short_is_network_not_a_vanished_local_file(
    tmp_path, sshd, remote_dir, monkeypatch, call
):
    # Found by the torture harness: sshd stopped right after rsync said the NAS run folder was
    # missing (exit 255, not 23). The sender of a listing is the NAS: nothing local vanished, and
    # the job must be retried, not failed at once.
    eq = equipment(tmp_path, sshd, remote_dir)
    run = make_run(eq.local_root, {"a.txt": b"a"}, symlink=False)
    real = rsync_ssh.run_tool

    async def connection_drops_after_a_listing(argv, **kwargs):
        result = await real(argv, **kwargs)
        if "--list-only" in argv and result.returncode == 23:
            result.returncode = 255
        return result

    monkeypatch.setattr(rsync_ssh, "run_tool", connection_drops_after_a_listing)
    transport = RsyncSshTransport(eq)
    with pytest.raises(TransportError) as caught:
        if call == "push":
            await transport.push(run, bwlimit_kibps=None)
        else:
            await transport.fetch(run, ["a.txt"], tmp_path)
    assert caught.value.kind == K.NETWORK, caught.value.message
    assert "No such file" in caught.value.message


# --------------------------------------------------------------- local hashes from the push's listing


def test_local_hashes_come_from_the_listing_the_push_was_given(tmp_path):
    """Every data file of the listing hashed once (small and large, odd names), metadata left out."""
    files = {**HOSTILE, "large.bin": os.urandom(_process.LARGE_FILE_BYTES + 5)}
    run = make_run(tmp_path / "lab", files, symlink=True)
    listed = local_tree(run)
    (run / "added after the listing.txt").write_bytes(b"not listed, not hashed")
    hashes = _process.hash_local_files(run, listed, threading.Event())
    assert hashes == {k: hashlib.sha256(v).hexdigest() for k, v in data_only(files).items()}


def test_a_listed_file_gone_before_it_is_hashed_is_local_file_vanished(tmp_path):
    run = make_run(tmp_path / "lab", {"a.txt": b"a", "sub/b.txt": b"b"}, symlink=False)
    listed = local_tree(run)
    (run / "sub" / "b.txt").unlink()
    with pytest.raises(TransportError) as caught:
        _process.hash_local_files(run, listed, threading.Event())
    assert caught.value.kind == TransportErrorKind.LOCAL_FILE_VANISHED and "sub/b.txt" in caught.value.message


@pytest.mark.parametrize("swapped", ["sub", "sub/deep"])  # the file's own folder, or one above it
@pytest.mark.parametrize("hashing", ["push", "hash_tree"])
def test_a_run_folder_swapped_for_a_symlink_after_listing_is_never_hashed_through(
    tmp_path, monkeypatch, swapped, hashing
):
    """The bytes behind the symlink are someone else's: never hashed as the run's (they would be verified)."""
    run = make_run(tmp_path / "lab", {"a.txt": b"a", "sub/deep/b.txt": b"the run's own bytes"}, symlink=False)
    elsewhere = tmp_path / "elsewhere"
    foreign = elsewhere / "deep" / "b.txt" if swapped == "sub" else elsewhere / "b.txt"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"foreign bytes, same name")

    def swap() -> None:
        (run / swapped).rename(tmp_path / "moved-away")
        (run / swapped).symlink_to(elsewhere)

    real_scan = verifier.scan_run

    def scan_then_swap(*args, **kwargs):
        listed = list(real_scan(*args, **kwargs))
        swap()
        return iter(listed)

    with pytest.raises(TransportError) as caught:
        if hashing == "push":
            listed = local_tree(run)
            swap()
            _process.hash_local_files(run, listed, threading.Event())
        else:
            monkeypatch.setattr(verifier, "scan_run", scan_then_swap)
            verifier.hash_tree(run)
    assert caught.value.kind == TransportErrorKind.LOCAL_FILE_VANISHED
    assert "sub/deep/b.txt" in caught.value.message


async def test_a_push_whose_listed_file_vanishes_fails_as_local_file_vanished(tmp_path, sshd, remote_dir, monkeypatch):
    """The push's own hashing, not a later walk, notices it: the push raises, nothing is verified."""
    eq = equipment(tmp_path, sshd, remote_dir)
    run = make_run(eq.local_root, {"a.txt": b"a", "b.txt": b"b"}, symlink=False)

    def listing_then_gone(path: Path) -> _process.LocalTree:
        listed = local_tree(path)
        (path / "b.txt").unlink()
        return listed

    monkeypatch.setattr(rsync_ssh, "local_tree", listing_then_gone)
    with pytest.raises(TransportError) as caught:
        await RsyncSshTransport(eq).push(run, bwlimit_kibps=None)
    assert caught.value.kind == TransportErrorKind.LOCAL_FILE_VANISHED
