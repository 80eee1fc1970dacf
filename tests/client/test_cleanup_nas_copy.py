"""Cleanup never deletes a run whose NAS copy is gone or incomplete (interlock 4).

Through the real NASSyncClient and the real transports: the mount transport
on a local "share", and rsync over ssh to the loopback sshd. A run is synced,
verified twice and 25 h old; then its NAS copy is damaged the way an admin's
mistake or a restore from an older snapshot would (the run folder deleted,
one file deleted, one file truncated). ``exlab-sync cleanup`` must delete
nothing, send the job back to QUEUED naming the files, and after the next
transfer the run verifies again and can be cleaned.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from exlab_wizard.config import Config
from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock, cli
from tests.helpers import table_row as _row
from tests.lab import EQ, FILES, Lab, acts, data_intact, events, ready, rsync_equipment, running, synced
from tests.lab import cleanup_config as config

S = SyncJobState
DAMAGES = ["run folder deleted", "file deleted", "file truncated"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return cli(*args, columns=500)


def nas_setup(
    lab: Lab, request: pytest.FixtureRequest, backend: str, **cleanup: Any
) -> tuple[Config, Callable[[Path], Path]]:
    """The config (cleanup on, 2 passes, 24 h) and where a run's NAS copy lies on disk."""
    cfg = config(lab, **cleanup)
    if backend == "mount":
        return cfg, lab.nas_copy
    sshd = request.getfixturevalue("sshd")
    remote_dir = request.getfixturevalue("remote_dir")
    eq = rsync_equipment(lab.root, sshd, remote_dir)
    assert eq.id == EQ and eq.local_root == lab.local_root
    others = tuple(e for e in cfg.equipment if e.id != EQ)
    cfg = cfg.model_copy(update={"equipment": (eq, *others)})
    return cfg, lambda run: remote_dir / run.relative_to(lab.local_root / EQ)


def damage_nas(nas: Path, damage: str) -> tuple[str, ...]:
    """Damage the NAS copy; the manifest files it no longer holds whole, sorted."""
    if damage == "run folder deleted":
        shutil.rmtree(nas)
        return tuple(sorted(FILES))
    if damage == "file deleted":
        (nas / "sub" / "stack.raw").unlink()
    else:
        os.truncate(nas / "sub" / "stack.raw", 1000)
    return ("sub/stack.raw",)


def nas_files(nas: Path) -> dict[str, bytes]:
    return {rel: (nas / rel).read_bytes() for rel in FILES if (nas / rel).is_file()}


@pytest.mark.network
@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("backend", ["mount", "rsync_ssh"])
async def test_cleanup_never_deletes_a_run_whose_nas_copy_is_incomplete(
    lab: Lab, request: pytest.FixtureRequest, backend: str, damage: str
) -> None:
    clock = Clock()
    cfg, nas_copy = nas_setup(lab, request, backend)
    run = lab.make_run(files=FILES)
    nas = nas_copy(run)
    async with running(cfg, clock) as client:
        first = await ready(client, clock, run)
        assert nas_files(nas) == FILES
        bad = damage_nas(nas, damage)

        [dry] = await client.cleanup_once(dry_run=True)  # shows the refusal, changes nothing
        assert dry.action == "would_requeue" and dry.paths == bad, dry
        assert "NAS copy incomplete" in dry.reason
        assert (await client.job(run)).state == S.VERIFIED

        outcomes = acts(await client.cleanup_once())
        assert [o.action for o in outcomes] == ["requeued"], outcomes
        assert data_intact(run)  # not one local byte deleted
        job = await client.job(run)
        back = [e for e in events(job, "transition") if e.from_state == "cleanup_eligible" and e.to_state == "queued"]
        assert len(back) == 1, [(e.kind, e.detail) for e in job.events]
        assert back[0].detail.startswith("NAS copy incomplete: ") and all(p in back[0].detail for p in bad)

        await client.wait_idle(timeout=60)  # the re-transfer sends the missing files again
        job = await client.job(run)
        assert job.state == S.VERIFIED and job.verify_passes == 1, job.last_error
        assert job.verified_at > first.verified_at  # the verification clock starts again
        assert nas_files(nas) == FILES

        job = await ready_again(client, clock, run)
        outcomes = acts(await client.cleanup_once())
        assert [o.action for o in outcomes] == ["deleted"], outcomes
        assert (await client.job(run)).state == S.CLEANED
    assert not any((run / rel).exists() for rel in FILES)
    assert nas_files(nas) == FILES


async def ready_again(client: Any, clock: Clock, run: Path) -> Any:
    """After a re-transfer: audited 6 h later, then 25 h old."""
    clock.advance(6)
    await client.audit_once()
    clock.advance(19)
    job = await client.job(run)
    assert job.verify_passes == 2, job.last_error
    return job


