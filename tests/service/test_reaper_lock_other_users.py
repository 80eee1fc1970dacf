"""Another local user cannot stop cleanup through the reaper's lock ``<queue db>.reaper.lock``.

A ``flock`` needs only a read-only descriptor. The reaper lock was made 0644
and never made private, so in a ``state_dir`` other users can enter (an
upgraded lab keeps its 0755; or the 0750 ``StateDirectoryMode`` the docs call
fine) any such user could hold it: every reaper pass of ``serve`` then ended
at once as ``busy``, which the reaper loop dropped without a word, and no run
was cleaned again. Now it is a 0600 file, made anew (by ``serve`` at start)
when others could open it, as the runner lease is.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import time
from pathlib import Path

from tests.lab import Lab
from tests.service.conftest import as_user
from tests.service.test_serve_process import EXE, Serve
from tests.service.test_state_dir_private import HOLD


def _config(lab: Lab) -> Path:
    data = lab.config_data(
        sync={"backoff_s": [0.1, 0.1], "scan_interval_s": 0.2},
        nas_cleanup={"enabled": True, "min_verify_passes": 1, "min_age_hours": 0, "retain_cache": True},
    )
    path = lab.root / "config.yaml"
    path.write_text(json.dumps(data))
    return path


def _enqueue(config: Path, run: Path) -> None:
    done = subprocess.run(
        [EXE, "enqueue", str(run), "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def _cleaned(run: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not (run / "data.bin").exists():
            return True
        time.sleep(0.2)
    return False


def _hold(user: pwd.struct_passwd, path: Path, procs: list[subprocess.Popen]) -> bytes:
    locker = as_user(user, ["/usr/bin/python3", "-c", HOLD, str(path)], stdout=subprocess.PIPE)
    procs.append(locker)
    assert locker.stdout is not None
    return locker.stdout.readline().strip()


def test_baseline_serve_cleans_a_verified_run(shared_lab) -> None:
    lab, _procs = shared_lab
    config = _config(lab)
    serve = Serve(config)
    try:
        run = lab.make_run("Run_base")
        _enqueue(config, run)
        assert _cleaned(run, 30)
    finally:
        assert serve.stop()[0] == 0


def test_upgraded_lab_another_user_cannot_stop_cleanup_through_the_reaper_lock(
    other_user: pwd.struct_passwd, shared_lab
) -> None:
    lab, procs = shared_lab
    config = _config(lab)
    first = Serve(config)  # makes state_dir, the queue, the lease and (first pass) the reaper lock
    time.sleep(1)
    assert first.stop()[0] == 0
    reaper_lock = lab.state / "queue.db.reaper.lock"
    assert reaper_lock.exists()
    # As an older version left it under umask 022: the folder 0755, its files 0644 (the token 0600).
    lab.state.chmod(0o755)
    for path in lab.state.iterdir():
        if path.name != "api-token":
            path.chmod(0o644)

    serve = Serve(config)  # the new serve on the upgraded lab
    try:
        said = _hold(other_user, reaper_lock, procs)  # a local login, once serve runs
        run = lab.make_run("Run_upgraded")
        _enqueue(config, run)
        cleaned = _cleaned(run, 30)
    finally:
        code, _ = serve.stop()
    stderr = serve.proc.stderr.read() if serve.proc.stderr else ""
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in [lab.state, *lab.state.iterdir()]}
    assert cleaned, (
        f"uid {other_user.pw_uid} ({other_user.pw_name}) locked {reaper_lock} ({said!r}; modes {modes}): "
        f"every reaper pass of serve is 'busy', the verified run is never cleaned; serve said: {stderr.strip()!r}"
    )


def test_group_state_dir_a_group_member_cannot_stop_cleanup_through_the_reaper_lock(
    other_user: pwd.struct_passwd, shared_lab
) -> None:
    """A fresh install whose state_dir an admin made 0750 for a group (docs: "fine")."""
    lab, procs = shared_lab
    config = _config(lab)
    lab.state.mkdir(mode=0o750)
    os.chown(lab.state, 0, other_user.pw_gid)
    lab.state.chmod(0o750)
    serve = Serve(config)
    try:
        time.sleep(1)  # a first reaper pass has made the lock
        reaper_lock = lab.state / "queue.db.reaper.lock"
        said = _hold(other_user, reaper_lock, procs)
        run = lab.make_run("Run_group")
        _enqueue(config, run)
        cleaned = _cleaned(run, 30)
    finally:
        serve.stop()
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in [lab.state, *lab.state.iterdir()]}
    assert cleaned, (
        f"group member {other_user.pw_name} locked {reaper_lock} ({said!r}; modes {modes}): the lease is 0600 but "
        "the reaper lock 0644, so cleanup is stopped for good, silently"
    )
