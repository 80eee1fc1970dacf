"""Fixtures for the service: the real app served by uvicorn on 127.0.0.1 (a free port), over a mount lab."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from exlab_wizard.config import Config
from exlab_wizard.service.server import ServiceInfo, run_service
from tests.client.conftest import Lab


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    local = tmp_path / "lab"
    nas = tmp_path / "nas"
    for eq in ("CONFOCAL_01", "FACS_02"):
        (nas / eq).mkdir(parents=True)
        (nas / eq / ".exlab-nas").write_text("mounted\n")
    local.mkdir()
    return Lab(tmp_path, local, nas, tmp_path / "state")


@dataclass
class Service:
    info: ServiceInfo
    config: Config
    lab: Lab
    http: httpx.AsyncClient

    @property
    def url(self) -> str:
        return self.info.base_url

    @property
    def token(self) -> str:
        return (self.config.state_dir / "api-token").read_text().strip()

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def post(self, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        headers = {**self.auth, **kwargs.pop("headers", {})}
        return await self.http.post(path, json=body, headers=headers, **kwargs)

    async def wait_state(self, job_id: str, state: str, timeout: float = 20.0) -> dict[str, Any]:
        async def poll() -> dict[str, Any]:
            while True:
                row = (await self.http.get(f"/api/jobs/{job_id}")).json()
                if row.get("state") == state:
                    return row
                await asyncio.sleep(0.05)

        return await asyncio.wait_for(poll(), timeout)


@contextlib.asynccontextmanager
async def serving(config: Config, lab: Lab) -> AsyncIterator[Service]:
    stop = asyncio.Event()
    ready: asyncio.Future[ServiceInfo] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_service(config, host="127.0.0.1", port=0, stop=stop, install_signals=False,
                                           on_ready=ready.set_result, facts_interval_s=0.1))  # fmt: skip
    done, _ = await asyncio.wait({task, ready}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises the start-up failure
    info = ready.result()
    async with httpx.AsyncClient(base_url=info.base_url, timeout=20) as http:
        try:
            yield Service(info, config, lab, http)
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)


@pytest.fixture
async def service(lab: Lab) -> AsyncIterator[Service]:
    async with serving(lab.config(), lab) as svc:
        yield svc