@pytest.mark.network
@pytest.mark.parametrize("backend", ["mount", "rsync_ssh"])
async def test_audit_of_a_nas_copy_gone_or_emptied_sends_the_job_back_and_counts_no_pass(
    lab: Lab, request: pytest.FixtureRequest, backend: str
) -> None:
    clock = Clock()
    cfg, nas_copy = nas_setup(lab, request, backend, enabled=False)
    run = lab.make_run(files=FILES)
    nas = nas_copy(run)
    async with running(cfg, clock) as client:
        for how in ("emptied", "deleted"):
            await client.wait_idle(timeout=60)
            job = await client.job(run) if how == "deleted" else await synced(client, run)
            assert job.state == S.VERIFIED and job.verify_passes == 1, job.last_error
            if how == "emptied":
                for rel in FILES:
                    (nas / rel).unlink()
            else:
                shutil.rmtree(nas)
            clock.advance(6)
            await client.audit_once()
            job = await client.job(run)
            assert not any(e.kind == "verify_pass" for e in job.events), how
            back = [e for e in events(job, "transition") if e.from_state == "verified" and e.to_state == "queued"]
            assert len(back) == (1 if how == "emptied" else 2), how
            assert "audit mismatch: 0 different, 3 missing" in back[-1].detail
            await client.wait_idle(timeout=60)
            assert nas_files(nas) == FILES and data_intact(run)


async def test_an_injected_probe_saying_reachable_never_lets_an_unmounted_share_be_cleaned(lab: Lab) -> None:
    """``remote_stat_callable`` answers reachability only; the listing is the real transport's."""
    clock = Clock()
    cfg = config(lab)
    run = lab.make_run(files=FILES)
    async with running(cfg, clock, remote_stat_callable=lambda job: True) as client:
        await ready(client, clock, run)
        (lab.nas / EQ / ".exlab-nas").unlink()  # the share is unmounted: a bare folder at the mount point
        for _ in range(2):
            outcomes = acts(await client.cleanup_once())
            assert [o.action for o in outcomes] == ["waiting"], outcomes
            assert outcomes[0].reason.startswith("remote unreachable: ") and "not mounted" in outcomes[0].reason
        job = await client.job(run)
        assert job.state == S.CLEANUP_ELIGIBLE
        assert [e.detail for e in events(job, "cleanup_refused")] == [outcomes[0].reason]  # recorded once
        assert data_intact(run)
        (lab.nas / EQ / ".exlab-nas").write_text("mounted\n")
        shutil.rmtree(lab.nas_copy(run))  # mounted again, but the run folder is gone
        outcomes = acts(await client.cleanup_once())
        assert [o.action for o in outcomes] == ["requeued"], outcomes
        assert data_intact(run)


async def test_an_injected_hashsum_saying_all_is_well_never_replaces_the_listing(lab: Lab) -> None:
    """A fake remote manifest that always matches cannot make a deletion easier than the real NAS allows."""
    clock = Clock()
    cfg = config(lab)
    run = lab.make_run(files=FILES)

    def hashsum_factory(equipment: Any) -> Any:
        async def hashsum(run_path: Path) -> dict[str, str]:
            return {rel: hashlib.sha256(data).hexdigest() for rel, data in FILES.items()}

        return hashsum

    fakes = {"hashsum_callable_factory": hashsum_factory, "remote_stat_callable": lambda job: True}
    async with running(cfg, clock, **fakes) as client:
        await ready(client, clock, run)
        (lab.nas_copy(run) / "notes.txt").unlink()
        outcomes = acts(await client.cleanup_once())
        assert [o.action for o in outcomes] == ["requeued"] and outcomes[0].paths == ("notes.txt",), outcomes
        assert data_intact(run)


@pytest.mark.network
@pytest.mark.parametrize("backend", ["mount", "rsync_ssh"])
async def test_exlab_sync_cleanup_on_a_run_whose_nas_folder_was_deleted_deletes_nothing(
    lab: Lab, request: pytest.FixtureRequest, backend: str
) -> None:
    """The issue as a lab administrator met it: sync, verify, delete the NAS folder, ``exlab-sync cleanup``."""
    cfg, nas_copy = nas_setup(lab, request, backend)
    eq = cfg.equipment_by_id(EQ)
    config_file = lab.root / "config.yaml"
    config_file.write_text(
        json.dumps(
            {
                "equipment": [
                    {
                        "id": EQ,
                        "local_root": str(lab.local_root),
                        "transport": json.loads(eq.transport.model_dump_json(exclude_none=True)),
                    }
                ],
                "sync": {"backoff_s": [0.01], "scan_interval_s": 3600, "audit_interval_s": 6 * 3600},
                "nas_cleanup": {"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": True},
                "state_dir": str(lab.state),
            }
        )
    )
    run = lab.make_run(files=FILES)
    clock = Clock()
    clock.advance(-30)
    async with running(cfg, clock) as client:
        await synced(client, run)
        clock.advance(6)
        await client.audit_once()  # 2 passes, first verified 30 h ago
    shutil.rmtree(nas_copy(run))

    done = _cli("cleanup", "--config", str(config_file))
    assert (
        "requeued" in _row(done.stdout, run.relative_to(lab.local_root))
        and "NAS copy incomplete: missing on the NAS" in done.stdout
    ), done.stdout + done.stderr
    assert "freed 0 B" in done.stdout
    assert done.returncode == 1, "a NAS copy found incomplete is a problem found: exit 1"
    assert data_intact(run)
    status = _cli("status", str(run), "--config", str(config_file))
    assert "queued" in status.stdout, status.stdout + status.stderr
