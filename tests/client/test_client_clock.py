"""The client's clock is the one clock of a push: its bandwidth limit and its transport's."""

from __future__ import annotations

import datetime as dt

from exlab_wizard.config import parse_config
from exlab_wizard.sync.policy.bandwidth import mbps_to_kibps
from exlab_wizard.sync.states import SyncJobState
from tests.lab import EQ, Lab, running


async def test_a_fake_clock_inside_a_bandwidth_window_starts_the_push_with_its_limit(lab: Lab) -> None:
    # Twelve hours from the real time: the real clock is outside the window, the client's inside.
    fake = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=12)).replace(second=0, microsecond=0)
    local = fake.astimezone()
    window = {
        "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
        "from": f"{local - dt.timedelta(hours=1):%H:%M}",
        "to": f"{local + dt.timedelta(hours=1):%H:%M}",
    }
    data = lab.config_data(sync={"backoff_s": [0.01], "scan_interval_s": 0.05})
    for equipment in data["equipment"]:
        equipment["transport"]["bandwidth"] = {"upload_mbps": 80, "schedule": [window]}
    limit = mbps_to_kibps(80)
    run = lab.make_run(files={"a.dat": b"a" * 1000})

    async with running(parse_config(data), lambda: fake) as client:
        await client.enqueue(run)
        await client.wait_idle(timeout=30)
        assert (await client.job(run)).state == SyncJobState.VERIFIED
        transport = client._ctx.remotes.transport(client.config.equipment_by_id(EQ))
        assert transport.now() == local  # what the mount transport reads mid-transfer

    starts = lab.log_lines("transfer_start")
    assert starts and all(f"bwlimit_kibps={limit}" in line for line in starts), starts
    pushes = lab.log_lines("push_start")  # the mount transport's own line: the run, then .exlab-wizard/
    assert pushes and all(f"bwlimit_kibps={limit}" in line for line in pushes), pushes
