"""A NAS share that stops answering instead of failing.

The FUSE daemon of the share (exfat-fuse over a loop image: the lab's NAS)
is SIGSTOPped: every syscall on the mount then blocks, as on a hard-mounted
NFS share whose server went silent or an SMB/sshfs mount over a half-open
TCP connection. A second equipment's NAS is a plain folder and keeps
answering. Every test SIGCONTs the daemon before it ends. The time limits
(the reaper's look, the mount transport's stall watchdog) are lowered to
seconds.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from exlab_wizard.sync import remote as remote_mod
from exlab_wizard.sync.policy.cleanup import CleanupCode
from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports import mount as mount_mod
from tests.fixtures.silent_share import silent_share
from tests.helpers import Clock
from tests.lab import EQ, MARKER, cleanup_config, client_lab, on_share, retry_now, running, synced

S = SyncJobState
OTHER = "FACS_02"


async def _until(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred():
            return True
        await asyncio.sleep(0.2)
    return False


async def _is(client, run: Path, state: SyncJobState) -> bool:
    return (await client.job(run)).state == state


async def _not(client, run: Path, state: SyncJobState) -> bool:
    return (await client.job(run)).state != state


async def test_push_into_a_silent_share_ends_and_the_other_nas_keeps_moving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CONFOCAL_01's share stops answering before its push; FACS_02's NAS answers.

    FACS_02's runs still reach VERIFIED, and CONFOCAL_01's job does not stay
    RUNNING for ever: the stall watchdog ends it with a reason naming the
    silent share; once the share answers again it is VERIFIED, no temp left.
    """
    monkeypatch.setattr(mount_mod, "STALL_TIMEOUT_S", 3.0, raising=False)
    lab = client_lab(tmp_path)
    with silent_share(tmp_path) as (share, freezer):
        cfg = on_share(lab.config(), EQ, share)
        # One attempt while the share is silent (the next is due in an hour), however slow the machine.
        cfg = cfg.model_copy(update={"sync": cfg.sync.model_copy(update={"backoff_s": [3600.0, 3600.0]})})
        run_a = lab.make_run("Run_A", {"a.bin": b"a" * 5000})
        run_b = lab.make_run("Run_B", {"b.bin": b"b" * 5000}, equipment=OTHER)
        clock = Clock()
        async with running(cfg, clock) as client:
            try:
                freezer.freeze()
                await client.enqueue(run_a)
                assert await _until(lambda: _is(client, run_a, S.RUNNING), 10)
                await client.enqueue(run_b)
                other_done = await _until(lambda: _is(client, run_b, S.VERIFIED), 30)
                a_ended = await _until(lambda: _not(client, run_a, S.RUNNING), 30)
                job_a = await client.job(run_a)
            finally:
                freezer.thaw()
            final_a = await retry_now(client, clock, run_a)  # its retry, due now: the share answers again
        assert other_done, "FACS_02's job did not reach VERIFIED while CONFOCAL_01's share was silent"
        assert a_ended, (
            f"CONFOCAL_01's job stayed {job_a.state.value} into a silent share (last_error={job_a.last_error!r})"
        )
        assert job_a.last_error and str(share) in job_a.last_error and "not answered" in job_a.last_error, job_a
        assert final_a.state == S.VERIFIED, (final_a.state, final_a.last_error)
        leftovers = [p.name for p in share.rglob("*") if p.name.startswith(".exlab-") and p.name != MARKER]
        assert not [n for n in leftovers if "tmp" in n or "part" in n], leftovers


async def test_the_reapers_last_look_into_a_silent_share_does_not_stop_the_other_equipments_cleanup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both runs verified twice and 25 h old. CONFOCAL_01's share then stops answering; FACS_02's NAS answers.

    The reaper's look into the silent share times out: CONFOCAL_01's job waits
    ("NAS not answering", nothing deleted), and FACS_02's run, every interlock
    holding, is cleaned in the same pass. Rule 1 after SIGCONT: nothing of
    CONFOCAL_01 deleted unless its NAS copy is whole.
    """
    monkeypatch.setattr(remote_mod, "NAS_LOOK_TIMEOUT_S", 2.0, raising=False)
    lab = client_lab(tmp_path)
    with silent_share(tmp_path) as (share, freezer):
        cfg = on_share(cleanup_config(lab), EQ, share)
        run_a = lab.make_run("Run_A", {"a.bin": b"a" * 5000})
        run_b = lab.make_run("Run_B", {"b.bin": b"b" * 5000}, equipment=OTHER)
        clock = Clock()
        async with running(cfg, clock) as client:
            await synced(client, run_a)
            await synced(client, run_b)
            clock.advance(6)
            await client.audit_once()
            clock.advance(19)
            assert (await client.job(run_a)).verify_passes == 2 and (await client.job(run_b)).verify_passes == 2
            try:
                freezer.freeze()
                pass_ = asyncio.ensure_future(client.cleanup_once())
                b_cleaned = await _until(lambda: _is(client, run_b, S.CLEANED), 30)
                pass_done = await _until(lambda: _done(pass_), 10)
            finally:
                freezer.thaw()
            outcomes = await asyncio.wait_for(pass_, 60)
            job_a = await client.job(run_a)
            a_nas = share / run_a.relative_to(lab.local_root / EQ)
            nas_whole = (a_nas / "a.bin").exists() and (a_nas / "a.bin").read_bytes() == b"a" * 5000
        assert (run_a / "a.bin").exists() or nas_whole, f"CONFOCAL_01: bytes on neither side ({job_a.state.value})"
        assert b_cleaned, f"FACS_02's run was not cleaned while CONFOCAL_01's share was silent ({job_a.state.value})"
        assert pass_done, "the reaper's pass was still blocked in the silent share"
        assert (run_a / "a.bin").exists(), "CONFOCAL_01's local bytes were deleted after a look that timed out"
        assert job_a.state == S.CLEANUP_ELIGIBLE, job_a.state
        mine = [o for o in outcomes if o.job_id == job_a.id and o.action == "waiting"]
        assert mine and mine[0].code == CleanupCode.REMOTE_UNREACHABLE and "NAS not answering" in mine[0].reason, (
            outcomes
        )


async def _done(task: asyncio.Future) -> bool:
    return task.done()
