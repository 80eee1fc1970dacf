"""``exlab-sync doctor`` through the console script, against the real parts: the loopback sshd, a mount folder, rclone."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

from exlab_wizard.sync.doctor import Check
from exlab_wizard.sync.queue import MIGRATIONS, JobQueue
from tests.fixtures.sshd import RW_USER, SshServer, free_port
from tests.helpers import Clock, cli
from tests.lab import EQ, mark_nas


def _config(tmp_path: Path, transport: dict, *, bandwidth: dict | None = None) -> Path:
    (tmp_path / "lab" / EQ).mkdir(parents=True, exist_ok=True)
    if bandwidth is not None:
        transport = {**transport, "bandwidth": bandwidth}
    config = tmp_path / "config.yaml"
    config.write_text(
        json.dumps(
            {
                "equipment": [{"id": EQ, "local_root": str(tmp_path / "lab"), "transport": transport}],
                "state_dir": str(tmp_path / "state"),
            }
        )
    )
    return config


def _checks(done: subprocess.CompletedProcess[str]) -> dict[str, dict]:
    """The ``--json`` document's checks by name (each name once per equipment here)."""
    document = json.loads(done.stdout)
    assert document["ok"] is (done.returncode == 0)
    return {c["name"]: c for c in document["checks"]}


def _lines(done: subprocess.CompletedProcess[str]) -> dict[str, list[str]]:
    """The plain (not a terminal) output: one tab-separated line per check, by name."""
    rows = [line.split("\t") for line in done.stdout.splitlines()]
    assert all(row[0] in ("OK", "FAIL") for row in rows), done.stdout
    return {row[2]: row for row in rows}


def _ssh(server: SshServer, remote: Path, **over: object) -> dict:
    return {
        "type": "rsync_ssh",
        "ssh_target": f"{RW_USER}@127.0.0.1",
        "ssh_key_path": str(server.env.client_key),
        "ssh_port": server.port,
        "remote_path": str(remote),
        "ssh_known_hosts": str(server.known_hosts),
        **over,
    }


