"""A verified file rewritten through a temp file and rename, shorter, with its old mtime put back, is damage.

(``rsync -a``/``cp -a`` from a broken backup, ``exiftool -P``.) A change of size does not make it
an edit: its bytes must never go over the verified NAS copy. Guards the damage rule against a
change, tried this session and reverted, that called another inode and size an edit.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.helpers import Clock
from tests.lab import FILES, Lab, acts, ready, running
from tests.lab import cleanup_config as config


async def test_truncated_copy_with_old_mtime_is_not_sent_over_the_nas(lab: Lab, tmp_path: Path) -> None:
    clock = Clock()
    cfg = config(lab)
    run = lab.make_run(files=FILES)
    name = next(iter(FILES))
    async with running(cfg, clock) as client:
        await ready(client, clock, run)
        target = run / name
        st = os.stat(target)
        tmp = run / (name + ".tmp")
        tmp.write_bytes(FILES[name][: len(FILES[name]) // 2])  # a truncated copy (a restore from a broken backup)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(tmp, target)
        outcomes = acts(await client.cleanup_once())
        await client.wait_idle(timeout=60)
        job = await client.job(run)
    nas = lab.nas_copy(run) / name
    kept = [p for p in (lab.nas_copy(run) / ".exlab-wizard").rglob(name) if p.read_bytes() == FILES[name]]
    print([(o.action, o.reason) for o in outcomes], job.state, job.last_error, kept)
    assert nas.read_bytes() == FILES[name], (
        f"the verified NAS copy was replaced by the truncated local one ({len(nas.read_bytes())} bytes); "
        f"kept under previous/: {kept}; {[(o.action, o.reason) for o in outcomes]} {job.state.value}"
    )
