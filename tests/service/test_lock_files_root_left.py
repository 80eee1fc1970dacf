"""An upgraded lab where root once ran the older engine: root's 0644 lock files are made anew.

``sudo exlab-sync ...`` of an older version beside the service left root's
files in the service user's ``state_dir``: a lease, a reaper lock. The
service user cannot open root's 0644 file for writing: ``serve`` exited 2
("serve cannot start: Permission denied"), which the unit never restarts, and
with root's reaper lock every cleanup pass failed with a traceback. A
``flock`` needs only a read-only descriptor and the service user owns the
folder: the lock file is locked read-only and a fresh one renamed over it.

The engine runs here as the second local user (``attacker``) standing for the
service user, with the system ``python3`` and the venv's packages (the venv's
own interpreter lives under /root).
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import time
from pathlib import Path

from tests.lab import Lab
from tests.service.conftest import as_user

SRC = Path(__file__).resolve().parents[2] / "src"
VENV_SITE = next((Path(sys.prefix) / "lib").glob("python3*/site-packages"))
CLI = "import sys; sys.argv[0] = 'exlab-sync'; from exlab_wizard.cli import main; main()"


def _as_service_user(user: pwd.struct_passwd, *args: str, **kw) -> subprocess.Popen:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{SRC}:{VENV_SITE}", "HOME": "/tmp", "LANG": "C.UTF-8"}
    return as_user(user, ["/usr/bin/python3", "-c", CLI, *args], env=env, cwd="/tmp", **kw)


def _config(lab: Lab, *, cleanup: bool = False) -> Path:
    data = lab.config_data(sync={"backoff_s": [0.1, 0.1], "scan_interval_s": 0.2})
    if cleanup:
        data["nas_cleanup"] = {"enabled": True, "min_verify_passes": 1, "min_age_hours": 0, "retain_cache": True}
    path = lab.root / "config.yaml"
    path.write_text(json.dumps(data))
    return path


def _chown_all(root: Path, user: pwd.struct_passwd) -> None:
    for here, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            os.chown(os.path.join(here, name), user.pw_uid, user.pw_gid, follow_symlinks=False)
    os.chown(root, user.pw_uid, user.pw_gid)


def _serve(user, config: Path, procs) -> subprocess.Popen:
    proc = _as_service_user(user, "serve", "--config", str(config), "--port", "0",
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    procs.append(proc)
    return proc


def _wait_listening(proc: subprocess.Popen, timeout: float = 30) -> tuple[bool, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "listening on" in line:
            return True, line
        if not line and proc.poll() is not None:
            return False, proc.stderr.read()
    return False, "timeout"


def _older_version_state(lab: Lab, svc: pwd.struct_passwd, config: Path, procs) -> None:
    lab.state.mkdir(mode=0o755)
    _chown_all(lab.root, svc)
    first = _serve(svc, config, procs)
    ok, said = _wait_listening(first)
    assert ok, said
    time.sleep(1)  # a reaper pass or two
    first.terminate()
    assert first.wait(15) == 0


def test_a_lease_root_left_is_made_anew_not_a_permanent_exit_2(other_user: pwd.struct_passwd, shared_lab) -> None:
    lab, procs = shared_lab
    svc = other_user  # stands for the service user (User=exlab-sync)
    config = _config(lab)
    _older_version_state(lab, svc, config, procs)
    lease = lab.state / "queue.db.lease"
    lease.unlink()
    old = os.umask(0o022)
    try:  # `sudo exlab-sync enqueue --wait` (or serve) of the older version: root's 0644 lease
        fd = os.open(lease, os.O_RDWR | os.O_CREAT, 0o644)
        os.write(fd, b"4242\n")
        os.close(fd)
    finally:
        os.umask(old)

    proc = _serve(svc, config, procs)
    ok, said = _wait_listening(proc)
    if ok:
        proc.terminate()
        proc.wait(15)
    assert ok, (
        f"serve as {svc.pw_name} on its own state_dir, with a lease root's older engine left 0644 "
        f"(docs/service.md: made anew by the serve that takes it): exit {proc.returncode}, {said.strip()!r}"
    )


def test_a_reaper_lock_root_left_does_not_stop_cleanup_for_good(other_user: pwd.struct_passwd, shared_lab) -> None:
    lab, procs = shared_lab
    svc = other_user
    config = _config(lab, cleanup=True)
    _older_version_state(lab, svc, config, procs)
    reaper_lock = lab.state / "queue.db.reaper.lock"
    reaper_lock.unlink()
    fd = os.open(reaper_lock, os.O_RDWR | os.O_CREAT, 0o644)  # `sudo exlab-sync cleanup` of the older version
    os.close(fd)
    os.chmod(reaper_lock, 0o644)

    proc = _serve(svc, config, procs)
    ok, said = _wait_listening(proc)
    assert ok, said
    run = lab.make_run("Run_after_root")
    _chown_all(lab.local_root, svc)
    enq = _as_service_user(svc, "enqueue", str(run), "--config", str(config),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert enq.wait(60) == 0, enq.stderr.read()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (run / "data.bin").exists():
        time.sleep(0.2)
    proc.terminate()
    proc.wait(15)
    log = (lab.state / "exlab-sync.log").read_text()
    assert not (run / "data.bin").exists(), (
        f"the verified run is never cleaned: every pass fails on root's {reaper_lock}; "
        f"central log has {log.count('cleanup pass failed')} 'cleanup pass failed' tracebacks"
    )
