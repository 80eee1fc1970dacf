"""A NAS down for a weekend does not grow the equipment log by a line per job per reaper pass.

The queue records every cleanup wait once while it lasts (DESIGN §9: "every
wait is recorded once as an event with its reason"). The reaper's probe of an
rsync_ssh NAS (``RsyncSshTransport.reachable``) used to write a ``tool_exit``
WARNING line to the equipment log (append-only, never rotated, on the
instrument's own disk) each time it failed: once per CLEANUP_ELIGIBLE job per
pass, every ``scan_interval_s`` (30 s by default). 100 jobs waiting through a
2-day NAS outage: ~576,000 lines. Now the first failing probe is logged and
the next ones are not, until the NAS answers again.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from exlab_wizard.config import parse_config
from tests.fixtures.sshd import RW_USER
from tests.helpers import Clock
from tests.lab import EQ, Lab, running, synced

pytestmark = pytest.mark.network

PASSES = 8


async def test_reaper_passes_with_the_nas_down_do_not_grow_the_equipment_log(
    tmp_path: Path, sshd_factory, remote_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = sshd_factory()
    lab = Lab.build(tmp_path, equipment=(EQ,), marker=None)
    data = lab.config_data(sync={"backoff_s": [0.01], "scan_interval_s": 3600, "audit_interval_s": 86400})
    data["equipment"][0]["transport"] = {
        "type": "rsync_ssh",
        "ssh_target": f"{RW_USER}@127.0.0.1",
        "ssh_key_path": str(server.env.client_key),
        "ssh_port": server.port,
        "remote_path": str(remote_dir),
        "ssh_known_hosts": str(server.known_hosts),
    }
    data["nas_cleanup"] = {"enabled": True, "min_verify_passes": 1, "min_age_hours": 0, "retain_cache": True}
    cfg = parse_config(data)
    runs = [lab.make_run(f"Run_2026-01-0{i}", files={"a.bin": b"x" * 100}) for i in range(1, 4)]
    clock = Clock()
    async with running(cfg, clock) as client:
        for run in runs:
            await synced(client, run)
        server.stop()  # the NAS goes away (a reboot, a weekend power-down)
        log = lab.equipment_log()
        before = len(log.read_text().splitlines())
        caplog.set_level(logging.INFO, logger="exlab_wizard")  # what the central log would take
        caplog.clear()
        counts = []
        for _ in range(PASSES):
            outcomes = [o for o in await client.cleanup_once() if o.action != "promoted"]
            assert {o.action for o in outcomes} == {"waiting"}, [(o.action, o.reason) for o in outcomes]
            counts.append(len(log.read_text().splitlines()))
        after = log.read_text().splitlines()
        central = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
        jobs = [await client.job(run) for run in runs]
        server.start()  # the NAS is back: the waiting jobs are cleaned
        cleaned = [(o.action, o.reason) for o in await client.cleanup_once()]
        states = [(await client.job(run)).state.value for run in runs]
    new = after[before:]
    refusals = sum(1 for job in jobs for e in job.events if e.kind == "cleanup_refused")
    # The queue: one refusal per job while the outage lasts (bounded). The log must be bounded likewise.
    assert refusals == len(runs)
    assert len(new) <= 2 * len(runs), f"{len(new)} log lines for {PASSES} passes x {len(runs)} jobs: " + "\n".join(
        new[:4]
    )
    assert len(set(counts)) == 1, f"the log grew on passes after the first: {counts}"
    assert sum(" tool_exit " in line for line in new) == 1, new  # the first failing probe, with ssh's reason
    assert states == ["cleaned"] * len(runs), cleaned
    # Nor the central log (state_dir): no INFO line per job per pass either.
    assert len(central) <= len(runs), central[:4]
