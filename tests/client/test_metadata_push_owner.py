"""A metadata push writes into a NAS run folder only when the folder is its run's.

Run A is verified on PC 1; its metadata push waits (the NAS busy), so A's NAS folder holds data and
a claim but no ``checksums.sha256``: to a lab member it looks like an abandoned upload, and they
delete it. PC 2 (same equipment id, same project and run name) then pushes its own ``Run_1`` into
the free path and verifies it. When the NAS answers PC 1 again, A's pending metadata push used to
write A's ``checksums.sha256`` and ``creation.json`` over PC 2's, keeping nothing (rule 2), after
merging PC 2's ``creation.json`` into A's local record; PC 2 was then refused from its own folder
for good. Found by review. The push now checks the folder first: it holds this job's claim, or a
verified manifest of the run, or (a job from before claims) nothing of anyone else's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports.base import TransportError, TransportErrorKind
from exlab_wizard.sync.transports.mount import MountTransport
from exlab_wizard.sync.transports.rclone import RcloneTransport
from exlab_wizard.sync.transports.rsync_ssh import RsyncSshTransport
from tests.helpers import Clock
from tests.lab import EQ, FILES, TWIN_FILES, Site, running, synced

S = SyncJobState
MANIFEST = ".exlab-wizard/checksums.sha256"
CREATION = ".exlab-wizard/creation.json"
CLAIMS = ".exlab-wizard/claims"
SYNC = {"audit_interval_s": 6 * 3600, "scan_interval_s": 3600}
TRANSPORTS = [pytest.param("mount"), pytest.param("rsync_ssh", marks=pytest.mark.network)]
RCLONE_TOO = [*TRANSPORTS, pytest.param("rclone", marks=pytest.mark.network)]  # rclone sftp: ~4 s a case


def make_site(request: pytest.FixtureRequest, root: Path, kind: str) -> Site:
    """A site on ``kind``; ``rclone``: rclone sftp to the loopback sshd's remote folder."""
    if kind != "rclone":
        return Site.on(request, root, kind)
    site = Site.on(request, root, "rsync_ssh")
    conf = request.getfixturevalue("rclone_sftp_config")(request.getfixturevalue("sshd"))
    site.transport = {
        "type": "rclone",
        "rclone_remote": "labsftp",
        "rclone_remote_path": str(site.nas_root),
        "rclone_config": str(conf),
    }
    return site


def two_pcs(request: pytest.FixtureRequest, tmp_path: Path, kind: str) -> tuple[Site, Site]:
    """Two instrument PCs set up alike (same equipment id) on one NAS root."""
    (tmp_path / "pc1").mkdir()
    first = make_site(request, tmp_path / "pc1", kind)
    pc2 = tmp_path / "pc2"
    second = Site(pc2, pc2 / "lab", first.nas_root, pc2 / "state", (EQ,), kind=kind)
    second.local_root.mkdir(parents=True)
    second.transport = dict(first.transport)
    return first, second


def metadata_push_down(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Every metadata push (mount, rsync_ssh, rclone) fails, the NAS busy, while the list returned is not empty."""
    down = [True]
    for cls in (MountTransport, RsyncSshTransport, RcloneTransport):
        real = cls.push_metadata

        async def fails(self: Any, run_path: Path, *, _real: Any = real, **kwargs: Any) -> Any:
            if down:
                raise TransportError(TransportErrorKind.NETWORK, "the NAS is busy")
            return await _real(self, run_path, **kwargs)

        monkeypatch.setattr(cls, "push_metadata", fails)
    return down


def add_to_creation(run: Path, **keys: Any) -> None:
    path = run / CREATION
    path.write_text(json.dumps({**json.loads(path.read_text()), **keys}))


def nas_files(nas: Path) -> dict[str, bytes]:
    return {p.relative_to(nas).as_posix(): p.read_bytes() for p in nas.rglob("*") if p.is_file()}


@pytest.mark.parametrize("kind", RCLONE_TOO)
@pytest.mark.parametrize("their_manifest", [True, False], ids=["their-manifest", "their-claim-only"])
async def test_a_pending_metadata_push_never_writes_into_another_pcs_folder(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, their_manifest: bool
) -> None:
    first, second = two_pcs(request, tmp_path, kind)
    run_a = first.make_run("Run_1", files=FILES)
    run_b = second.make_run("Run_1", files=TWIN_FILES)
    add_to_creation(run_b, pc2_note="only PC 2's")
    nas = first.nas_copy(run_a)
    down = metadata_push_down(monkeypatch)
    async with running(first.config(sync=SYNC), Clock()) as client:
        job_a = await synced(client, run_a)
        assert job_a.metadata_push_due_at is not None  # owed, not sent
    assert not (nas / MANIFEST).exists()

    shutil.rmtree(nas)  # a lab member removes what looks like an abandoned upload
    if their_manifest:
        down.clear()
    async with running(second.config(sync=SYNC), Clock()) as other:
        await synced(other, run_b)
        await other.wait_idle(timeout=60)
    theirs = nas_files(nas)
    assert (MANIFEST in theirs) == their_manifest
    local_creation = (run_a / CREATION).read_bytes()

    down.clear()
    async with running(first.config(sync=SYNC), Clock()) as client:  # PC 1 back: its pending push is due
        await client.wait_idle(timeout=60)
        job_a = await client.job(run_a)
    assert nas_files(nas) == theirs, "rule 2: PC 1's metadata push wrote into PC 2's NAS folder"
    assert (run_a / CREATION).read_bytes() == local_creation, "PC 2's creation.json merged into A's record"
    assert job_a.state == S.VERIFIED
    assert job_a.metadata_push_pending  # waits, and says why
    assert (job_a.metadata_push_error or "").startswith("remote_conflict: "), job_a.metadata_push_error
    assert [e for e in job_a.events if e.kind == "metadata_push_failed"][-1].detail.find("remote_conflict") >= 0


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_a_job_from_before_claims_still_sends_its_pending_metadata_push(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A push from a version before claims wrote none: a folder with nobody else's claim or manifest is the run's."""
    site = make_site(request, tmp_path, kind)
    run = site.make_run("Run_1", files=FILES)
    nas = site.nas_copy(run)
    down = metadata_push_down(monkeypatch)
    async with running(site.config(sync=SYNC), Clock()) as client:
        await synced(client, run)
    shutil.rmtree(nas / CLAIMS)
    down.clear()
    async with running(site.config(sync=SYNC), Clock()) as client:
        await client.wait_idle(timeout=60)
        job = await client.job(run)
    assert not job.metadata_push_pending, job.metadata_push_error
    assert (nas / MANIFEST).read_bytes() == (run / MANIFEST).read_bytes()


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_a_new_job_after_a_queue_reset_sends_its_metadata_over_the_runs_older_manifest(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    """The queue lost, the run grown since: the new job's push claims the folder, whose manifest is the old one."""
    site = make_site(request, tmp_path, kind)
    run = site.make_run("Run_1", files=FILES)
    nas = site.nas_copy(run)
    async with running(site.config(sync=SYNC), Clock()) as client:
        old = await synced(client, run)
    old_manifest = (nas / MANIFEST).read_bytes()
    shutil.rmtree(site.state)  # the queue is lost
    site.state.mkdir()
    (run / "extra.bin").write_bytes(b"grown since" * 100)
    async with running(site.config(sync=SYNC), Clock()) as client:
        job = await synced(client, run)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
    assert job.id != old.id
    assert not job.metadata_push_pending, job.metadata_push_error
    assert (nas / MANIFEST).read_bytes() == (run / MANIFEST).read_bytes() != old_manifest
