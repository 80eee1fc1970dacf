"""A failing reachability probe is logged once per outage, and again when the outage changes cause.

An outage that changes cause (the NAS host reboots: ssh "Connection refused"; it comes back
without its data volume mounted: ``test -d`` fails and ``rsync --list-only`` says the root is
missing) keeps every probe failing. The second, real cause (the one a lab must act on) was written
nowhere: not to the equipment log, and the queue's refusal stays the generic "remote unreachable".
"""

from __future__ import annotations

import os

import pytest

from exlab_wizard.sync.equipment_log import log_path_for
from exlab_wizard.sync.transports.rsync_ssh import RsyncSshTransport
from tests.lab import make_hostile_run as make_run
from tests.lab import rsync_equipment as equipment

pytestmark = pytest.mark.network


def log_lines(eq) -> list[str]:
    path = log_path_for(eq)
    return path.read_text().splitlines() if path.exists() else []


async def test_a_new_cause_of_failure_during_an_outage_is_logged(tmp_path, sshd_factory, remote_dir):
    server = sshd_factory()
    eq = equipment(tmp_path, server, remote_dir)
    run = make_run(eq.local_root, {"a.txt": b"a"}, symlink=False)
    transport = RsyncSshTransport(eq)
    assert await transport.reachable(run)
    server.stop()  # the NAS host goes down: ssh says Connection refused (rc 255), logged once
    for _ in range(3):
        assert not await transport.reachable(run)
    first = log_lines(eq)
    assert len(first) == 1 and "Connection refused" in first[0], first
    # The host is back, its data volume is not mounted: the root is missing. Another problem,
    # another remedy (mount the volume) -- still "unreachable", rightly (rule 3).
    hidden = remote_dir.with_name(remote_dir.name + ".unmounted")
    os.rename(remote_dir, hidden)
    server.start()
    try:
        for _ in range(3):
            assert not await transport.reachable(run)
        later = log_lines(eq)[len(first) :]
    finally:
        os.rename(hidden, remote_dir)
    # The new cause is written once, as a new failure of a quiet step is.
    assert len(later) == 1, (
        "the root-missing failure after the ssh outage was never logged; the equipment log still says only: " + first[0]
    )
