"""``exlab-sync serve`` as a real process: start, one per state_dir, SIGTERM mid-transfer, resume."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from exlab_wizard.sync.queue import JobQueue
from tests.lab import Lab

EXE = str(Path(sys.executable).with_name("exlab-sync"))


def write_config(lab: Lab, *, upload_mbps: float | None = None) -> Path:
    bandwidth = {"upload_mbps": upload_mbps} if upload_mbps is not None else {"upload_mbps": None}
    config = {
        "equipment": [
            {
                "id": "CONFOCAL_01",
                "local_root": str(lab.local_root),
                "transport": {"type": "mount", "mount_path": str(lab.nas / "CONFOCAL_01"), "bandwidth": bandwidth},
            }
        ],
        "sync": {"backoff_s": [0.1, 0.1], "scan_interval_s": 0.2},
        "state_dir": str(lab.state),
    }
    path = lab.root / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


class Serve:
    def __init__(self, config: Path):
        self.proc = subprocess.Popen(
            [EXE, "serve", "--config", str(config), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.url = self._wait_for_url(30)

    def _wait_for_url(self, timeout: float) -> str:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sel.select(timeout=0.2):
                line = self.proc.stdout.readline()
                if "listening on " in line:
                    return line.split("listening on ", 1)[1].split()[0]
                if not line and self.proc.poll() is not None:
                    break
        self.proc.kill()
        raise AssertionError(f"serve did not start: {self.proc.stderr.read()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> tuple[int, float]:
        started = time.monotonic()
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"serve did not exit within {timeout} s of the signal") from None
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    (tmp_path / "nas" / "CONFOCAL_01").mkdir(parents=True)
    (tmp_path / "nas" / "CONFOCAL_01" / ".exlab-nas").write_text("mounted\n")
    (tmp_path / "lab").mkdir()
    return Lab(tmp_path, tmp_path / "lab", tmp_path / "nas", tmp_path / "state")


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".exlab-tmp-" in p.name or p.name.endswith(".tmp")]


def test_one_serve_per_state_dir_and_the_cli_works_beside_it(lab: Lab) -> None:
    config = write_config(lab)
    serve = Serve(config)
    try:
        second = subprocess.run(
            [EXE, "serve", "--config", str(config), "--port", "0"],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "already runs the workers" in lines[0], second.stderr
        assert "Traceback" not in second.stderr
        run = lab.make_run()
        enqueue = subprocess.run(
            [EXE, "enqueue", str(run), "--config", str(config)], check=False, capture_output=True, text=True, timeout=60
        )
        assert enqueue.returncode == 0, enqueue.stderr
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # serve, the lease holder, syncs what the CLI queued
            jobs = httpx.get(f"{serve.url}/api/jobs").json()["jobs"]
            if jobs and jobs[0]["state"] == "verified":
                break
            time.sleep(0.1)
        assert jobs[0]["state"] == "verified"
        listed = subprocess.run(
            [EXE, "jobs", "--config", str(config)],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "250"},
        )
        assert listed.returncode == 0 and jobs[0]["id"][:8] in listed.stdout and "verified" in listed.stdout
        code, _took = serve.stop()
        assert code == 0
    finally:
        serve.kill()


def test_sigterm_mid_transfer_exits_in_time_and_the_next_start_resumes(lab: Lab) -> None:
    run = lab.make_run(files={"stack.tif": os.urandom(24 * 1024 * 1024)})
    serve = Serve(write_config(lab, upload_mbps=16))  # ~2 MB/s: the transfer takes a dozen seconds
    try:
        token = (lab.state / "api-token").read_text().strip()
        reply = httpx.post(
            f"{serve.url}/api/enqueue", json={"run_path": str(run)}, headers={"Authorization": f"Bearer {token}"}
        )
        job_id = reply.json()["job_id"]
        deadline = time.monotonic() + 30
        done = 0
        while time.monotonic() < deadline and done < 1024 * 1024:
            progress = httpx.get(f"{serve.url}/api/jobs/{job_id}").json()["progress"]
            done = progress["bytes_done"] if progress and progress["phase"] == "transfer" else 0
            time.sleep(0.05)
        assert 1024 * 1024 <= done < 20 * 1024 * 1024, done  # in the middle of the transfer
        code, took = serve.stop(signal.SIGTERM)
        print(f"SIGTERM mid-transfer: exit {code} after {took:.2f} s")
        assert code == 0 and took < 10, (code, took)
        assert temp_files(lab.nas) == []
        queue = JobQueue(lab.state / "queue.db")
        assert queue.get(job_id).state.value in ("queued", "running")  # durable, not failed
        queue.close()
    finally:
        serve.kill()
    serve = Serve(write_config(lab))  # next start, the limit lifted
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            row = httpx.get(f"{serve.url}/api/jobs/{job_id}").json()
            if row["state"] in ("verified", "failed"):
                break
            time.sleep(0.1)
        assert row["state"] == "verified", row
        assert [j["id"] for j in httpx.get(f"{serve.url}/api/jobs").json()["jobs"]] == [job_id]
        assert (lab.nas_copy(run) / "stack.tif").read_bytes() == (run / "stack.tif").read_bytes()
        assert temp_files(lab.nas) == [] and temp_files(run) == []
        code, _took = serve.stop(signal.SIGINT)
        assert code == 0
    finally:
        serve.kill()


def test_serve_caps_glibcs_malloc_arenas_in_a_fresh_process() -> None:
    # The soak's memory check relies on it: without the cap each new worker thread may open an
    # arena that grows to its working size late in a run, a step the check reads as growth.
    import subprocess
    import sys

    code = (
        "import ctypes\n"
        "from exlab_wizard.service.server import SERVE_MALLOC_ARENAS, cap_malloc_arenas\n"
        "print(cap_malloc_arenas(), SERVE_MALLOC_ARENAS)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "2"], out
