"""An edit made after its file was stamped by a clock that ran ahead is an edit, never damage that restore destroys.

Found by review (clock): a run acquired while the PC's clock ran a day ahead (corrected by NTP
before the sync) carries file mtimes a day in the future. It is synced and verified. Later the
operator appends a line to ``notes.txt``: the kernel stamps it with the (now correct) time,
earlier than the recorded mtime, and the size changes. The local check took any new content
under an older mtime for damage whatever the size, so the reaper failed the job
``local_damage`` (its message even said "size and mtime not" changed) and ``exlab-sync
restore``, the way out it names first, renamed the NAS's old bytes over the file: the appended
line, which existed nowhere else, was gone (rule 1). The same for every edit after a CMOS reset
or a lab setting the clock back.

DESIGN section 6 defines local damage as different bytes "while its size and mtime are the ones
recorded at verification": a file of another size, its mtime and ctime stamped alike by a write
earlier than the record's times, is an edit: sent again, the NAS keeping the replaced copy.
"""

from __future__ import annotations

import os

from exlab_wizard.sync.states import SyncJobState
from tests.client.test_local_damage import previous_files
from tests.helpers import Clock
from tests.lab import Lab, ready, running
from tests.lab import cleanup_config as config

S = SyncJobState
DAY_NS = 86_400 * 1_000_000_000
FILES = {"image_001.tif": os.urandom(4000), "notes.txt": b"acquired ok\n"}
NOTE = b"acquired ok\noperator: focus drifted after frame 812, see image_001\n"


async def test_an_edit_under_an_mtime_older_than_the_clock_ahead_one_is_never_restored_away(lab: Lab) -> None:
    clock = Clock()
    cfg = config(lab, enabled=True)
    run = lab.make_run(files=FILES)
    for rel in FILES:  # written while the PC's clock ran a day ahead
        st = os.stat(run / rel)
        os.utime(run / rel, ns=(st.st_atime_ns, st.st_mtime_ns + DAY_NS))
    nas = lab.nas_copy(run)
    async with running(cfg, clock) as client:
        await ready(client, clock, run)
        (run / "notes.txt").write_bytes(NOTE)  # the clock is right now: stamped "before" the verified copy
        await client.cleanup_once()
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        verdict = (job.state.value, job.error_kind, job.last_error)
        if job.state == S.FAILED and job.error_kind == "local_damage":
            # The way out the engine names first.
            assert "exlab-sync restore" in job.last_error
            await client.restore(run)
            await client.wait_idle(timeout=60)
            job = await client.job(run)
    where = {
        "local": (run / "notes.txt").read_bytes() == NOTE,
        "nas": (nas / "notes.txt").read_bytes() == NOTE,
    }
    assert any(where.values()), ("the operator's edit is lost", where, job.state.value, job.last_error)
    assert verdict[1] != "local_damage", f"an edit of another size was called local damage: {verdict}"
    # Sent as an edit: verified again, the replaced NAS copy kept under previous/.
    assert job.state == S.VERIFIED and where["nas"], (job.state.value, job.last_error)
    assert FILES["notes.txt"] in previous_files(nas).values()
