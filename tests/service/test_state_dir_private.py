"""Another local user cannot stop ``serve`` through ``state_dir``: the folder is 0700, its files 0600.

An exclusive ``flock`` needs only a read-only descriptor: a lease file any
user can open (``state_dir`` made 0755 and the lease 0644 under umask 022)
let any local login hold the runner lease, and every ``serve`` start then
exited 2, which the shipped unit never restarts. Now the engine makes the
folder 0700 and its files 0600 whatever the umask; a lease left open by an
older version is made anew by the next ``serve``; a lease held by a process
that is not exlab-sync is named as such; a folder or lease another user
could use is a warning line (``serve`` at start, ``doctor``).
"""

from __future__ import annotations

import asyncio
import os
import pwd
import subprocess
import time
from pathlib import Path

import pytest

from exlab_wizard.config import load_config
from exlab_wizard.sync.doctor import Check, run_checks
from exlab_wizard.sync.queue import lease_path_for
from tests.lab import Lab
from tests.service.conftest import as_user
from tests.service.test_serve_process import EXE, Serve, write_config

#: Run as the other user: open the file read-only, take an exclusive flock, say how it went, hold it.
HOLD = (
    "import fcntl,sys,time\n"
    "try:\n"
    "    f=open(sys.argv[1])\n"
    "except OSError as e:\n"
    "    print('denied', e.strerror, flush=True); sys.exit(0)\n"
    "if len(sys.argv) > 2: sys.stdin.readline()\n"  # opened; lock only when told
    "fcntl.flock(f,fcntl.LOCK_EX|fcntl.LOCK_NB)\n"
    "print('ok',flush=True)\n"
    "time.sleep(120)\n"
)


def _modes(state: Path) -> dict[str, str]:
    return {p.name: oct(p.stat().st_mode & 0o777) for p in [state, *state.iterdir()]}


def _state_dir_check(config) -> Check:
    check = asyncio.run(run_checks(config))[0]
    assert check.name == "state_dir"
    return check


