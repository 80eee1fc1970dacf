"""An OAuth rclone remote (onedrive, drive, dropbox, box, pcloud, ...) is never stuck by its own token refresh.

rclone writes a refreshed OAuth token back into the remote's section of rclone.conf
(``token = {"access_token": ..., "expiry": ...}``) whenever the access token has expired
(about every hour) and rclone runs: the audit's own hashsum/fetch does it. The place of an
rclone run (``run_location``) digests the remote's section: with the token in it, every
refresh was taken for a move to a new NAS, each audit pass counted as "the first at a new
NAS location", the passes never reached ``min_verify_passes`` = 2 and the reaper waited for
ever (found by review). The token is left out.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports.base import location_change, run_location
from tests.helpers import Clock
from tests.lab import FILES, Lab, acts, rclone_cleanup_config, running, synced

S = SyncJobState


def _conf(path: Path, nas: Path, n: int) -> None:
    token = json.dumps(
        {
            "access_token": f"tok{n}",
            "token_type": "Bearer",
            "refresh_token": "r",
            "expiry": f"2026-01-01T{n % 24:02d}:00:00Z",
        }
    )
    path.write_text(f"[labnas]\ntype = alias\nremote = {nas}\ntoken = {token}\n")


def test_a_token_refresh_is_not_a_move(tmp_path: Path) -> None:
    nas = tmp_path / "nas"
    nas.mkdir()
    conf = tmp_path / "rclone.conf"
    _conf(conf, nas, 0)
    from tests.transports.test_run_location import BASE, _equipment

    eq = _equipment(tmp_path, {**BASE["rclone"], "rclone_config": str(conf)})
    run = tmp_path / "EQ_01" / "PROJ" / "Run_1"
    verified = run_location(eq, run)
    _conf(conf, nas, 1)  # what rclone itself writes after refreshing the access token
    assert location_change(eq, run, verified_location=verified, remote_path="x") is None


@pytest.mark.network
@pytest.mark.parametrize("refresh", [False, True], ids=["no_refresh_control", "token_refreshed"])
async def test_oauth_token_refreshes_do_not_stop_cleanup_for_ever(lab: Lab, tmp_path: Path, refresh: bool) -> None:
    nas = tmp_path / "rnas"
    nas.mkdir()
    conf = tmp_path / "rclone.conf"
    n = 0
    _conf(conf, nas, n)
    cfg = rclone_cleanup_config(lab, conf)
    clock = Clock()
    run = lab.make_run(files=FILES)
    reasons = []
    async with running(cfg, clock) as client:
        await synced(client, run)
        for _ in range(8):  # two days of 6-hourly audits; the token expires hourly, rclone refreshes it
            clock.advance(6)
            n += refresh
            _conf(conf, nas, n)  # refreshed by the rclone call of this audit (or of any push meanwhile)
            await client.audit_once()
            reasons += [(o.action, o.reason) for o in acts(await client.cleanup_once())]
        job = await client.job(run)
    assert job.state in (S.CLEANED,) or not (run / next(iter(FILES))).exists(), (
        f"never cleaned: passes={job.verify_passes}, state={job.state.value}, last={reasons[-2:]}"
    )
