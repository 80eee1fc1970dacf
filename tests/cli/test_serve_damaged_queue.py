"""A damaged ``queue.db`` (one 4 KiB page zeroed: a failing sector) stops ``serve`` with one line, never a flood.

``jobs`` and ``cleanup`` said it in one line, but ``serve`` started, printed
its usual lines and then wrote a ``database disk image is malformed``
traceback to the central log at every dispatcher poll (0.05 s, ~17 KB/s,
the log's rotation cap reached in an hour), looking healthy and syncing
nothing for ever. Now a damaged file found at start is one line on stderr
and in the central log, exit 2 (the unit's ``RestartPreventExitStatus=2``);
found while it runs, one line in the log, every loop stops (nothing sent,
nothing deleted), and ``/healthz`` and the dashboard say so (503).
Real files, real pages zeroed, a real ``serve`` process.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import exlab_wizard
from tests.helpers import Clock
from tests.lab import EQ, FILES, Lab, running, synced

SRC = Path(exlab_wizard.__file__).resolve().parents[1]  # the code under test, whichever PYTHONPATH named
PAGE = 4096
DAMAGED = "is damaged (database disk image is malformed)"


def _synced_lab(tmp_path: Path, **sections: object) -> tuple[Lab, Path, Path]:
    """A lab whose one run is synced and verified by a real client; the config file for ``serve``."""
    lab = Lab.build(tmp_path, equipment=(EQ,))
    run = lab.make_run("Run_1", files=FILES)

    async def sync() -> None:
        async with running(lab.config(), Clock()) as client:
            await synced(client, run)

    asyncio.run(sync())
    data = lab.config_data(sync={"backoff_s": [0.1, 0.1], "scan_interval_s": 0.2}, **sections)
    return lab, run, lab.write_config(data)


def _zero_page(db: Path, page: int) -> None:
    """Page ``page`` (1-based) of the file all zeros, as a failing sector reads back."""
    with open(db, "r+b") as f:
        f.seek((page - 1) * PAGE)
        f.write(b"\0" * PAGE)
        os.fsync(f.fileno())


def _serve(config: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(SRC), NO_COLOR="1")
    return subprocess.Popen(
        [sys.executable, "-m", "exlab_wizard", "serve", "--port", "0", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def _get(url: str) -> tuple[int, str]:
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with direct.open(url, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _central_log(lab: Lab) -> str:
    return (lab.state / "exlab-sync.log").read_text(errors="replace")


def test_serve_refuses_to_start_on_a_damaged_queue(tmp_path: Path) -> None:
    lab, _run, config = _synced_lab(tmp_path)
    _zero_page(lab.state / "queue.db", 2)  # the jobs table's first page
    proc = _serve(config)
    try:
        out, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    log = _central_log(lab)
    tracebacks = log.count("database disk image is malformed")
    assert "malformed" in err, (
        f"serve said nothing (rc {proc.returncode}, stdout {out[-200:]!r}, stderr {err[-200:]!r}); "
        f"{tracebacks} tracebacks in the central log in 15 s"
    )
    assert proc.returncode == 2, f"exit {proc.returncode}: the unit restarts anything but 2 every 10 s"
    assert "listening on" not in out, f"serve started over a damaged queue: {out!r}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and DAMAGED in lines[0], err
    assert "move the file aside or put back a backup" in lines[0], err
    assert log.count(DAMAGED) == 1 and "Traceback" not in log, log[-3000:]


def _sector_fails_under(db: Path, job_id: str) -> None:
    """Page 2 (the jobs table) of the file zeroed under a running serve, which then reads the file again.

    The pages are checkpointed into the file first (else the WAL's good copy of the page hides the
    damage); another program's write (a CLI beside serve recording a note) then makes every
    connection of serve drop its page cache and read the file.
    """
    other = sqlite3.connect(db, isolation_level=None)
    try:
        assert other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0, "serve held the WAL"
        _zero_page(db, 2)
        other.execute(
            "INSERT INTO events (job_id, at, kind, detail) VALUES (?, ?, 'note', 'a note from beside serve')",
            (job_id, Clock()().isoformat(timespec="microseconds")),
        )
    finally:
        other.close()
    with pytest.raises(sqlite3.DatabaseError, match="malformed"):
        sqlite3.connect(db).execute("SELECT * FROM jobs").fetchall()


def test_damage_found_while_serving_is_said_once_and_nothing_is_deleted(tmp_path: Path) -> None:
    cleanup = {"enabled": True, "min_verify_passes": 1, "min_age_hours": 0, "retain_cache": True}
    lab, run, config = _synced_lab(tmp_path, nas_cleanup=cleanup)
    job_id = lab.job(run).id
    marker = lab.mount_path() / ".exlab-nas"
    marker.unlink()  # the NAS unmounted: the reaper waits, the verified run stays for now
    proc = _serve(config)
    try:
        line = proc.stdout.readline()
        assert "listening on" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        base = line.split("listening on ")[1].split()[0]
        time.sleep(0.5)  # the loops run: dispatcher polls, reaper passes that find the NAS away
        _sector_fails_under(lab.state / "queue.db", job_id)
        marker.write_text("mounted\n")  # the NAS is back: a reaper that went on would delete the run now
        time.sleep(3)  # 15 reaper intervals, 60 dispatcher polls
        health_status, health = _get(f"{base}/healthz")
        page_status, page = _get(f"{base}/")
        jobs_status, jobs = _get(f"{base}/api/jobs")
        log = _central_log(lab)
        assert proc.poll() is None, f"serve ended: {proc.returncode}"
    finally:
        proc.terminate()
        proc.wait(15)
    err = proc.stderr.read()

    assert all((run / rel).read_bytes() == data for rel, data in FILES.items()), (
        "the reaper deleted verified local data while the queue was known damaged"
    )
    assert log.count(DAMAGED) == 1, log[-3000:]
    assert "Traceback" not in log and log.count(" ERROR ") == 1, f"not one line but a flood: {log[-3000:]}"
    assert err.count(DAMAGED) == 1 and "Traceback" not in err, f"the journal: {err[-2000:]!r}"
    body = json.loads(health)
    assert health_status == 503 and body["ok"] is False, (health_status, body)
    assert body["queue_damaged"]["kind"] == "corrupt" and DAMAGED in body["queue_damaged"]["detail"], body
    assert page_status == 503 and DAMAGED in page, (page_status, page[:500])
    assert jobs_status == 503 and json.loads(jobs)["kind"] == "queue_damaged", (jobs_status, jobs)
