"""The ssh master's socket (``ControlPath``) is never one another local user made.

The rsync_ssh transport multiplexes its ssh connections through one socket per
(target, port, key, known_hosts), a name anyone can compute from the config.
ssh's mux client never checks who listens on a ControlPath: a user of the
instrument PC who made the socket's folder in the shared ``/tmp`` first (or a
symlink there, or who can write into it) and listens on that name as a fake
master would carry every ssh the engine runs (listing, claim, rsync, remote
hashing, reachability probe) wherever they like: the NAS "empty" (rule 3), the
run sent, "verified" and audited at their folder, and the local files deleted
while the configured NAS holds none of them (rule 1).

Here such a folder is refused (one warning naming it, its owner and mode), the
process keeps its masters in a fresh private folder, and the run goes to the
real sshd as usual.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from exlab_wizard.sync.transports import rsync_ssh
from exlab_wizard.sync.transports.rsync_ssh import RsyncSshTransport
from tests.helpers import Clock, ensure_user
from tests.lab import EQ, FILES, acts, client_lab, rsync_equipment, running
from tests.lab import cleanup_config as config

OTHER = "exlabt_other"
#: ssh binds a master's socket at ControlPath + "." + 16 random characters, then renames it;
#: a Unix socket's name holds at most 107 bytes
SOCKET_NAME_MAX = 107 - 17

# A minimal ssh ControlMaster: speaks the mux protocol (PROTOCOL.mux, version 4), takes the
# client's stdin/stdout/stderr, and runs the requested command itself, the real remote root
# replaced by its own folder. It accepts any peer (a real `ssh -M` accepts root too).
FAKE_MASTER = r"""
import os, socket, struct, subprocess, sys, threading
path, real, fake = sys.argv[1], sys.argv[2].encode(), sys.argv[3].encode()
def exact(c, n):
    b = b""
    while len(b) < n:
        part = c.recv(n - len(b))
        if not part:
            raise EOFError
        b += part
    return b
def read(c):
    return exact(c, struct.unpack(">I", exact(c, 4))[0])
def send(c, body):
    c.sendall(struct.pack(">I", len(body)) + body)
def string(buf, off):
    n = struct.unpack_from(">I", buf, off)[0]
    return buf[off + 4:off + 4 + n], off + 4 + n
def serve(c):
    try:
        send(c, struct.pack(">II", 1, 4))
        read(c)
        while True:
            msg = read(c)
            kind, rid = struct.unpack_from(">II", msg, 0)
            if kind == 0x10000004:
                send(c, struct.pack(">III", 0x80000005, rid, os.getpid()))
            elif kind == 0x10000002:
                _, off = string(msg, 8)
                off += 20  # four u32 flags, the escape char
                _, off = string(msg, off)
                command, off = string(msg, off)
                fds = []
                for _ in range(3):
                    fds += socket.recv_fds(c, 1, 1)[1]
                send(c, struct.pack(">III", 0x80000006, rid, 1))
                with open(os.path.join(os.path.dirname(fake.decode()), "commands.log"), "ab") as log:
                    log.write(command[:200] + b"\n")
                proc = subprocess.run(["sh", "-c", command.replace(real, fake)], stdin=fds[0], stdout=fds[1], stderr=fds[2])
                for fd in fds:
                    os.close(fd)
                send(c, struct.pack(">III", 0x80000004, 1, proc.returncode & 0xFFFFFFFF))
                return
            else:
                send(c, struct.pack(">III", 0x80000003, rid, 4) + b"nope")
    except Exception:
        pass
    finally:
        c.close()
srv = socket.socket(socket.AF_UNIX)
srv.bind(path)
srv.listen(64)
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


@pytest.fixture(scope="module")
def other_user() -> Iterator[pwd.struct_passwd]:
    """An ordinary login of the same PC (left in place: tests on other workers may be using it)."""
    yield ensure_user(OTHER, "-M", "-s", "/bin/sh")


