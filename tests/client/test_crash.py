"""SIGKILL mid-transfer: a new client on the same queue finishes the job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from exlab_wizard.sync.states import SyncJobState
from tests.lab import Lab, make_client

CHILD = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from exlab_wizard.config import parse_config
    from exlab_wizard.sync.nas_client import client_from_config

    async def main():
        config = parse_config(json.loads(Path(sys.argv[1]).read_text()))
        client = client_from_config(config)
        await client.init()
        await client.enqueue(Path(sys.argv[2]))
        print("enqueued", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


def _temp_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if "exlab-tmp" in p.name]


async def test_sigkill_mid_transfer_then_a_new_client_finishes(lab: Lab) -> None:
    big = os.urandom(1 << 20) * 24  # 24 MiB
    run = lab.make_run(files={"stack.tif": big, "small/a.txt": b"a" * 100})
    throttled = lab.config().model_dump(mode="json", by_alias=True)
    for equipment in throttled["equipment"]:
        equipment["transport"]["bandwidth"] = {"upload_mbps": 40, "schedule": []}  # ~4.8 MiB/s
    config_file = lab.root / "throttled.json"
    config_file.write_text(json.dumps(throttled))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(config_file), str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    nas_run = lab.nas_copy(run)
    try:
        deadline = time.monotonic() + 30
        sent = 0
        while time.monotonic() < deadline:
            temps = _temp_files(nas_run) if nas_run.exists() else []
            sent = sum(os.path.getsize(t) for t in temps if os.path.exists(t))
            if sent > 3 << 20:
                break
            assert child.poll() is None, child.stderr.read().decode()
            time.sleep(0.05)
        assert sent > 3 << 20, "the transfer never started"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert _temp_files(nas_run), "killed mid-transfer: a partial temp file should be there"

    client = make_client(lab.config())
    before = None
    await client.init()
    try:
        rows = await client.jobs()
        assert len(rows) == 1
        before = rows[0].id
        await client.wait_idle(timeout=60)
        row = await client.job(run)
    finally:
        await client.close()
    assert row.id == before
    assert row.state == SyncJobState.VERIFIED, row.last_error
    assert any("recovered" in e.detail for e in row.events)
    assert (nas_run / "stack.tif").read_bytes() == big
    assert _temp_files(nas_run) == []
