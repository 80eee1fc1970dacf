"""Another file system mounted at the same ``mount_path``: passes read on the old one vouch for nothing (rule 1).

The usual way a lab moves to a new NAS on the mount transport: copy the
share (``rsync -a``/``robocopy /COPY:DAT``: sizes and mtimes kept, claims and
manifests copied along), then point ``/etc/fstab`` at the new server, so the
same ``mount_path`` now shows another file system and the config is
unchanged. The mount transport's location names what is mounted there (the
mount table's type, source and root), so the reaper refuses
(``nas_location_changed``) until the audit has hashed the copy there.

A one-byte difference (size and mtime kept) in the migrated copy, as a
faulty migration or a copy still being repaired would leave, and the reaper
before the next audit (it runs every ``scan_interval_s``, the audit every
``audit_interval_s``). A location recorded by an older version
(``mount||<path>``) still counts as this place; a share not mounted at all
is unreachable, never "another place".
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from exlab_wizard.sync.policy.cleanup import CleanupCode
from exlab_wizard.sync.reaper.interlocks import InterlockFacts
from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports.base import remote_run_path, run_location
from tests.helpers import Clock
from tests.lab import (
    EQ,
    FILES,
    MARKER,
    Lab,
    act_once_in,
    acts,
    cleanup_config,
    data_intact,
    ready,
    rewrite_in_place,
    running,
)

S = SyncJobState


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    """Mount points a test mounted on: unmounted (the last first) whatever happens."""
    points: list[Path] = []
    yield points
    for point in reversed(points):
        subprocess.run(["umount", str(point)], check=False, capture_output=True)


def _mount(mounts: list[Path], *args: str) -> None:
    subprocess.run(["mount", *args], check=True)
    mounts.append(Path(args[-1]))


async def test_another_share_mounted_at_the_mount_path_is_verified_before_anything_is_deleted(
    tmp_path: Path, mounts: list[Path]
) -> None:
    lab = Lab.build(tmp_path, equipment=(EQ,))
    run = lab.make_run("Run_2026-01-01", files=FILES)
    clock = Clock()
    cfg = cleanup_config(lab)
    share = lab.mount_path(EQ)
    new_nas = tmp_path / "nas02"
    async with running(cfg, clock) as client:
        await ready(client, clock, run)  # verified twice on the old server, 25 h old

        # The migration: the share copied whole (times kept), fstab now mounts the new server there.
        shutil.copytree(share, new_nas, symlinks=True)  # copy2: sizes and mtimes kept
        rewrite_in_place(new_nas / run.relative_to(lab.local_root / EQ) / "sub/stack.raw", b"Z", at=100)
        _mount(mounts, "--bind", str(new_nas), str(share))

        outcomes = acts(await client.cleanup_once()) + acts(await client.cleanup_once())
        job = await client.job(run)
        nas_copy = lab.nas_copy(run)
        nas_right = all((nas_copy / rel).read_bytes() == data for rel, data in FILES.items())
        local_left = [rel for rel in FILES if (run / rel).is_file()]
        assert nas_right or len(local_left) == len(FILES), (
            f"local data deleted ({job.state.value}, left: {local_left}) while the share now mounted at "
            f"{share} (never hashed by the engine) holds other bytes for sub/stack.raw; "
            f"{[(o.action, o.code, o.reason[:70]) for o in outcomes]}"
        )
        assert [o.code for o in outcomes] == [CleanupCode.NAS_LOCATION_CHANGED] * 2, outcomes

        # The audit hashes the copy now mounted there: the byte differs, so the run goes back to be sent.
        await client.audit_once()
        job = await client.job(run)
        assert job.state == S.QUEUED and job.verify_passes == 0, job
    assert data_intact(run)


async def test_a_location_recorded_before_mounts_were_named_counts_as_this_place(lab: Lab) -> None:
    """An upgrade sends no mount job back to be verified: ``mount||<path>`` is the place while the path is."""
    clock = Clock()
    cfg = cleanup_config(lab)
    run = lab.make_run(files=FILES)
    equipment = cfg.equipment_by_id(EQ)
    async with running(cfg, clock) as client:
        job = await ready(client, clock, run)
        assert job.verified_location == run_location(equipment, run) != f"mount||{remote_run_path(equipment, run)}"
        queue = client._ctx.require_queue()
        queue.update(job.id, job.state, now=clock(), verified_location=f"mount||{remote_run_path(equipment, run)}")

        # The next audit's pass counts as the third, and records the place in the new form.
        clock.advance(6)
        await client.audit_once()
        job = await client.job(run)
        assert job.verify_passes == 3 and job.verified_location == run_location(equipment, run), job
        [outcome] = acts(await client.cleanup_once())
        assert outcome.action == "deleted", outcome


async def test_an_unmounted_share_is_unreachable_not_another_place(tmp_path: Path, mounts: list[Path]) -> None:
    """The bare mount point (no marker) is the instrument's disk, not a new NAS: ``remote_unreachable``."""
    lab = Lab.build(tmp_path, equipment=(EQ,))
    share = lab.mount_path(EQ)
    (share / MARKER).unlink()  # the bare mount point holds no marker
    _mount(mounts, "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(share))
    (share / MARKER).write_text("mounted\n")
    run = lab.make_run("Run_2026-01-01", files=FILES)
    clock = Clock()
    async with running(cleanup_config(lab), clock) as client:
        await ready(client, clock, run)
        subprocess.run(["umount", str(share)], check=True)
        mounts.remove(share)
        [outcome] = acts(await client.cleanup_once())
        assert (outcome.action, outcome.code) == ("waiting", CleanupCode.REMOTE_UNREACHABLE), outcome
    assert data_intact(run)


async def test_a_share_unmounted_between_the_interlocks_is_unreachable(
    tmp_path: Path, mounts: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reachable at interlock 1, unmounted before the place is compared: still unreachable, nothing deleted."""
    lab = Lab.build(tmp_path, equipment=(EQ,))
    share = lab.mount_path(EQ)
    (share / MARKER).unlink()  # the bare mount point holds no marker
    _mount(mounts, "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(share))
    (share / MARKER).write_text("mounted\n")
    run = lab.make_run("Run_2026-01-01", files=FILES)
    clock = Clock()
    async with running(cleanup_config(lab), clock) as client:
        await ready(client, clock, run)

        def unmount() -> None:
            subprocess.run(["umount", str(share)], check=True)
            mounts.remove(share)

        fired = act_once_in(monkeypatch, InterlockFacts, "_moved", lambda *a, **k: True, unmount)
        [outcome] = acts(await client.cleanup_once())
        assert fired and (outcome.action, outcome.code) == ("waiting", CleanupCode.REMOTE_UNREACHABLE), outcome
    assert data_intact(run)