@pytest.fixture
def shared_tmp(sshd, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, list[subprocess.Popen]]]:
    """A /tmp as on any Linux box (1777), made the service's temporary folder; no runtime folder.

    ``sshd`` first: the session's server must not keep its files in a folder removed here.
    """
    path = Path(tempfile.mkdtemp(prefix="exlab-shared-tmp-", dir="/tmp"))
    path.chmod(0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(rsync_ssh, "_OWN_CONTROL_DIR", None, raising=False)
    monkeypatch.setattr(rsync_ssh, "_REFUSED_CONTROL_DIRS", set(), raising=False)
    procs: list[subprocess.Popen] = []
    yield path, procs
    for proc in procs:
        proc.kill()
        proc.wait()
    shutil.rmtree(path, ignore_errors=True)


def as_other(*argv: str) -> None:
    subprocess.run(["runuser", "-u", OTHER, "--", *argv], check=True)


def socket_name(eq) -> str:
    t = eq.transport
    key = (t.ssh_target, t.ssh_port, str(t.ssh_key_path), str(t.ssh_known_hosts or ""))
    return hashlib.sha256("\0".join(map(str, key)).encode()).hexdigest()[:20]


def refusals(caplog: pytest.LogCaptureFixture, folder: Path) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and f"{folder} " in r.getMessage()]


@pytest.mark.network
@pytest.mark.parametrize("planted", ["their_folder", "open_folder", "symlink"])
async def test_another_users_control_socket_never_carries_the_service_ssh(
    tmp_path: Path, sshd, remote_dir: Path, other_user: pwd.struct_passwd, shared_tmp, planted: str, caplog
) -> None:
    shared, procs = shared_tmp
    caplog.set_level(logging.WARNING, logger="exlab_wizard")
    clock = Clock()
    lab = client_lab(tmp_path)
    cfg = config(lab)
    eq = rsync_equipment(lab.root, sshd, remote_dir)
    cfg = cfg.model_copy(update={"equipment": (eq, *(e for e in cfg.equipment if e.id != EQ))})
    run = lab.make_run(files=FILES)
    real_copy = remote_dir / run.relative_to(lab.local_root / EQ)

    # The other user, before the service's first ssh: a "NAS" of their own, and a listener on the
    # socket name the service will use, in the folder where the service looks for it.
    control_dir = shared / f"exlab-ssh-{os.getuid()}"
    loot = shared / "other"
    as_other("mkdir", "-p", "-m", "0755", str(loot / "nas"))
    if planted == "their_folder":  # theirs, made first
        as_other("mkdir", "-m", "0700", str(control_dir))
    elif planted == "open_folder":  # the service's, but anyone may write into it
        control_dir.mkdir(mode=0o700)
        control_dir.chmod(0o777)
    else:  # a symlink to a folder of theirs
        as_other("mkdir", "-m", "0700", str(loot / "master"))
        as_other("ln", "-s", str(loot / "master"), str(control_dir))
    socket_path = control_dir / socket_name(eq)
    script = shared / "fake_master.py"
    script.write_text(FAKE_MASTER)
    script.chmod(0o644)
    proc = subprocess.Popen(
        ["/usr/bin/python3", str(script), str(socket_path), str(remote_dir), str(loot / "nas")],
        stdout=subprocess.PIPE,
        user=other_user.pw_uid,
        group=other_user.pw_gid,
        extra_groups=[],
        cwd=str(loot),
    )
    procs.append(proc)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"

    async with running(cfg, clock) as client:
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        clock.advance(6)
        await client.audit_once()
        clock.advance(19)
        outcomes = acts(await client.cleanup_once())
        job = await client.job(run)

    stolen = sorted(p.relative_to(loot / "nas").as_posix() for p in (loot / "nas").rglob("*") if p.is_file())
    on_nas = {rel for rel in FILES if (real_copy / rel).is_file() and (real_copy / rel).read_bytes() == FILES[rel]}
    deleted = {rel for rel in FILES if not (run / rel).exists()}
    carried = (loot / "commands.log").read_text(errors="replace").count("\n") if (loot / "commands.log").exists() else 0
    assert carried == 0 and not stolen and deleted <= on_nas, (
        f"the service's ssh went through {socket_path} (owned by uid {control_dir.stat().st_uid}, "
        f"not {os.getuid()}): {carried} commands carried by another user's master; "
        f"the run's files sent to that user's folder: {stolen}; "
        f"job {job.state.value} (verify_passes={job.verify_passes}, {job.last_error}); cleanup: {[o.action for o in outcomes]}; "
        f"local files deleted: {sorted(deleted)}; of them on the configured NAS: {sorted(deleted & on_nas)}"
    )
    # The run went to the real NAS as it would without the other user; the folder refused once, said why.
    assert on_nas == set(FILES) and job.state.value == "cleaned", (job.state.value, job.last_error)
    warned = refusals(caplog, control_dir)
    assert len(warned) == 1, warned
    owner = other_user.pw_uid if planted != "open_folder" else os.getuid()
    assert f"owner uid {owner}," in warned[0] and ("symlink" in warned[0]) == (planted == "symlink")


