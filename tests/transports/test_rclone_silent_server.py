"""The reaper's last look (``remote_stats``) through rclone into a server that stops answering.

``rclone serve s3`` (or the sshd under rclone sftp) is SIGSTOPped: the TCP
connection stays open, no byte comes back. The look ends with a
``NETWORK`` error in bounded time (the listing's stall limit, lowered to
seconds here), never an empty listing and never a wait for ever.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from exlab_wizard.config import parse_config
from exlab_wizard.sync.transports import TransportError, TransportErrorKind, make_transport
from exlab_wizard.sync.transports import rclone as rclone_mod
from tests.fixtures.rclone_serve import S3Server, find_rclone
from tests.lab import Lab, rclone_s3_equipment

STALL_S = 5.0


async def _last_look(transport, run: Path) -> tuple[object, float]:
    started = time.monotonic()
    try:
        outcome: object = await asyncio.wait_for(transport.remote_stats(run), 120)
    except TransportError as exc:
        outcome = exc
    except TimeoutError:
        outcome = "still waiting after 120 s"
    return outcome, time.monotonic() - started


@pytest.mark.timeout(300)
async def test_last_look_into_a_silent_s3_server_ends_in_bounded_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rclone_mod, "STALL_TIMEOUT_S", STALL_S, raising=False)
    server = S3Server(find_rclone(), tmp_path / "s3").start()
    stopped = False
    try:
        lab = Lab.build(tmp_path / "lab", equipment=("CONFOCAL_01",))
        conf = tmp_path / "rclone.conf"
        conf.write_text(server.config_text("labs3"))

        class _S3:
            bucket = server.bucket

        data = lab.config_data()
        data["equipment"] = rclone_s3_equipment(lab, _S3, lambda: conf, "p")
        cfg = parse_config(data)
        run = lab.make_run("Run_A", {"a.bin": b"a" * 100})
        transport = make_transport(cfg.equipment[0])
        await transport.push(run, bwlimit_kibps=None)
        assert await transport.remote_stats(run)
        os.kill(server.proc.pid, signal.SIGSTOP)
        stopped = True
        outcome, took = await _last_look(transport, run)
    finally:
        if stopped:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()
    assert isinstance(outcome, TransportError) and took < 60, (outcome, took)
    assert outcome.kind == TransportErrorKind.NETWORK, outcome


@pytest.mark.timeout(300)
async def test_last_look_over_sftp_into_a_silent_nas_ends_in_bounded_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sshd_factory, remote_dir: Path, rclone_sftp_config
) -> None:
    """The sshd (listener and sessions) SIGSTOPped: TCP stays up, no byte comes back."""
    from tests.fixtures.sshd import kill_tree

    monkeypatch.setattr(rclone_mod, "STALL_TIMEOUT_S", STALL_S, raising=False)
    server = sshd_factory()
    lab = Lab.build(tmp_path / "lab", equipment=("CONFOCAL_01",))
    data = lab.config_data()
    conf = rclone_sftp_config(server, remote_sha256=True)
    data["equipment"][0]["transport"] = {
        "type": "rclone",
        "rclone_remote": "labsftp",
        "rclone_remote_path": str(remote_dir),
        "rclone_config": str(conf),
    }
    cfg = parse_config(data)
    run = lab.make_run("Run_A", {"a.bin": b"a" * 100})
    transport = make_transport(cfg.equipment[0])
    await transport.push(run, bwlimit_kibps=None)
    assert await transport.remote_stats(run)
    kill_tree(server.proc.pid, signal.SIGSTOP)
    try:
        outcome, took = await _last_look(transport, run)
    finally:
        kill_tree(server.proc.pid, signal.SIGCONT)
    assert isinstance(outcome, TransportError) and took < 60, (outcome, took)
    assert outcome.kind == TransportErrorKind.NETWORK, outcome
