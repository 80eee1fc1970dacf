"""Hard links: one inode twice in a run, and one inode in two runs: each run is cleaned, every byte stays on the NAS."""

from __future__ import annotations

import os
from pathlib import Path

from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock
from tests.lab import Lab, cleanup_config, ready, running

S = SyncJobState


async def test_hard_links(tmp_path: Path) -> None:
    lab = Lab.build(tmp_path)
    clock = Clock()
    a = lab.make_run("Run_2026-01-01", files={"a/x.bin": b"x" * 5000, "y.bin": b"y" * 10})
    os.link(a / "a/x.bin", a / "b.bin")  # twice in one run
    b = lab.make_run("Run_2026-01-02", files={"z.bin": b"z" * 10})
    os.link(a / "y.bin", b / "shared.bin")  # one inode in two runs
    async with running(cleanup_config(lab), clock) as client:
        await ready(client, clock, a)
        await ready(client, clock, b)
        await client.cleanup_once()
        ja, jb = await client.job(a), await client.job(b)
        assert (ja.state, jb.state) == (S.CLEANED, S.CLEANED), (ja.last_error, jb.last_error)
        nas = lab.nas_copy(a)
        assert (nas / "b.bin").read_bytes() == b"x" * 5000 and (
            lab.nas_copy(b) / "shared.bin"
        ).read_bytes() == b"y" * 10
