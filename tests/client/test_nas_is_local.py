"""A NAS place that is the local data itself never gets the run deleted (rule 1).

A lab whose instrument writes straight onto the share, or that mounts the
share where the instrument's data already are, sets ``mount_path`` to the
equipment's ``<local_root>/<id>`` (the marker file put there too). Every
run's "NAS copy" is then the run folder itself: the audit hashes the local
files against themselves (a pass at the new place), the listing of interlock
4 shows every file at its size and mtime, and the reaper deleted them: the
configured place held nothing afterwards.

The loader refuses such a ``mount_path``. What it cannot see (a symlink or
bind mount made after the load, a remote path on this very machine) the
reaper refuses right before a plan is written: ``waiting``, code
``nas_is_local``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from exlab_wizard.config import ConfigError, parse_config
from exlab_wizard.config.models import Config
from exlab_wizard.sync.policy.cleanup import CleanupCode
from tests.helpers import Clock
from tests.lab import EQ, FILES, Lab, acts, data_intact, mark_nas, running, synced

CLEANUP = {"enabled": True, "min_verify_passes": 2, "min_age_hours": 24}


def _lab(tmp_path: Path) -> tuple[Lab, dict, Config]:
    lab = Lab.build(tmp_path)
    data = lab.config_data(sync={"backoff_s": [0.01], "scan_interval_s": 3600, "audit_interval_s": 6 * 3600})
    data["nas_cleanup"] = dict(CLEANUP)
    return lab, data, parse_config(data)


def _mounted_at(cfg: Config, share: Path) -> Config:
    """``cfg`` with CONFOCAL_01's mount at ``share``, past the loader (a symlink or bind mount it never saw)."""
    eq = cfg.equipment_by_id(EQ)
    moved = eq.model_copy(update={"transport": eq.transport.model_copy(update={"mount_path": share})})
    return cfg.model_copy(update={"equipment": tuple(moved if e.id == EQ else e for e in cfg.equipment)})


async def _audits_and_cleanups(cfg: Config, clock: Clock, run: Path) -> tuple[list, object]:
    outcomes = []
    async with running(cfg, clock) as client:
        for _ in range(5):
            clock.advance(7)
            await client.audit_once()
            outcomes += acts(await client.cleanup_once())
        job = await client.job(run)
    return outcomes, job


async def test_a_mount_path_at_the_equipment_folder_is_refused_at_load(tmp_path: Path) -> None:
    lab, data, cfg = _lab(tmp_path)
    clock = Clock()
    run = lab.make_run(files=FILES)
    async with running(cfg, clock) as client:
        await synced(client, run)  # verified on the real share

    # The lab points the equipment's mount at its own data folder (the share is mounted there now).
    root = lab.local_root / EQ
    mark_nas(root)
    data["equipment"][0]["transport"]["mount_path"] = str(root)
    try:
        moved = parse_config(data)
    except ConfigError as exc:
        assert "equipment[0].transport.mount_path" in str(exc), exc
        return
    outcomes, job = await _audits_and_cleanups(moved, clock, run)
    here = root / run.relative_to(root)  # where the configuration says the NAS copy is: the run itself
    assert all((here / rel).is_file() for rel in FILES), (
        f"deleted locally, and the configured NAS place ({here}) was the run folder: it holds nothing now "
        f"(job {job.state.value}, verify_passes={job.verify_passes}, "
        f"{[(o.action, o.reason[:80]) for o in outcomes][-1:]})"
    )


async def test_a_mount_that_became_the_local_folder_after_the_load_deletes_nothing(tmp_path: Path) -> None:
    lab, _, cfg = _lab(tmp_path)
    clock = Clock()
    run = lab.make_run(files=FILES)
    async with running(cfg, clock) as client:
        await synced(client, run)
    root = mark_nas(lab.local_root / EQ)
    outcomes, job = await _audits_and_cleanups(_mounted_at(cfg, root), clock, run)
    assert data_intact(run), f"deleted the run whose NAS copy was itself (job {job.state.value}, {outcomes[-1:]})"
    assert outcomes and outcomes[-1].action == "waiting" and outcomes[-1].code == CleanupCode.NAS_IS_LOCAL, outcomes
    assert "is the local run folder" in outcomes[-1].reason, outcomes[-1].reason


async def test_nas_files_that_are_the_local_files_delete_nothing(tmp_path: Path) -> None:
    """A subfolder of the share bind-mounted onto the run's (a hard link stands in: same device and inode)."""
    lab, _, cfg = _lab(tmp_path)
    clock = Clock()
    run = lab.make_run(files=FILES)
    async with running(cfg, clock) as client:
        await synced(client, run)
    nas = lab.nas_copy(run)
    for rel in FILES:
        stat = os.stat(nas / rel)
        (nas / rel).unlink()
        os.link(run / rel, nas / rel)
        os.utime(nas / rel, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    outcomes, job = await _audits_and_cleanups(cfg, clock, run)
    assert data_intact(run), f"deleted local files the NAS copy was made of (job {job.state.value}, {outcomes[-1:]})"
    assert outcomes and outcomes[-1].code == CleanupCode.NAS_IS_LOCAL, outcomes
    assert "is the local file itself" in outcomes[-1].reason, outcomes[-1].reason


async def test_the_jobs_claim_in_the_local_run_deletes_nothing(tmp_path: Path) -> None:
    """A remote path on this very machine (rsync_ssh or rclone to localhost): the push's claim lands in the run."""
    lab, _, cfg = _lab(tmp_path)
    clock = Clock()
    run = lab.make_run(files=FILES)
    async with running(cfg, clock) as client:
        job = await synced(client, run)
    claims = run / ".exlab-wizard" / "claims"
    claims.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(lab.nas_copy(run) / ".exlab-wizard" / "claims" / job.id, claims / job.id)
    outcomes, job = await _audits_and_cleanups(cfg, clock, run)
    assert data_intact(run), f"deleted a run whose NAS folder showed itself local (job {job.state.value})"
    assert outcomes and outcomes[-1].code == CleanupCode.NAS_IS_LOCAL, outcomes
    assert "claim" in outcomes[-1].reason, outcomes[-1].reason


async def test_a_share_apart_from_the_data_is_still_cleaned(tmp_path: Path) -> None:
    lab, _, cfg = _lab(tmp_path)
    clock = Clock()
    run = lab.make_run(files=FILES)
    async with running(cfg, clock) as client:
        await synced(client, run)
    outcomes, job = await _audits_and_cleanups(cfg, clock, run)
    assert job.state.value == "cleaned", (job.state, outcomes)
    assert all(not (run / rel).exists() for rel in FILES)
