"""Root running a command on the service user's ``state_dir`` refuses before touching it.

An admin's habit, ``sudo exlab-sync jobs --config /etc/...``, beside the systemd
service (``User=exlab-sync``): what root creates in ``state_dir`` is root's. The
central log is a RotatingFileHandler, so a root command that logs near its size
renamed it and left a new ``exlab-sync.log`` owned by root; the service,
restarted as its own user, could not open it and ran with no central log,
silently. A root command also made the queue database, the lease or
``service-url`` root's. Now every command that writes there exits 2 with one
line naming the owner; ``doctor`` still diagnoses (it writes nothing there:
SQLite gives the ``-wal``/``-shm`` of a read-only look the database's owner).
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from exlab_wizard.cli import sync_cmds
from exlab_wizard.config import load_config
from tests.helpers import cli


@pytest.fixture(autouse=True)
def _needs_root() -> None:
    assert os.geteuid() == 0, "plays root and a service user"  # fails, never skips, without it


def _as_user(uid: int, gid: int, body: Callable[[], int]) -> int:
    """Run ``body()`` in a forked child as uid/gid; its return (an int) is the exit status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 99
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            code = body()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.fixture
def service_state() -> Iterator[tuple[Path, Path, pwd.struct_passwd]]:
    """A state_dir owned by the service user (``nobody``) with its central log just under the roll-over size.

    Yields (config file, state_dir, service user).
    """
    service = pwd.getpwnam("nobody")
    top = Path(tempfile.mkdtemp(prefix="exlab-root-cli-"))
    top.chmod(0o755)
    try:
        state = top / "state"
        state.mkdir(mode=0o750)
        shutil.chown(state, service.pw_uid, service.pw_gid)
        central = state / sync_cmds.CENTRAL_LOG_NAME
        central.write_bytes(b"x" * (sync_cmds.CENTRAL_LOG_MAX_BYTES - 100) + b"\n")
        os.chown(central, service.pw_uid, service.pw_gid)
        (top / "lab" / "EQ_01").mkdir(parents=True)
        (top / "nas").mkdir()
        config = top / "config.yaml"
        config.write_text(
            json.dumps(
                {
                    "equipment": [
                        {
                            "id": "EQ_01",
                            "local_root": str(top / "lab"),
                            "transport": {"type": "mount", "mount_path": str(top / "nas")},
                        }
                    ],
                    "state_dir": str(state),
                }
            )
        )
        yield config, state, service
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _snapshot(state: Path) -> dict[str, tuple[int, int, int]]:
    return {p.name: (p.stat().st_uid, p.stat().st_size, p.stat().st_mtime_ns) for p in state.iterdir()}


def _service_opens_its_log(config: Path, service: pwd.struct_passwd) -> int:
    def service_start() -> int:
        for handler in logging.getLogger().handlers[:]:
            if isinstance(handler, logging.FileHandler):
                logging.getLogger().removeHandler(handler)
        return 0 if sync_cmds.configure_logging(load_config(config)) is not None else 1

    return _as_user(service.pw_uid, service.pw_gid, service_start)


@pytest.mark.parametrize(
    "command", [["jobs"], ["status"], ["cleanup", "--dry-run"], ["serve", "--port", "0"]], ids=lambda c: c[0]
)
def test_root_refuses_a_command_on_the_service_users_state_dir(service_state, command: list[str]) -> None:
    config, state, service = service_state
    before = _snapshot(state)
    done = cli(*command, "--config", str(config), timeout=30)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.strip() == (
        f"error: state_dir {state} belongs to nobody: run this as that user (sudo -u nobody exlab-sync ...)"
    )
    assert _snapshot(state) == before, f"root's {command[0]} changed the service's state_dir"
    status = _service_opens_its_log(config, service)
    assert status == 0, f"after root ran {command[0]}, the service (uid {service.pw_uid}) has no central log"


def test_doctor_as_root_still_diagnoses_and_leaves_nothing_of_roots(service_state) -> None:
    config, state, service = service_state

    def make_queue() -> int:  # the service's queue, in WAL mode, closed (the service is stopped)
        conn = sqlite3.connect(state / "queue.db")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (x)")
        conn.commit()
        conn.close()
        return 0

    assert _as_user(service.pw_uid, service.pw_gid, make_queue) == 0
    done = cli("doctor", "--config", str(config), timeout=60)
    assert done.returncode in (0, 1), done.stderr
    line = next(row for row in done.stdout.splitlines() if row.split("\t")[2:3] == ["state_dir"])
    assert line.startswith("OK\t"), line
    assert (
        f"warning: state_dir {state} belongs to nobody: run this as that user (sudo -u nobody exlab-sync ...)" in line
    )
    assert "chown it" not in line  # chowning the service's folder to root would break the service
    roots = [p.name for p in state.iterdir() if p.stat().st_uid != service.pw_uid]
    assert roots == [], f"doctor as root left root's files in the service's state_dir: {roots}"
    assert _service_opens_its_log(config, service) == 0


def test_a_root_process_never_rolls_the_service_users_central_log_over(service_state) -> None:
    config, state, service = service_state
    central = state / sync_cmds.CENTRAL_LOG_NAME
    root_logger = logging.getLogger()
    before = list(root_logger.handlers)
    try:
        assert sync_cmds.configure_logging(load_config(config)) is None  # no handler of root's on that file
        logging.getLogger("exlab_wizard.root_cli").warning("a root command's record " + "y" * 200)
    finally:
        for handler in root_logger.handlers[:]:
            if handler not in before:
                root_logger.removeHandler(handler)
                handler.close()
    assert not (state / f"{sync_cmds.CENTRAL_LOG_NAME}.1").exists()
    assert central.stat().st_uid == service.pw_uid
    status = _service_opens_its_log(config, service)
    assert status == 0, f"{central} is owned by uid {central.stat().st_uid}: the service starts with no central log"
