"""Two restores of one run at once: the second is told "busy"; it no longer sweeps the first's scratch away.

Found by review: a second ``exlab-sync restore`` of a run took the first's
``.exlab-wizard/.restore-*`` folder (where the NAS copies are fetched) for one
left by a killed restore and deleted it; the first then ended (exit 2) with a
FileNotFoundError and no event. Now a restore holds the run's restore lock
(``flock`` on ``.exlab-wizard/``) from its scratch folder's making to its
removal; another restore meanwhile gets ``RestoreError("busy")``, nothing
changed, and the first finishes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from exlab_wizard.sync.recovery import RestoreError
from exlab_wizard.sync.remote import RemoteAccess
from exlab_wizard.sync.states import SyncJobState
from tests.client.test_local_damage import DAMAGED, EQ, FILES, Lab, Nas, failed_local_damage, running
from tests.helpers import Clock

S = SyncJobState


async def test_a_second_restore_meanwhile_is_busy_and_the_first_finishes(lab: Lab, monkeypatch: Any) -> None:
    clock = Clock()
    cfg = Nas("mount", lab, {"type": "mount", "mount_path": str(lab.nas / EQ)}, lab.nas / EQ).config()
    run = lab.make_run(files=FILES)
    async with running(cfg, clock) as client:
        await failed_local_damage(client, clock, run)
        real_fetch = RemoteAccess.fetch
        fetching, go_on = asyncio.Event(), asyncio.Event()

        async def slow_fetch(self: RemoteAccess, run_path: Path, paths: Any, into: Path) -> Any:
            fetching.set()
            await go_on.wait()  # the first restore is fetching into its scratch folder
            return await real_fetch(self, run_path, paths, into)

        monkeypatch.setattr(RemoteAccess, "fetch", slow_fetch)
        first = asyncio.create_task(client.restore(run))
        await asyncio.wait_for(fetching.wait(), 30)
        monkeypatch.setattr(RemoteAccess, "fetch", real_fetch)
        with pytest.raises(RestoreError, match="another restore") as busy:
            await client.restore(run)
        assert busy.value.kind == "busy"
        go_on.set()
        result = await asyncio.wait_for(first, 30)
        assert result.ok and result.restored == (DAMAGED,) and result.state == S.VERIFIED, result
        assert (run / DAMAGED).read_bytes() == FILES[DAMAGED]
        assert not list((run / ".exlab-wizard").glob(".restore-*"))  # the scratch is gone, and the lock with it
        again = await client.restore(run)  # nothing left to restore: a third restore runs (not busy)
        assert again.ok and again.restored == ()
