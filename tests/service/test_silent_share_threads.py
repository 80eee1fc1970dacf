"""One equipment's NAS share stops answering (its FUSE daemon SIGSTOPped); the other NAS is a plain folder.

The background NAS probe runs every ``interval_s``, awaited at most
``probe_timeout_s``: a probe of the silent share does not come back, and its
thread stays in the share. Before, each round took another thread of the
loop's default pool (``min(32, cpus + 4)``, shared by every ``to_thread`` of
the process) until the API and the other NAS's jobs waited behind them (about
5 minutes of a silent NAS with the real 30 s + 20 s on a 2-core PC). Here the
round is 0.1 s + 0.3 s.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from exlab_wizard.service import server as server_mod
from exlab_wizard.service.metrics import NasFacts
from tests.fixtures.silent_share import silent_share
from tests.lab import Lab, client_lab, on_share
from tests.service.conftest import serving
from tests.service.test_serve_process import Serve

EQ, OTHER = "CONFOCAL_01", "FACS_02"
INTERVAL_S, PROBE_TIMEOUT_S = 0.1, 0.3


def _calls_in(share: Path) -> list | None:
    try:  # here: the tests also run on the code before the lanes
        from exlab_wizard.sync.transports import share_lanes
    except ImportError:
        return None
    return [call for call in share_lanes.stuck() if call.path == str(share)]


class QuickFacts(NasFacts):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.probe_timeout_s = PROBE_TIMEOUT_S


async def test_a_silent_share_does_not_starve_the_service_of_threads(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(server_mod, "NasFacts", QuickFacts)
    lab = client_lab(tmp_path)
    with silent_share(tmp_path) as (share, freezer):
        cfg = on_share(lab.config(), EQ, share)
        run_b = lab.make_run("Run_B", {"b.bin": b"b" * 5000}, equipment=OTHER)
        async with serving(cfg, lab) as svc:
            try:
                freezer.freeze()
                frozen_at = time.time()
                await asyncio.sleep(6)  # ~15 probe rounds of the silent share
                in_share = _calls_in(share)
                try:
                    answer = await asyncio.wait_for(svc.http.get("/api/equipment"), 5)
                    cards = {card["id"]: card for card in answer.json()["equipment"]}
                except TimeoutError:
                    cards = None
                try:
                    reply = await asyncio.wait_for(svc.post("/api/enqueue", {"run_path": str(run_b)}), 5)
                    row = await svc.wait_state(reply.json()["job_id"], "verified", timeout=20)
                    state = row["state"]
                except TimeoutError:
                    state = "no answer / not verified"
            finally:
                freezer.thaw()
        assert cards is not None, "/api/equipment gave no answer in 5 s while CONFOCAL_01's share was silent"
        assert state == "verified", f"FACS_02's run (a NAS that answers): {state}"
        assert in_share is not None and len(in_share) == 1, f"one probe at a time in the silent share, not {in_share}"
        silent = cards[EQ]
        assert silent["nas_reachable"] is False
        assert silent["nas_silent_since"] is not None and frozen_at - 1 <= silent["nas_silent_since"] <= frozen_at + 1
        assert cards[OTHER]["nas_reachable"] is True and cards[OTHER]["nas_silent_since"] is None


async def test_the_share_answers_again_and_the_probe_says_so(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(server_mod, "NasFacts", QuickFacts)
    lab = client_lab(tmp_path)
    with silent_share(tmp_path) as (share, freezer):
        cfg = on_share(lab.config(), EQ, share)
        async with serving(cfg, lab) as svc:
            try:
                freezer.freeze()
                await asyncio.sleep(1.5)
                during = (await svc.http.get("/metrics")).text
            finally:
                freezer.thaw()
            await asyncio.sleep(1.0)
            cards = {card["id"]: card for card in (await svc.http.get("/api/equipment")).json()["equipment"]}
        silent = re.search(rf'^exlab_nas_silent_since_timestamp_seconds{{equipment="{EQ}"}} (\S+)$', during, re.M)
        assert silent is not None and float(silent.group(1)) > 1.7e9, during
        assert cards[EQ]["nas_reachable"] is True and cards[EQ]["nas_silent_since"] is None


# --------------------------------------------------------------------------- the real process

_QUICK_SERVE = f"""
import sys
from exlab_wizard.service import metrics, server
class Quick(metrics.NasFacts):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.interval_s, self.probe_timeout_s = {INTERVAL_S}, {PROBE_TIMEOUT_S}
server.NasFacts = Quick
from exlab_wizard.cli import main
sys.argv = ["exlab-sync", *sys.argv[1:]]
main()
"""


class QuickServe(Serve):
    """``exlab-sync serve`` whose NAS probe runs every 0.1 s, awaited 0.3 s (instead of 30 s and 20 s)."""

    def __init__(self, config: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _QUICK_SERVE, "serve", "--config", str(config), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.url = self._wait_for_url(30)


def _config(lab: Lab, share: Path, *, bandwidth: dict | None = None) -> Path:
    data = lab.config_data(sync={"backoff_s": [0.1, 0.1], "scan_interval_s": 0.2})
    data["equipment"][0]["transport"]["mount_path"] = str(share)
    if bandwidth is not None:
        data["equipment"][0]["transport"]["bandwidth"] = bandwidth
    return lab.write_config(data)


def _enqueue(serve: Serve, lab: Lab, run: Path) -> str:
    token = (lab.state / "api-token").read_text().strip()
    reply = httpx.post(
        f"{serve.url}/api/enqueue",
        json={"run_path": str(run)},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert reply.status_code == 200, reply.text
    return reply.json()["job_id"]


def _wait_state(serve: Serve, job_id: str, states: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = httpx.get(f"{serve.url}/api/jobs/{job_id}", timeout=10).json()["state"]
        if state in states:
            return state
        time.sleep(0.1)
    return state


@pytest.mark.timeout(120)
def test_real_serve_after_many_probes_of_a_silent_share_still_answers_and_syncs_the_other_nas(
    tmp_path: Path,
) -> None:
    lab = client_lab(tmp_path)
    with silent_share(tmp_path) as (share, freezer):
        run_b = lab.make_run("Run_B", {"b.bin": b"b" * 5000}, equipment=OTHER)
        serve = QuickServe(_config(lab, share))
        try:
            freezer.freeze()
            time.sleep(8)  # ~20 probe rounds: the default pool (6 threads here) was gone after 6
            try:
                httpx.get(f"{serve.url}/api/equipment", timeout=5).json()
                cards = True
            except httpx.TimeoutException:
                cards = False
            try:
                job_id = _enqueue(serve, lab, run_b)
                state = _wait_state(serve, job_id, {"verified", "failed"}, 30)
            except httpx.TimeoutException:
                state = "no answer"
        finally:
            freezer.thaw()
            serve.stop(timeout=30)
        assert cards, "/api/equipment gave no answer in 5 s after 8 s of a silent CONFOCAL_01 share"
        assert state == "verified", f"FACS_02's run on a NAS that answers: {state}"
