"""``exlab-sync demo --serve`` as a real process: the demo lab synced by a running service, login, SIGTERM."""

from __future__ import annotations

import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

EXE = str(Path(sys.executable).with_name("exlab-sync"))


def _start(base: Path, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [EXE, "demo", "--serve", "--dir", str(base), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _login_url(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    """The login address the demo prints (the lab is built first: a few seconds)."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        if sel.select(timeout=0.2):
            line = proc.stdout.readline()
            seen.append(line)
            if "/login?code=" in line:
                return line.split()[-1]
            if not line and proc.poll() is not None:
                break
    proc.kill()
    raise AssertionError(f"no login address: {''.join(seen)} {proc.stderr.read()}")


def _stop(proc: subprocess.Popen[str]) -> tuple[int, float]:
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=10), time.monotonic() - started
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("demo --serve did not exit within 10 s of SIGTERM") from None


def test_demo_serve_syncs_the_lab_logs_in_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc = _start(tmp_path / "demo", 0)
    try:
        login = _login_url(proc)
        base = login.split("/login?", 1)[0]
        assert base.startswith("http://127.0.0.1:")
        assert httpx.get(f"{base}/healthz").status_code == 200
        reply = httpx.get(login, follow_redirects=False)
        assert reply.status_code == 303
        cookie = reply.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            jobs = httpx.get(f"{base}/api/jobs").json()["jobs"]
            if len(jobs) == 4 and all(job["state"] == "verified" for job in jobs):
                break
            time.sleep(0.2)
        assert sorted(job["state"] for job in jobs) == ["verified"] * 4, jobs
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the finished, gate-blocked run: shown by the watcher
            blocked = httpx.get(f"{base}/api/watcher").json()["blocked"]
            if blocked:
                break
            time.sleep(0.2)
        assert [Path(b["run_path"]).name for b in blocked] == ["Run_2026-11-03_1410"]
        code, took = _stop(proc)
        assert code == 0 and took < 10, (code, took, proc.stderr.read())
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_demo_serve_takes_a_free_port_when_the_asked_one_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        proc = _start(tmp_path / "demo", busy)
        try:
            login = _login_url(proc)
            port = int(login.split("/login?", 1)[0].rsplit(":", 1)[1])
            assert port not in (busy, 0)
            assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
            code, _took = _stop(proc)
            assert code == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