def test_rsync_ssh_good_key_every_check_passes(tmp_path: Path, sshd: SshServer, remote_dir: Path) -> None:
    config = _config(tmp_path, _ssh(sshd, remote_dir), bandwidth={"upload_mbps": 8})
    done = cli("doctor", "--config", str(config), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    checks = _checks(done)
    assert list(checks) == [
        "config",
        "state_dir",
        "local_root",
        "ssh_key",
        "host_key",
        "ssh_login",
        "remote_writable",
        "remote_hash_tool",
        "bandwidth",
    ]
    assert all(c["ok"] and c["hint"] is None for c in checks.values())
    assert checks["remote_hash_tool"]["detail"].split(",")[0] in (
        "python3-openssl",
        "openssl",
        "sha256sum",
        "python3-builtin",
    )
    assert "MB/s" in checks["remote_hash_tool"]["detail"]
    assert checks["bandwidth"]["detail"] == "limited to 976 KiB/s (8 Mbps) now"
    assert list(remote_dir.iterdir()) == []  # the probe file is gone


def test_rsync_ssh_wrong_key_fails_the_login_with_a_fix(tmp_path: Path, sshd: SshServer, remote_dir: Path) -> None:
    config = _config(tmp_path, _ssh(sshd, remote_dir, ssh_key_path=str(sshd.env.stranger_key)))
    done = cli("doctor", "--config", str(config))
    assert done.returncode == 1, done.stdout + done.stderr
    lines = _lines(done)
    assert lines["host_key"][0] == "OK"
    login = lines["ssh_login"]
    assert login[0] == "FAIL" and "authorized_keys" in login[4] and "ssh-copy-id" in login[4]
    assert "remote_writable" not in lines  # needs a login


def test_rsync_ssh_unknown_host_key_gives_the_keyscan_line(tmp_path: Path, sshd: SshServer, remote_dir: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    config = _config(tmp_path, _ssh(sshd, remote_dir, ssh_known_hosts=str(known)))
    done = cli("doctor", "--config", str(config), "--json")
    assert done.returncode == 1
    checks = _checks(done)
    assert checks["host_key"]["ok"] is False
    assert checks["host_key"]["hint"].endswith(f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {known}")
    assert checks["ssh_login"]["ok"] is False and "ssh-keyscan" in checks["ssh_login"]["hint"]


def test_ssh_key_readable_by_others_fails(tmp_path: Path, sshd: SshServer, remote_dir: Path) -> None:
    key = tmp_path / "id_open"
    key.write_bytes(sshd.env.client_key.read_bytes())
    key.chmod(0o644)
    done = cli("doctor", "--config", str(_config(tmp_path, _ssh(sshd, remote_dir, ssh_key_path=str(key)))), "--json")
    checks = _checks(done)
    assert checks["ssh_key"]["ok"] is False and checks["ssh_key"]["hint"] == f"chmod 600 {key}"


def test_mount_without_marker_fails_and_writes_nothing(tmp_path: Path) -> None:
    nas = tmp_path / "nas"
    nas.mkdir()
    config = _config(tmp_path, {"type": "mount", "mount_path": str(nas)})
    done = cli("doctor", "--config", str(config))
    assert done.returncode == 1
    lines = _lines(done)
    assert lines["mount_path"][0] == "OK"
    assert lines["mount_marker"][0] == "FAIL" and "touch" in lines["mount_marker"][4]
    assert "mount_writable" not in lines and list(nas.iterdir()) == []  # never writes into a bare mount point
    mark_nas(nas)
    done = cli("doctor", "--config", str(config), "--json")
    assert done.returncode == 0, done.stdout
    checks = _checks(done)
    assert checks["mount_writable"]["ok"] and checks["free_space"]["ok"]
    assert [p.name for p in nas.iterdir()] == [".exlab-nas"]


def test_rclone_remote_that_does_not_answer(tmp_path: Path, sshd: SshServer) -> None:
    conf = tmp_path / "rclone.conf"
    conf.write_text(
        f"[dead]\ntype = sftp\nhost = 127.0.0.1\nport = {free_port()}\nuser = x\n"
        f"key_file = {sshd.env.client_key}\nknown_hosts_file = {sshd.known_hosts}\n"
    )
    config = _config(
        tmp_path, {"type": "rclone", "rclone_remote": "dead", "rclone_remote_path": "lab", "rclone_config": str(conf)}
    )
    done = cli("doctor", "--config", str(config), "--json", timeout=60)
    assert done.returncode == 1
    checks = _checks(done)
    assert checks["rclone_remote"]["ok"] is False and "did not answer" in checks["rclone_remote"]["detail"]
    assert "rclone_hashes" not in checks


def test_rclone_remote_that_answers(tmp_path: Path, sshd: SshServer, remote_dir: Path, rclone_sftp_config) -> None:
    conf = rclone_sftp_config(sshd, remote_sha256=True)
    config = _config(
        tmp_path,
        {
            "type": "rclone",
            "rclone_remote": "labsftp",
            "rclone_remote_path": str(remote_dir),
            "rclone_config": str(conf),
        },
    )
    done = cli("doctor", "--config", str(config), "--json", timeout=60)
    assert done.returncode == 0, done.stdout
    assert _checks(done)["rclone_hashes"]["detail"] == "the backend hashes SHA-256 itself"


def test_bad_config_is_a_failed_check(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("equipment: [{id: A, local_root: /x, transport: {type: ftp}}]\n")
    done = cli("doctor", "--config", str(config))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    [line] = done.stdout.splitlines()
    assert line.startswith("FAIL\t-\tconfig\t") and "equipment[0].transport.type" in line


def test_check_is_plain_data() -> None:
    assert Check("x", False, "d", "h", "EQ").to_dict() == {
        "name": "x",
        "ok": False,
        "detail": "d",
        "hint": "h",
        "equipment": "EQ",
    }


def test_a_queue_written_by_a_newer_engine_fails_state_dir(tmp_path: Path) -> None:
    """A lab went back to an older engine: the service will refuse the queue; doctor says so, and never deletes it."""
    nas = tmp_path / "nas"
    nas.mkdir()
    mark_nas(nas)
    config = _config(tmp_path, {"type": "mount", "mount_path": str(nas)})
    JobQueue(tmp_path / "state" / "queue.db").close()  # this engine's queue: fine
    done = cli("doctor", "--config", str(config), "--json")
    state = _checks(done)["state_dir"]
    assert done.returncode == 0 and state["ok"], done.stdout
    assert f"queue schema {len(MIGRATIONS)}" in state["detail"]
    newer = len(MIGRATIONS) + 1
    con = sqlite3.connect(tmp_path / "state" / "queue.db")
    con.execute(f"PRAGMA user_version = {newer}")
    con.close()
    done = cli("doctor", "--config", str(config), "--json")
    state = _checks(done)["state_dir"]
    assert done.returncode == 1 and not state["ok"]
    assert f"queue schema {newer}" in state["detail"] and "newer exlab-wizard" in state["detail"]
    assert "never delete queue.db" in state["hint"]
    assert (tmp_path / "state" / "queue.db").exists()


def test_a_damaged_queue_fails_state_dir_and_is_never_touched(tmp_path: Path) -> None:
    """A page of the events zeroed (a failing sector): the service's start checks only the per-run tables,
    so doctor's whole-file quick_check is where a lab finds it before it is read; the file is left as it was."""
    nas = tmp_path / "nas"
    nas.mkdir()
    mark_nas(nas)
    config = _config(tmp_path, {"type": "mount", "mount_path": str(nas)})
    db = tmp_path / "state" / "queue.db"
    with JobQueue(db) as queue:
        job, _created = queue.get_or_create(f"/lab/{EQ}/P/Runs/Run_1", EQ, "/nas/Run_1", now=Clock()())
    con = sqlite3.connect(db)  # a long history: the file's last pages are the events'
    con.executemany(
        "INSERT INTO events (job_id, at, kind, detail) VALUES (?, ?, 'note', ?)",
        [(job.id, "2026-12-07T00:00:00+00:00", f"event {i} " + "x" * 1000) for i in range(200)],
    )
    con.commit()
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    done = cli("doctor", "--config", str(config), "--json")
    state = _checks(done)["state_dir"]
    assert done.returncode == 0 and state["ok"] and "quick_check ok" in state["detail"], done.stdout
    pages = db.stat().st_size // 4096
    with open(db, "r+b") as f:  # the last page all zeros, as a failing sector reads back
        f.seek((pages - 1) * 4096)
        f.write(b"\0" * 4096)
    before = db.read_bytes()
    done = cli("doctor", "--config", str(config), "--json")
    state = _checks(done)["state_dir"]
    assert done.returncode == 1 and not state["ok"], done.stdout
    assert "is damaged (quick_check:" in state["detail"] and "never delete it" in state["hint"], state
    assert db.read_bytes() == before