def _bad_folder(control_dir: Path, loot: Path, bad: str) -> None:
    if bad == "their_folder":
        as_other("mkdir", "-m", "0700", str(control_dir))
    elif bad == "group_writable":
        control_dir.mkdir(mode=0o700)
        control_dir.chmod(0o770)
    elif bad == "symlink_to_ours":  # even to a private folder of ours: the link is someone's to change
        (loot / "ours").mkdir(mode=0o700)
        control_dir.symlink_to(loot / "ours")
    else:
        as_other("touch", str(control_dir))


@pytest.mark.network
@pytest.mark.parametrize("bad", ["their_folder", "group_writable", "symlink_to_ours", "a_file"])
async def test_a_folder_not_private_is_refused_and_the_push_works(
    tmp_path: Path, sshd, remote_dir: Path, other_user, shared_tmp, bad: str, caplog
) -> None:
    shared, _procs = shared_tmp
    caplog.set_level(logging.WARNING, logger="exlab_wizard")
    control_dir = shared / f"exlab-ssh-{os.getuid()}"
    loot = shared / "other"
    loot.mkdir()
    _bad_folder(control_dir, loot, bad)
    before = sorted(os.listdir(control_dir)) if control_dir.is_dir() else None

    lab = client_lab(tmp_path)
    run = lab.make_run(files=FILES)
    eq = rsync_equipment(lab.root, sshd, remote_dir)
    transport = RsyncSshTransport(eq)
    result = await transport.push(run, bwlimit_kibps=None)
    manifest = await transport.remote_manifest(run)

    real_copy = remote_dir / run.relative_to(lab.local_root / EQ)
    assert result.ok and all((real_copy / rel).read_bytes() == data for rel, data in FILES.items())
    assert {k: v for k, v in manifest.hashes.items() if k in FILES} == {
        k: hashlib.sha256(v).hexdigest() for k, v in FILES.items()
    }
    control = rsync_ssh._control_path(transport._host_key())
    own = Path(control).parent
    assert own.parent == shared and own.name.startswith("exlab-ssh-") and own != control_dir
    assert own.lstat().st_uid == os.getuid() and own.lstat().st_mode & 0o7777 == 0o700 and not own.is_symlink()
    assert len(control) <= SOCKET_NAME_MAX
    assert (sorted(os.listdir(control_dir)) if control_dir.is_dir() else None) == before  # no socket of ours there
    warned = refusals(caplog, control_dir)
    assert len(warned) == 1 and str(own) in warned[0], warned


def test_a_private_runtime_folder_is_preferred_and_a_good_tmp_folder_reused(shared_tmp, monkeypatch) -> None:
    shared, _procs = shared_tmp
    key = ("user@nas", 22, "/etc/exlab/id_ed25519", "/etc/exlab/known_hosts")
    tmp_folder = shared / f"exlab-ssh-{os.getuid()}"

    # No runtime folder: the shared tmp scheme, made private, and the same folder every time.
    first = Path(rsync_ssh._control_path(key))
    assert first.parent == tmp_folder and tmp_folder.lstat().st_mode & 0o7777 == 0o700
    assert Path(rsync_ssh._control_path(key)) == first

    runtime = shared / "run-user"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    path = Path(rsync_ssh._control_path(key))
    assert path.parent == runtime / "exlab-ssh" and path.parent.lstat().st_mode & 0o7777 == 0o700
    assert len(str(path)) <= SOCKET_NAME_MAX

    # A runtime folder that is not ours alone (e.g. another user's, inherited through sudo) is passed over.
    runtime.chmod(0o755)
    assert Path(rsync_ssh._control_path(key)).parent == tmp_folder
    assert rsync_ssh._OWN_CONTROL_DIR is None and not rsync_ssh._REFUSED_CONTROL_DIRS