def _serve_stays_up(config: Path, procs: list[subprocess.Popen]) -> tuple[int | None, str]:
    proc = subprocess.Popen(
        [EXE, "serve", "--config", str(config), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(proc)
    try:
        code = proc.wait(timeout=8)
    except subprocess.TimeoutExpired:
        code = None  # still serving: the lease is its own
    stderr = proc.stderr.read() if code is not None and proc.stderr else ""
    return code, stderr


def test_a_fresh_state_dir_is_private_under_umask_022(shared_lab) -> None:
    lab, _procs = shared_lab
    config = write_config(lab)
    serve = Serve(config)
    try:
        url_mode = oct((lab.state / "service-url").stat().st_mode & 0o777)
        assert serve.stop()[0] == 0
    finally:
        serve.kill()
    modes = _modes(lab.state)
    assert modes.pop("state") == "0o700", modes
    assert {"queue.db", "queue.db.lease", "exlab-sync.log", "api-token"} <= set(modes), modes
    assert set(modes.values()) == {"0o600"}, modes  # -wal and -shm too, when left
    assert url_mode == "0o600"


def test_another_local_user_cannot_hold_the_runner_lease(other_user: pwd.struct_passwd, shared_lab) -> None:
    lab, procs = shared_lab
    config = write_config(lab)
    first = Serve(config)  # makes state_dir, queue.db and the lease
    assert first.stop()[0] == 0
    lease = lab.state / "queue.db.lease"
    modes = _modes(lab.state)

    locker = as_user(other_user, ["/usr/bin/python3", "-c", HOLD, str(lease)], stdout=subprocess.PIPE)
    procs.append(locker)
    assert locker.stdout is not None
    assert locker.stdout.readline().startswith(b"denied"), f"{other_user.pw_name} opened {lease} ({modes})"

    code, stderr = _serve_stays_up(config, procs)
    assert code is None, (
        f"uid {other_user.pw_uid} ({other_user.pw_name}) holds {lease} with flock on a read-only descriptor "
        f"(modes as the engine made them under umask 022: {modes}); serve exits {code}: {stderr.strip()}"
    )


def _as_an_older_version_left_it(lab: Lab) -> None:
    """The modes an older engine gave under umask 022: the folder 0755, its files 0644 (the token 0600)."""
    lab.state.chmod(0o755)
    for path in lab.state.iterdir():
        if path.name != "api-token":
            path.chmod(0o644)


def test_a_lease_left_open_by_an_older_version_is_made_anew(other_user: pwd.struct_passwd, shared_lab) -> None:
    lab, procs = shared_lab
    config = write_config(lab)
    first = Serve(config)
    assert first.stop()[0] == 0
    _as_an_older_version_left_it(lab)
    lease = lab.state / "queue.db.lease"

    # The other user opens the old lease now, and locks it once serve has let it go (a descriptor outlives a chmod).
    locker = as_user(
        other_user,
        ["/usr/bin/python3", "-c", HOLD, str(lease), "wait"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    procs.append(locker)
    time.sleep(0.5)
    assert locker.poll() is None
    second = subprocess.Popen(
        [EXE, "serve", "--config", str(config), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(second)
    assert second.stdout is not None and "listening on" in second.stdout.readline()
    assert oct(lease.stat().st_mode & 0o777) == "0o600"
    assert oct((lab.state / "queue.db").stat().st_mode & 0o777) == "0o640"  # others' bits off, the group's kept
    second.terminate()
    assert second.wait(timeout=10) == 0
    assert second.stderr is not None
    warning = second.stderr.read()
    assert f"warning: the runner lease {lease} is open to other users (mode 0644)" in warning, warning
    assert "serve makes it anew (0600) when it takes it" in warning
    log = (lab.state / "exlab-sync.log").read_text()
    assert f"the runner lease {lease} was open to other users (mode 0644): made anew, 0600" in log

    assert locker.stdin is not None and locker.stdout is not None
    locker.stdin.write(b"go\n")
    locker.stdin.flush()
    assert locker.stdout.readline().strip() == b"ok"  # the old file's lock: no longer the lease
    code, stderr = _serve_stays_up(config, procs)
    assert code is None, stderr


def test_a_lease_held_by_another_program_is_named(other_user: pwd.struct_passwd, shared_lab) -> None:
    lab, procs = shared_lab
    config = write_config(lab)
    first = Serve(config)
    assert first.stop()[0] == 0
    _as_an_older_version_left_it(lab)  # an older version's lease, which the other user could lock
    lease = lab.state / "queue.db.lease"
    locker = as_user(other_user, ["/usr/bin/python3", "-c", HOLD, str(lease)], stdout=subprocess.PIPE)
    procs.append(locker)
    assert locker.stdout is not None and locker.stdout.readline().strip() == b"ok"

    done = subprocess.run(
        [EXE, "serve", "--config", str(config), "--port", "0"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"error: the runner lease {lease} is held by pid {locker.pid}, uid {other_user.pw_uid} ({other_user.pw_name}) "
        "(not an exlab-sync process: another user's lock?)"
    ), done.stderr


def test_a_folder_or_lease_another_user_could_use_is_a_warning(
    other_user: pwd.struct_passwd, shared_lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    from exlab_wizard.sync import state_dir  # here: the rest of the file runs on older code
    from exlab_wizard.sync.state_dir import state_dir_warnings

    lab, _procs = shared_lab
    config = load_config(write_config(lab))
    lab.state.mkdir(mode=0o750)
    lease = lease_path_for(config.queue_db)
    assert state_dir_warnings(lab.state, lease) == []  # group access an admin gave is fine
    assert "warning" not in _state_dir_check(config).detail

    lab.state.chmod(0o777)
    assert state_dir_warnings(lab.state, lease) == [
        f"state_dir {lab.state} is writable by every local user (mode 0777): any of them can replace the queue "
        "and hold the runner lease; chmod o-w it (0700, or 0750 for a group)"
    ]
    lab.state.chmod(0o700)
    os.chown(lab.state, other_user.pw_uid, other_user.pw_gid)
    lease.touch(mode=0o644)
    name, uid = other_user.pw_name, other_user.pw_uid
    # Root looking at another user's folder (doctor as root) is told to run as that user, and the lease
    # is judged for that user: a lease of root's there is one the service cannot open.
    (found_dir, found_lease) = state_dir_warnings(lab.state, lease)
    assert (
        found_dir == f"state_dir {lab.state} belongs to {name}: run this as that user (sudo -u {name} exlab-sync ...)"
    )
    assert found_lease.startswith(
        f"the runner lease {lease} (mode 0644) is owned by uid 0 (root), not by the state_dir's owner (uid {uid} ({name}))"
    ), found_lease
    check = _state_dir_check(config)
    assert check.ok and f"; warning: {found_dir}; warning: {found_lease}" in check.detail, check.detail
    with monkeypatch.context() as patch:  # any other user looking at it
        patch.setattr(state_dir, "_euid", lambda: 4242)
        (found_dir, _found_lease) = state_dir_warnings(lab.state, lease)
    assert found_dir.startswith(
        f"state_dir {lab.state} (mode 0700) is owned by uid {uid} ({name}), not by this user (uid 4242)"
    ), found_dir

    os.chown(lab.state, 0, 0)
    (found_lease,) = state_dir_warnings(lab.state, lease)
    assert found_lease.startswith(f"the runner lease {lease} is open to other users (mode 0644)"), found_lease
    doctor = subprocess.run(
        [EXE, "doctor", "--config", str(lab.root / "config.yaml")], capture_output=True, text=True, timeout=60
    )
    line = next(line for line in doctor.stdout.splitlines() if "\tstate_dir\t" in line)
    assert line.startswith("OK\t-\tstate_dir\t") and f"warning: {found_lease}" in line, doctor.stdout
