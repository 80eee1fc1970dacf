"""A starting ``serve`` removes a stale ``service-url`` before it holds the runner lease for good.

The file was removed only after ``client.init()``: once the client took the
lease (and while it recovered the queue), a ``service-url`` left by a killed
serve whose pid this one now has (pid reuse after a reboot, or ``run_service``
run again in one process) passed login-url's check ("the pid that wrote it
holds the lease") and the token went to the old address, whose port may be
anyone's. Now the probe removes it while it holds the lease, before anything
else takes it.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from exlab_wizard.config import load_config
from exlab_wizard.service.server import NoService, ServiceInfo, run_service, running_service_url, service_url_path
from exlab_wizard.sync.nas_client import client_from_config
from tests.lab import Lab
from tests.service.test_serve_process import write_config


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    (tmp_path / "nas" / "CONFOCAL_01").mkdir(parents=True)
    (tmp_path / "nas" / "CONFOCAL_01" / ".exlab-nas").write_text("mounted\n")
    (tmp_path / "lab").mkdir()
    return Lab(tmp_path, tmp_path / "lab", tmp_path / "nas", tmp_path / "state")


def test_login_url_finds_no_stale_address_once_the_client_holds_the_lease(lab: Lab) -> None:
    config = load_config(write_config(lab))
    lab.state.mkdir(parents=True)
    stale = "http://127.0.0.1:1"  # a dead serve's port: anyone's now
    service_url_path(lab.state).write_text(f"{stale} {os.getpid()}\n")  # its pid: this one's, as after a reboot
    client = client_from_config(config)
    real_init = client.init
    seen: list[str] = []

    async def init(**kw) -> None:
        await real_init(**kw)  # the lease is the client's from here on
        try:
            seen.append(running_service_url(config))
        except NoService as exc:
            seen.append(exc.kind)

    client.init = init  # type: ignore[method-assign]

    async def scenario() -> None:
        stop = asyncio.Event()

        def ready(_info: ServiceInfo) -> None:
            stop.set()

        await asyncio.wait_for(
            run_service(config, port=0, stop=stop, install_signals=False, client=client, on_ready=ready), 30
        )

    asyncio.run(scenario())
    assert seen == ["missing"], f"login-url would have sent the token to {seen[0]!r}, a dead serve's address"
