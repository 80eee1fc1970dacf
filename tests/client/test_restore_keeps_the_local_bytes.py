"""``restore`` never destroys the local bytes it replaces: they are kept under ``.exlab-wizard/replaced/<stamp>/``.

Found by review (clock): the local check cannot always tell damage from an edit (an edit made
under a clock set back, in place, keeping the size, reads as damage). ``restore``, the way out
the failure names first, renamed the NAS's verified bytes over the file, and what the local
file held, which may exist nowhere else, was gone (rule 1). Now the replaced bytes are kept
first (a hard link; a copy where the filesystem has none): never data to the listings, pushed
with ``.exlab-wizard/``, and with ``retain_cache: false`` removed only once the final metadata
push has proved them on the NAS.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from exlab_wizard.sync.reaper import load_verified_stats
from exlab_wizard.sync.states import SyncJobState
from tests.client.test_local_damage import DAMAGED, FILES, Nas, data_tree, failed_local_damage, nas, running
from tests.helpers import Clock

__all__ = ["nas"]  # the fixture, one test per transport

S = SyncJobState


def _kept(root: Path) -> dict[str, bytes]:
    """``<stamp>/<path>`` -> bytes of every file under ``root/.exlab-wizard/replaced/``."""
    base = root / ".exlab-wizard" / "replaced"
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in base.rglob("*") if p.is_file()}


async def test_restore_keeps_the_replaced_local_bytes_and_the_cleanup_pushes_them_first(nas: Nas) -> None:
    clock = Clock()
    run = nas.lab.make_run(files=FILES)
    async with running(nas.config(retain_cache=False), clock) as client:
        job = await failed_local_damage(client, clock, run)
        local = (run / DAMAGED).read_bytes()
        assert local != FILES[DAMAGED]

        result = await client.restore(run)
        assert result.ok and result.restored == (DAMAGED,) and result.state == S.VERIFIED
        assert (run / DAMAGED).read_bytes() == FILES[DAMAGED]
        kept = _kept(run)
        assert list(kept.values()) == [local], kept  # the local bytes, kept once
        (where,) = kept
        assert where.endswith("/" + DAMAGED) and result.kept == {DAMAGED: f".exlab-wizard/replaced/{where}"}
        assert os.stat(run / DAMAGED).st_nlink == 1  # the restored file is its own inode
        after = await client.job(run)
        assert "replaced local bytes kept under .exlab-wizard/replaced/" in after.events[-1].detail
        # Not data: the run matches its verified manifest (the job is VERIFIED with it) and is freed.
        assert after.manifest_digest == job.manifest_digest
        assert set(load_verified_stats(client._require_queue(), job.id)) == set(FILES)
        outcomes = [o for o in await client.cleanup_once() if o.action != "promoted"]
        assert [o.action for o in outcomes] == ["deleted"], outcomes
        await client.wait_idle(timeout=60)
    assert not run.exists()  # retain_cache: false, the final metadata push proved first
    assert data_tree(nas.copy(run)) == FILES
    assert _kept(nas.copy(run)) == kept  # the replaced bytes went to the NAS before the local ones did


async def test_a_second_restore_keeps_its_own_folder(nas: Nas) -> None:
    clock = Clock()
    run = nas.lab.make_run(files=FILES)
    async with running(nas.config(), clock) as client:
        await failed_local_damage(client, clock, run)
        first = (run / DAMAGED).read_bytes()
        assert (await client.restore(run)).ok
        with open(run / DAMAGED, "r+b") as f:  # damaged again, the same second
            st = os.fstat(f.fileno())
            f.seek(3)
            f.write(b"\x00\x01\x02")
        os.utime(run / DAMAGED, ns=(st.st_atime_ns, st.st_mtime_ns))
        second = (run / DAMAGED).read_bytes()
        result = await client.restore(run)
        assert result.ok and result.restored == (DAMAGED,)
    assert sorted(_kept(run).values()) == sorted([first, second])
    assert len({k.split("/")[0] for k in _kept(run)}) == 2


async def test_without_hard_links_the_local_bytes_are_copied_aside(nas: Nas, monkeypatch) -> None:
    """A filesystem with no hard links (FAT, exFAT, some shares): a durable copy, with the file's mtime."""
    real_link = os.link

    def no_hard_links(src, dst, *args, **kwargs):
        if "/replaced/" in str(dst):
            raise OSError(errno.EPERM, "Operation not permitted")
        return real_link(src, dst, *args, **kwargs)

    clock = Clock()
    run = nas.lab.make_run(files=FILES)
    async with running(nas.config(), clock) as client:
        await failed_local_damage(client, clock, run)
        local, mtime_ns = (run / DAMAGED).read_bytes(), os.stat(run / DAMAGED).st_mtime_ns
        monkeypatch.setattr(os, "link", no_hard_links)
        result = await client.restore(run)
        assert result.ok and result.restored == (DAMAGED,) and result.state == S.VERIFIED
    aside = run / result.kept[DAMAGED]
    assert aside.read_bytes() == local and os.stat(aside).st_mtime_ns == mtime_ns
    assert (run / DAMAGED).read_bytes() == FILES[DAMAGED]
