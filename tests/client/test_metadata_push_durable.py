"""The push of the refreshed ``.exlab-wizard/`` after a verification is part of the job.

``enqueue --wait`` returns only after it; a push interrupted (the process
killed) stays recorded and the next client sends it; cleanup waits for it; a
cancelled push is never logged as a success.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from exlab_wizard.sync.transports.mount import MountTransport
from tests.fixtures.sshd import kill_tree
from tests.helpers import EXE, cli
from tests.lab import EQ, Site, make_client

BIG = os.urandom(24 * 1024 * 1024)


def nas_has_the_evidence(site: Site, run: Path) -> None:
    """The NAS copy holds this verification's checksums.sha256, and its creation.json says synced."""
    meta, nas_meta = run / ".exlab-wizard", site.nas_copy(run) / ".exlab-wizard"
    assert (nas_meta / "checksums.sha256").is_file(), sorted(p.name for p in nas_meta.iterdir())
    assert (nas_meta / "checksums.sha256").read_bytes() == (meta / "checksums.sha256").read_bytes()
    assert json.loads((nas_meta / "creation.json").read_text())["sync_status"] == "synced"
    assert (nas_meta / "creation.json").read_bytes() == (meta / "creation.json").read_bytes()


def test_enqueue_wait_returns_only_after_the_metadata_push(site: Site) -> None:
    run = site.make_run(files={"image.tif": b"\x01" * 5000}, meta={"acquisition.log": BIG})
    config = site.write_config()
    out = cli("enqueue", "--wait", str(run), "--config", str(config))
    assert out.returncode == 0, out.stdout + out.stderr
    nas_has_the_evidence(site, run)
    assert (site.nas_copy(run) / ".exlab-wizard" / "acquisition.log").read_bytes() == BIG
    job = site.job(run)
    assert not job.metadata_push_pending
    assert [e.kind for e in job.events][-1] == "metadata_pushed"


def _wait_for_line(site: Site, event: str, needle: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not any(needle in line for line in site.log_lines(event)):
        assert proc.poll() is None, "the command ended before its metadata push began"
        assert time.monotonic() < deadline, f"no {event} {needle} in the equipment log"
        time.sleep(0.01)


@pytest.mark.parametrize("site", ["mount"], indirect=True)  # mount sends every byte again: a push to kill in the middle
def test_a_metadata_push_killed_mid_way_blocks_cleanup_and_is_sent_by_the_next_client(site: Site) -> None:
    big = BIG[: 4 * 1024 * 1024]
    run = site.make_run(files={"image.tif": b"\x02" * 5000}, meta={"acquisition.log": big})
    # ~1 s per push of the big file: the kill lands inside the metadata push.
    slow = site.write_config(
        bandwidth={"upload_mbps": 32},
        cleanup={"enabled": True, "min_verify_passes": 1, "min_age_hours": 0, "retain_cache": True},
    )
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    proc = subprocess.Popen(
        [EXE, "enqueue", "--wait", str(run), "--config", str(slow)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_line(site, "push_start", "scope=.exlab-wizard", proc)
        time.sleep(0.3)
        assert proc.poll() is None
    finally:
        kill_tree(proc.pid)
        proc.wait()
    job = site.job(run)
    assert job.state.value == "verified" and job.metadata_push_pending, [e.detail for e in job.events]
    assert not site.log_lines("metadata_pushed")

    # A cleanup pass must not free the local copy while the NAS copy lacks its evidence.
    out = cli("cleanup", "--config", str(slow))
    assert "metadata push to the NAS pending" in out.stdout, out.stdout + out.stderr
    assert (run / "image.tif").read_bytes() == b"\x02" * 5000

    async def next_client() -> None:
        client = make_client(site.config())
        await client.init()
        try:
            await client.wait_idle(timeout=60)
        finally:
            await client.close()

    asyncio.run(next_client())
    nas_has_the_evidence(site, run)
    assert (site.nas_copy(run) / ".exlab-wizard" / "acquisition.log").read_bytes() == big
    job = site.job(run)
    assert not job.metadata_push_pending and job.events[-1].kind == "metadata_pushed"


async def test_a_cancelled_mount_push_is_never_logged_as_a_success(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from exlab_wizard.config.models import EquipmentConfig
    from exlab_wizard.sync.equipment_log import EquipmentLog

    nas = tmp_path / "nas"
    nas.mkdir()
    (nas / ".exlab-nas").write_text("mounted\n")
    equipment = EquipmentConfig.model_validate(
        {"id": EQ, "local_root": str(tmp_path / "lab"), "transport": {"type": "mount", "mount_path": str(nas)}}
    )
    run = tmp_path / "lab" / EQ / "P" / "Runs" / "Run_1"
    (run / ".exlab-wizard").mkdir(parents=True)
    for n in range(20):
        (run / ".exlab-wizard" / f"log{n}.txt").write_text("x" * 100)
    log = EquipmentLog(equipment)
    transport = MountTransport(equipment, log=log)
    reached, release = threading.Event(), threading.Event()
    real = MountTransport._remove_stale

    def held(self: MountTransport, job: Any, stale: Any) -> None:
        reached.set()
        release.wait(10)  # the push thread sits here while its caller is cancelled
        real(self, job, stale)

    monkeypatch.setattr(MountTransport, "_remove_stale", held)
    task = asyncio.ensure_future(transport.push_metadata(run, bwlimit_kibps=None))
    assert await asyncio.to_thread(reached.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    deadline = time.monotonic() + 10
    text = ""
    while "push_cancelled" not in text and "push_end" not in text and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        text = log.path.read_text() if log.path.exists() else ""
    assert "push_end" not in text, text
    assert "push_cancelled" in text and "scope=.exlab-wizard" in text
    remote = nas / "P" / "Runs" / "Run_1" / ".exlab-wizard"
    assert not remote.exists() or not any(name.endswith(".txt") for name in os.listdir(remote))


async def test_a_client_closed_during_its_metadata_push_leaves_it_to_the_next_client(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    from exlab_wizard.sync.transports import make_transport

    run = site.make_run(files={"image.tif": b"\x03" * 5000})
    config = site.config()
    transport_class = type(make_transport(config.equipment_by_id(EQ)))
    started = asyncio.Event()

    async def stuck(self: Any, run_path: Path, **kwargs: Any) -> Any:
        started.set()
        await asyncio.Event().wait()  # a NAS that stops answering in the middle of the push

    with monkeypatch.context() as patch:
        patch.setattr(transport_class, "push_metadata", stuck)
        client = make_client(config)
        client.close_push_timeout_s = 0.2
        await client.init()
        try:
            await client.enqueue(run)
            await asyncio.wait_for(started.wait(), 30)
        finally:
            await client.close()
    job = site.job(run)
    assert job.state.value == "verified" and job.metadata_push_pending
    assert not (site.nas_copy(run) / ".exlab-wizard" / "checksums.sha256").exists()
    assert any("metadata_push_interrupted" in line for line in site.log_lines("metadata_push_interrupted"))

    client = make_client(config)
    await client.init()
    try:
        await client.wait_idle(timeout=60)
    finally:
        await client.close()
    nas_has_the_evidence(site, run)
    job = site.job(run)
    assert not job.metadata_push_pending and job.events[-1].kind == "metadata_pushed"
