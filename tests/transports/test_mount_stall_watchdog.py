"""The mount transport's stall watchdog, with a push that blocks as in a share that stopped answering.

No FUSE here (tests/client/test_silent_share.py has the real thing): ``_push``
is replaced by one that blocks until released, as a write into a silent share
does. The stall limit is lowered to half a second.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from exlab_wizard.config import parse_config
from exlab_wizard.sync.transports import NasNotAnswering, TransportErrorKind, TransportResult, make_transport
from exlab_wizard.sync.transports import mount as mount_mod
from tests.lab import Lab


async def test_a_push_that_stops_progressing_is_given_up_and_nothing_more_starts_until_it_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mount_mod, "STALL_TIMEOUT_S", 0.5, raising=False)
    lab = Lab.build(tmp_path / "lab", equipment=("CONFOCAL_01",))
    transport = make_transport(parse_config(lab.config_data()).equipment[0])
    run = lab.make_run("Run_A", {"a.bin": b"a" * 100})
    release = threading.Event()
    calls: list[tuple[str, float]] = []
    aborts: list[threading.Event] = []

    def blocking_push(self, run_path, bwlimit, rewrite, progress, abort, *args, **kwargs):
        calls.append(("start", time.monotonic()))
        aborts.append(abort)
        if len(calls) == 1:
            release.wait(30)  # the first push: blocked in the silent share
        calls.append(("end", time.monotonic()))
        return TransportResult(ok=True, files_sent=0, bytes_sent=0)

    monkeypatch.setattr(mount_mod.MountTransport, "_push", blocking_push)
    started = time.monotonic()
    with pytest.raises(NasNotAnswering) as raised:
        await transport.push(run, bwlimit_kibps=None)
    assert raised.value.kind is TransportErrorKind.NETWORK
    assert raised.value.message == f"{transport.mount_path} has not answered for 0.5 s"
    assert time.monotonic() - started < 5
    assert aborts[0].is_set(), "the given-up push was not told to stop"

    probed = time.monotonic()
    assert await transport.reachable(run) is False  # the probe does not wait behind the blocked push
    assert time.monotonic() - probed < 0.4

    second = asyncio.ensure_future(transport.push(run, bwlimit_kibps=None))
    await asyncio.sleep(0.3)
    assert [c for c, _ in calls] == ["start"], "a second push started while the first was still in the share"
    release.set()
    result = await asyncio.wait_for(second, 10)
    assert result.ok
    assert [c for c, _ in calls] == ["start", "end", "start", "end"], calls
