"""The audit loop and the cleanup reaper through the real NASSyncClient.

Real files, the real mount transport, the real verifier and queue. Time is an
injected clock (real time plus an offset the test moves forward), so "25 h
later" takes no time. ``scan_interval_s`` is an hour of real time unless a test
runs the background loops, so the audit and the reaper run only when a test
asks (``audit_once`` / ``cleanup_once``); the dispatcher (transfers) runs as
usual.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from exlab_wizard.config import Config, parse_config
from exlab_wizard.sync.equipment_log import log_path_for
from exlab_wizard.sync.manifest_format import read_manifest
from exlab_wizard.sync.nas_client import NASSyncClient
from exlab_wizard.sync.reaper import deletion
from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock, flip_byte_keep_stat, until
from tests.lab import EQ, FILES, Lab, acts, data_intact, events, ready, running, synced
from tests.lab import cleanup_config as config

S = SyncJobState
HOUR = dt.timedelta(hours=1)


def set_cleanup(client: NASSyncClient, **changes: Any) -> None:
    """Change ``nas_cleanup`` on a running client (as a config reload would)."""
    cfg = client.config
    client.config = cfg.model_copy(update={"nas_cleanup": cfg.nas_cleanup.model_copy(update=changes)})
    if client._reaper is not None:
        client._reaper.config = client.config


def refusals(job: Any) -> list[str]:
    return [e.detail for e in events(job, "cleanup_refused")]


def tree(root: Path) -> dict[str, bytes | str]:
    """Everything under root, not following symlinks."""
    out: dict[str, bytes | str] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "-> " + os.readlink(path)
            elif path.is_file():
                out[rel] = path.read_bytes()
    return out


def log_lines(lab: Lab, cfg: Config, event: str) -> list[str]:
    path = log_path_for(cfg.equipment_by_id(EQ))
    if not path.exists():
        return []
    return [line for line in path.read_text().splitlines() if f" {event} " in line or line.endswith(f" {event}")]


# --------------------------------------------------------------------------- the audit loop


async def test_audit_loop_adds_a_pass_with_its_time_every_interval(lab: Lab) -> None:
    clock = Clock()
    cfg = config(lab, loops=True, enabled=False)
    run = lab.make_run(files=FILES)
    async with running(cfg, clock) as client:
        job = await synced(client, run)
        t0 = job.verified_at
        assert job.verify_passes == 1 and job.pass_times == (t0,)
        clock.advance(5)
        await asyncio.sleep(0.4)  # several loop turns: not due yet
        assert (await client.job(run)).verify_passes == 1
        clock.advance(1)

        async def two_passes() -> bool:
            return (await client.job(run)).verify_passes == 2

        await until(two_passes)
        job = await client.job(run)
        assert job.verified_at == t0  # later passes never move the first verification
        assert len(job.pass_times) == 2 and job.pass_times[0] == t0
        assert dt.timedelta(hours=6) <= job.pass_times[1] - t0 < dt.timedelta(hours=6, minutes=1)
        assert job.last_verify_at == job.pass_times[1]
        assert [e.detail for e in events(job, "verify_pass")] == [f"audit pass 2: {len(FILES)} files match"]
    assert len(log_lines(lab, cfg, "audit_pass")) == 1


async def test_audit_loop_never_audits_while_a_bandwidth_window_limits_the_equipment(lab: Lab) -> None:
    every_day = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
    local = dt.datetime.now().astimezone()  # a window open now, and for the hours the test moves on
    start, end = ((local + dt.timedelta(hours=h)).strftime("%H:%M") for h in (-1, 12))
    cfg = parse_config(
        {
            "equipment": [
                {
                    "id": EQ,
                    "local_root": str(lab.local_root),
                    "transport": {"type": "mount", "mount_path": str(lab.nas / EQ)},
                },
                {
                    "id": "FACS_02",
                    "local_root": str(lab.local_root),
                    "transport": {
                        "type": "mount",
                        "mount_path": str(lab.nas / "FACS_02"),
                        "bandwidth": {
                            "upload_mbps": 500,
                            "schedule": [{"days": every_day, "from": start, "to": end}],
                        },
                    },
                },
            ],
            "sync": {"backoff_s": [0.01], "scan_interval_s": 0.05, "audit_interval_s": 6 * 3600},
            "state_dir": str(lab.state),
        }
    )
    clock = Clock()
    free = lab.make_run("Run_free", files=FILES)
    limited = lab.make_run("Run_limited", files=FILES, equipment="FACS_02")
    async with running(cfg, clock) as client:
        await synced(client, free)
        await synced(client, limited)
        clock.advance(6)

        async def free_audited() -> bool:
            return (await client.job(free)).verify_passes == 2

        await until(free_audited)
        await asyncio.sleep(0.3)
        job = await client.job(limited)
        assert job.state == S.VERIFIED and job.verify_passes == 1  # the window limits FACS_02 now


async def test_audit_skips_while_the_share_is_unmounted(lab: Lab) -> None:
    clock = Clock()
    cfg = config(lab)
    run = lab.make_run(files=FILES)
    async with running(cfg, clock) as client:
        await synced(client, run)
        (lab.nas / EQ / ".exlab-nas").unlink()
        clock.advance(6)
        await client.audit_once()
        job = await client.job(run)
        assert job.state == S.VERIFIED and job.verify_passes == 1  # no pass, no failure
        assert [e.detail for e in events(job, "audit_skipped")] == ["remote unreachable"]
        clock.advance(6)
        await client.audit_once()  # still away: the skip is not recorded again
        job = await client.job(run)
        assert [e.detail for e in events(job, "audit_skipped")] == ["remote unreachable"]
        (lab.nas / EQ / ".exlab-nas").write_text("mounted\n")
        await client.audit_once()
        assert (await client.job(run)).verify_passes == 2


async def test_audit_with_the_local_disk_away_skips_and_with_a_changed_manifest_checks_the_queue_record(
    lab: Lab,
) -> None:
    clock = Clock()
    cfg = config(lab, enabled=False)
    run = lab.make_run(files=FILES)
    async with running(cfg, clock) as client:
        await synced(client, run)
        away = lab.root / "unplugged"
        run.rename(away)  # the external data disk is unplugged
        clock.advance(6)
        await client.audit_once()
        job = await client.job(run)
        assert job.state == S.VERIFIED and job.verify_passes == 1, job.last_error
        assert events(job)[-1].kind == "audit_skipped" and "local run folder missing" in events(job)[-1].detail
        away.rename(run)
        manifest = run / ".exlab-wizard" / "checksums.sha256"
        good = manifest.read_bytes()
        manifest.write_bytes(b"".join(line for line in good.splitlines(keepends=True) if b"notes.txt" not in line))
        await client.audit_once()
        job = await client.job(run)
        # An edited checksums.sha256 is not the verified record: the hashes the queue recorded at
        # verification stand in for it (as for the reaper), so the NAS copy is still checked in full.
        assert job.state == S.VERIFIED and job.verify_passes == 2
        assert events(job)[-1].detail == "audit pass 2: 3 files match"
        manifest.write_bytes(good)
        await client.audit_once()
        assert (await client.job(run)).verify_passes == 3


async def test_audit_mismatch_with_local_damage_too_fails_and_sends_nothing(lab: Lab) -> None:
    clock = Clock()
    cfg = config(lab, enabled=False)
    run = lab.make_run(files=FILES)
    nas = lab.nas_copy(run)
    async with running(cfg, clock) as client:
        await synced(client, run)
        flip_byte_keep_stat(nas / "sub" / "stack.raw", 7)
        flip_byte_keep_stat(run / "sub" / "stack.raw", 9)  # the local copy rotted as well
        nas_before, local_before = tree(nas), tree(run)
        clock.advance(6)
        await client.audit_once()
        await client.wait_idle(timeout=30)
        job = await client.job(run)
        assert job.state == S.FAILED and job.error_kind == "local_damage", job.last_error
        assert "audit mismatch: 1 different" in job.last_error and "sub/stack.raw" in job.last_error
        assert tree(nas) == nas_before  # the damaged local bytes were never sent
        assert {k: v for k, v in tree(run).items() if not k.startswith(".exlab-wizard")} == {
            k: v for k, v in local_before.items() if not k.startswith(".exlab-wizard")
        }


async def test_corrupted_nas_copy_fails_the_audit_cancels_the_deletion_and_is_resynced(lab: Lab) -> None:
    clock = Clock()
    cfg = config(lab, enabled=False)
    run = lab.make_run(files=FILES)
    nas = lab.nas_copy(run)
    async with running(cfg, clock) as client:
        job = await ready(client, clock, run)
        first_verified = job.verified_at
        await client.cleanup_once()
        job = await client.job(run)
        assert job.state == S.VERIFIED and refusals(job)[-1] == "cleanup disabled"  # cleanup off: stays verified
        # The NAS copy rots: same size, same mtime, one byte different.
        flip_byte_keep_stat(nas / "sub" / "stack.raw", 100)
        set_cleanup(client, enabled=True)  # the lab turns cleanup on: the deletion is now pending
        await client._reaper._promote(await client.job(run))
        assert (await client.job(run)).state == S.CLEANUP_ELIGIBLE
        clock.advance(6)
        await client.audit_once()
        job = await client.job(run)
        back = [e for e in events(job, "transition") if e.from_state == "cleanup_eligible" and e.to_state == "queued"]
        assert len(back) == 1 and "audit mismatch: 1 different" in back[0].detail, [e.detail for e in job.events]
        assert "hash_mismatch" in back[0].detail  # decided by the retry policy
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert job.state == S.VERIFIED, job.last_error
        # The re-transfer rewrote the rotten file although its size and mtime matched.
        assert (nas / "sub" / "stack.raw").read_bytes() == FILES["sub/stack.raw"]
        assert job.verify_passes == 1 and job.verified_at > first_verified  # the clock starts again
        outcomes = acts(await client.cleanup_once())
        assert [o.action for o in outcomes] == ["waiting"] and outcomes[0].reason == "waiting: 1 of 2 verify passes"
        assert data_intact(run)


async def test_audit_mismatch_counts_as_the_first_mismatch_of_the_retry_policy(lab: Lab) -> None:
    clock = Clock()
    cfg = config(lab, enabled=False)
    run = lab.make_run(files=FILES)
    holder: dict[str, Any] = {"rot": False}

    def hashsum_factory(equipment: Any) -> Any:
        async def hashsum(run_path: Path) -> Any:
            answer = await holder["client"]._transport(equipment).remote_manifest(run_path)
            if holder["rot"]:  # the NAS keeps returning a bad copy of notes.txt, whatever is written
                answer = dataclasses.replace(answer, hashes={**answer.hashes, "notes.txt": "0" * 64})
            return answer

        return hashsum

    async with running(cfg, clock, hashsum_callable_factory=hashsum_factory) as client:
        holder["client"] = client
        await synced(client, run)
        holder["rot"] = True
        clock.advance(6)
        await client.audit_once()
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert job.state == S.FAILED and job.error_kind == "hash_mismatch", job.last_error
        assert "mismatch 2 after a re-transfer" in job.last_error
        transfers = [e for e in events(job, "transition") if e.to_state == "running"]
        assert len(transfers) == 2  # the first sync, then exactly one re-transfer after the audit
        back = [e for e in events(job, "transition") if e.from_state == "verified" and e.to_state == "queued"]
        assert len(back) == 1 and "first mismatch" in back[0].detail
    assert data_intact(run)


async def test_audit_mismatch_is_not_lost_when_the_reaper_promotes_the_job_meanwhile(lab: Lab) -> None:
    clock = Clock()
    cfg = config(lab, enabled=True)
    run = lab.make_run(files=FILES)
    holder: dict[str, NASSyncClient] = {}

    def hashsum_factory(equipment: Any) -> Any:
        async def hashsum(run_path: Path) -> Any:
            client = holder["client"]
            answer = await client._transport(equipment).remote_manifest(run_path)
            if holder.get("promote"):
                holder.pop("promote")
                await client.cleanup_once()  # the reaper promotes the job while the audit reads the NAS
            return answer

        return hashsum

    async with running(cfg, clock, hashsum_callable_factory=hashsum_factory) as client:
        holder["client"] = client
        await synced(client, run)
        clock.advance(6)
        await client.audit_once()
        clock.advance(19)
        job = await client.job(run)
        assert job.state == S.VERIFIED and job.verify_passes == 2
        flip_byte_keep_stat(lab.nas_copy(run) / "notes.txt")
        holder["promote"] = True
        set_cleanup(client, enabled=False)  # the promotion happens; the deletion must not
        await client.audit_once()
        job = await client.job(run)
        assert job.state != S.CLEANUP_ELIGIBLE, [e.detail for e in job.events]
        assert any("audit mismatch" in e.detail for e in job.events)
        set_cleanup(client, enabled=True)
        await client.wait_idle(timeout=60)
        await client.cleanup_once()
        assert data_intact(run)


# --------------------------------------------------------------------------- the verification clock


async def test_verification_clock_24h_with_audits_every_6h_cleans_a_run_verified_25h_ago(lab: Lab) -> None:
    clock = Clock()
    cfg = config(lab, loops=True)
    run = lab.make_run(files=FILES)
    async with running(cfg, clock) as client:
        job = await synced(client, run)
        t0 = job.verified_at
        for passes in (2, 3, 4):  # audits at 6, 12 and 18 h (the background audit loop)
            clock.advance(6)

            async def counted(n: int = passes) -> bool:
                return (await client.job(run)).verify_passes == n

            await until(counted)
        await asyncio.sleep(0.3)  # the background reaper has looked at it at 18 h
        job = await client.job(run)
        assert job.state == S.VERIFIED and data_intact(run)  # not even eligible: 18 h of 24 h
        assert refusals(job)[-1].endswith(" h of 24 h"), refusals(job)  # recorded once, not every pass
        [dry] = await client.cleanup_once(dry_run=True)
        assert dry.action == "waiting" and dry.reason.startswith("waiting: 18") and dry.reason.endswith(" h of 24 h")
        assert job.verified_at == t0
        clock.advance(7)  # 25 h after the first verification, 7 h after the last pass

        async def cleaned() -> bool:
            return (await client.job(run)).state == S.CLEANED

        await until(cleaned)
        job = await client.job(run)
        assert job.verified_at == t0 and job.pass_times[0] == t0 and job.verify_passes >= 4
    assert not any((run / rel).exists() for rel in FILES)
    assert tree(lab.nas_copy(run)).items() >= {rel: data for rel, data in FILES.items()}.items()


# --------------------------------------------------------------------------- all six hold


async def test_cleanup_deletes_the_manifest_files_logs_and_records_it(lab: Lab) -> None:
    clock = Clock()
    cfg = config(lab)
    run = lab.make_run(files=FILES)
    (run / "empty_marker_dir").mkdir()
    async with running(cfg, clock) as client:
        job = await ready(client, clock, run)
        outcomes = acts(await client.cleanup_once())
        assert [o.action for o in outcomes] == ["deleted"]
        job = await client.job(run)
    assert job.state == S.CLEANED
    total = sum(len(d) for d in FILES.values())
    assert outcomes[0].files == len(FILES) and outcomes[0].bytes == total
    # Exactly the manifest's files are gone; the cache and an empty folder that was never synced stay.
    assert not any((run / rel).exists() for rel in FILES) and not (run / "sub").exists()
    assert (run / "empty_marker_dir").is_dir()
    assert (run / ".exlab-wizard" / "checksums.sha256").is_file()
    assert set(read_manifest(run)) == set(FILES)
    # The NAS copy is untouched.
    nas = tree(lab.nas_copy(run))
    assert all(nas[rel] == data for rel, data in FILES.items())
    # The equipment log line a court can read.
    [line] = log_lines(lab, cfg, "cleanup_deleted")
    stamps = ",".join(t.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z") for t in job.pass_times)
    for field in (
        f"files={len(FILES)}",
        f"bytes={total}",
        "verify_passes=2",
        f"pass_times={stamps}",
        f"manifest_digest={job.manifest_digest}",
    ):
        assert field in line.split(), (field, line)
    assert str(run) in line
    # creation.json keeps the record.
    record = json.loads((run / ".exlab-wizard" / "creation.json").read_text())["local_cleaned"]
    assert record["files"] == len(FILES) and record["bytes"] == total
    assert record["manifest_digest"] == job.manifest_digest and record["at"].endswith("Z")
    assert json.loads((run / ".exlab-wizard" / "creation.json").read_text())["lab_note"] == {"keep": ["me"]}
    kinds = [e.kind for e in job.events]
    assert kinds.index("cleanup_planned") < kinds.index("cleanup_deleted")


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ("disabled", "cleanup disabled"),
        ("one_pass", "waiting: 1 of 2 verify passes"),
        ("young", "waiting: 20 h of 24 h"),
        ("unmounted", "remote unreachable"),
        ("revoked", "override revoked since verification: 0b6f9c1e-2c7a-4a64-9a57-6d0f2e6f1a01"),
    ],
)
async def test_each_interlock_alone_refuses_through_the_client(lab: Lab, setup: str, reason: str) -> None:
    override = {
        "id": "0b6f9c1e-2c7a-4a64-9a57-6d0f2e6f1a01",
        "problem_class": "unresolved_placeholder_token",
        "operator": "asmith",
        "recorded_at": "2026-01-01T00:00:00Z",
        "expires_at": None,
        "reason": "the instrument writes <sample> in its notes",
        "revoked": False,
    }
    files = dict(FILES)
    files["notes.txt"] = b"sample: <sample>\n"
    clock = Clock()
    cfg = config(lab, enabled=setup != "disabled")
    run = lab.make_run(files=files, overrides=[override])
    async with running(cfg, clock) as client:
        await synced(client, run)
        job = await client.job(run)
        assert job.overrides_relied_on == (override["id"],)
        if setup != "one_pass":
            clock.advance(6)
            await client.audit_once()
        clock.advance(20 - 6 if setup == "young" else 19)
        if setup == "unmounted":
            (lab.nas / EQ / ".exlab-nas").unlink()
        if setup == "revoked":

            def revoke(raw: dict) -> None:
                raw["validation_overrides"][0]["revoked"] = True

            client.cache.update(run, revoke)
        outcomes = acts(await client.cleanup_once())
        assert [(o.action, o.reason) for o in outcomes] == [("waiting", reason)]
        job = await client.job(run)
        assert refusals(job)[-1] == reason
        assert data_intact(run, files)
        # The same refusal is not recorded again on the next pass.
        await client.cleanup_once()
        assert refusals(await client.job(run)).count(reason) == 1


# --------------------------------------------------------------------------- the local run changed


async def test_file_edited_after_verification_requeues_and_resyncs(lab: Lab) -> None:
    clock = Clock()
    cfg = config(lab)
    run = lab.make_run(files=FILES)
    async with running(cfg, clock) as client:
        await ready(client, clock, run)
        target = run / "notes.txt"
        old = os.stat(target)
        target.write_bytes(b"acquired ok, then annotated\n")
        os.utime(target, ns=(old.st_atime_ns, old.st_mtime_ns + 5_000_000_000))
        outcomes = acts(await client.cleanup_once())
        assert [(o.action, o.reason) for o in outcomes] == [("requeued", "local file changed: notes.txt")]
        assert target.read_bytes() == b"acquired ok, then annotated\n"
        assert data_intact(run, {k: v for k, v in FILES.items() if k != "notes.txt"})
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert job.state == S.VERIFIED and job.verify_passes == 1, job.last_error
        kinds = [(e.from_state, e.to_state) for e in events(job, "transition")]
        assert ("cleanup_eligible", "queued") in kinds and kinds[-1] == ("awaiting_verify", "verified")
    assert (lab.nas_copy(run) / "notes.txt").read_bytes() == b"acquired ok, then annotated\n"


async def test_file_added_after_verification_goes_back_through_the_gate(lab: Lab) -> None:
    clock = Clock()
    cfg = config(lab)
    run = lab.make_run(files=FILES)
    async with running(cfg, clock) as client:
        await ready(client, clock, run)
        added = run / "late" / "results.csv"
        added.parent.mkdir()
        added.write_text("sample,<sample_id>\n")  # an unresolved placeholder: the gate must hold it
        outcomes = acts(await client.cleanup_once())
        assert [(o.action, o.reason) for o in outcomes] == [("requeued", "local file added: late/results.csv")]
        await client.wait_idle(timeout=30)
        job = await client.job(run)
        assert job.state == S.QUEUED
        assert [e.detail for e in events(job, "gate_hold")] == ["held by the gate: unresolved_placeholder_token"]
        # The hold is recognised by its code (the sorted blocking rules), not its text.
        assert [e.code for e in events(job, "gate_hold")] == ["unresolved_placeholder_token"]
        assert [e.code for e in events(job, "cleanup_refused")] == []
        assert not (lab.nas_copy(run) / "late").exists()
        assert data_intact(run) and added.exists()
        added.write_text("sample,S-17\n")  # the operator fixes it; the held job is tried again
        clock.advance(2)
        await client.wait_idle(timeout=60)
        job = await client.job(run)
        assert job.state == S.VERIFIED, job.last_error
        assert set(read_manifest(run)) == set(FILES) | {"late/results.csv"}
    assert (lab.nas_copy(run) / "late" / "results.csv").read_text() == "sample,S-17\n"
    assert data_intact(run)


async def test_local_damage_fails_the_job_and_never_reaches_the_nas(lab: Lab) -> None:
    clock = Clock()
    cfg = config(lab)
    run = lab.make_run(files=FILES)
    async with running(cfg, clock) as client:
        await ready(client, clock, run)
        nas_before = tree(lab.nas_copy(run))
        flip_byte_keep_stat(run / "sub" / "stack.raw", 42)
        damaged = (run / "sub" / "stack.raw").read_bytes()
        outcomes = acts(await client.cleanup_once())
        assert [o.action for o in outcomes] == ["failed"]
        await asyncio.sleep(0.2)
        await client.wait_idle(timeout=30)
        job = await client.job(run)
        assert job.state == S.FAILED and job.error_kind == "local_damage"
        assert "local damage: sub/stack.raw" in job.last_error
        # Nothing deleted, nothing sent: the good NAS copy is left as verified.
        assert (run / "sub" / "stack.raw").read_bytes() == damaged
        assert data_intact(run, {k: v for k, v in FILES.items() if k != "sub/stack.raw"})
        assert tree(lab.nas_copy(run)) == nas_before
        assert not any(e.to_state == "running" and e.at > job.verified_at for e in events(job, "transition"))
    [line] = log_lines(lab, cfg, "cleanup_failed")
    assert "kind=local_damage" in line


# --------------------------------------------------------------------------- symlinks


async def test_symlinks_pointing_outside_the_run_are_never_followed(lab: Lab) -> None:
    outside = lab.root / "outside"
    (outside / "folder").mkdir(parents=True)
    (outside / "folder" / "precious.dat").write_bytes(b"not ours")
    (outside / "single.dat").write_bytes(b"not ours either")
    clock = Clock()
    cfg = config(lab)
    run = lab.make_run(files=FILES)
    os.symlink(outside / "folder", run / "linked_folder")
    os.symlink(outside / "single.dat", run / "sub" / "linked_file.dat")
    before = tree(outside)
    async with running(cfg, clock) as client:
        await ready(client, clock, run)
        assert set(read_manifest(run)) == set(FILES)  # symlinks are never synced
        outcomes = acts(await client.cleanup_once())
        assert [o.action for o in outcomes] == ["deleted"]
    assert tree(outside) == before
    assert os.readlink(run / "linked_folder") == str(outside / "folder")
    assert os.readlink(run / "sub" / "linked_file.dat") == str(outside / "single.dat")
    assert not any((run / rel).exists() for rel in FILES)


async def test_run_folder_replaced_by_a_symlink_after_verification(lab: Lab) -> None:
    clock = Clock()
    cfg = config(lab)
    run = lab.make_run(files=FILES)
    async with running(cfg, clock) as client:
        await ready(client, clock, run)
        moved = lab.root / "elsewhere" / run.name
        moved.parent.mkdir()
        shutil.move(str(run), str(moved))
        os.symlink(moved, run)
        before = tree(moved)
        outcomes = acts(await client.cleanup_once())
        assert [(o.action, o.reason) for o in outcomes] == [("waiting", "run folder is a symlink")]
        job = await client.job(run)
        assert job.state == S.CLEANUP_ELIGIBLE and refusals(job)[-1] == "run folder is a symlink"
        # Still refused on the next pass; nothing reached through the link is touched.
        await client.cleanup_once()
        clock.advance(6)
        await client.audit_once()
        await client.cleanup_once()
        assert tree(moved) == before and data_intact(moved)
        assert os.path.islink(run)


# --------------------------------------------------------------------------- retain_cache: false


def first_final_push_fails(client: NASSyncClient, note: Callable[[], Any] = lambda: None) -> list[Any]:
    """The reaper's first final metadata push fails (the NAS refuses it), later ones go through.

    Returns the list of what ``note()`` said at each push, as it grows.
    """
    reaper = client._reaper
    real_push = reaper.push_metadata
    calls: list[Any] = []

    async def push(job_row: Any) -> bool:
        calls.append(note())
        if len(calls) == 1:
            return False
        return await real_push(job_row)

    reaper.push_metadata = push
    return calls


async def test_retain_cache_false_removes_the_run_folder_only_after_the_final_push_is_verified(lab: Lab) -> None:
    clock = Clock()
    cfg = config(lab, retain_cache=False)
    run = lab.make_run(files=FILES)
    nas = lab.nas_copy(run)
    async with running(cfg, clock) as client:
        job = await ready(client, clock, run)
        calls = first_final_push_fails(
            client,
            lambda: {
                "data_left": [rel for rel in FILES if (run / rel).exists()],
                "cache": (run / ".exlab-wizard" / "creation.json").exists(),
            },
        )
        outcomes = acts(await client.cleanup_once())
        assert [(o.action, o.reason) for o in outcomes] == [("waiting", "waiting: final metadata push not verified")]
        assert calls == [{"data_left": [], "cache": True}]
        assert run.is_dir() and (run / ".exlab-wizard" / "checksums.sha256").is_file()
        assert (await client.job(run)).state == S.CLEANUP_ELIGIBLE
        # Local data are gone now: the audit must not treat the run as if they existed.
        flip_byte_keep_stat(nas / "image_001.tif")
        clock.advance(6)
        await client.audit_once()
        job = await client.job(run)
        assert job.state == S.CLEANUP_ELIGIBLE, [e.detail for e in job.events]
        assert any(e.kind == "audit_skipped" and "local data already deleted" in e.detail for e in job.events)
        flip_byte_keep_stat(nas / "image_001.tif")  # (restore, for the final check below)
        # As if a pass had crashed part-way through removing the cache: the manifest is gone, the plan is not.
        (run / ".exlab-wizard" / "checksums.sha256").unlink()
        outcomes = acts(await client.cleanup_once())
        assert [o.action for o in outcomes] == ["deleted"], (
            outcomes,
            [e.detail for e in (await client.job(run)).events],
        )
        assert "run folder removed" in outcomes[0].reason
        job = await client.job(run)
        assert job.state == S.CLEANED
    assert not run.exists() and run.parent.is_dir()
    # The final push carried the record of the cleaning to the NAS.
    record = json.loads((nas / ".exlab-wizard" / "creation.json").read_text())["local_cleaned"]
    assert record["files"] == len(FILES) and record["manifest_digest"] == job.manifest_digest
    assert all((nas / rel).read_bytes() == data for rel, data in FILES.items())
    assert len(log_lines(lab, cfg, "cleanup_run_folder_removed")) == 1


# The final metadata push never sends a damaged local checksums.sha256 over the verified one (rule 2).
# With retain_cache: false the local data are deleted before the final push; the NAS's
# checksums.sha256 is then the last full record of the verified hashes. Before, a local one
# damaged while the job waited for the NAS was pushed over it, "proved" by reading it back, and
# the local copy deleted. final_push now refuses as send_pending does.


async def test_final_push_never_replaces_the_verified_manifest_on_the_nas(lab: Lab) -> None:
    clock = Clock()
    cfg = config(lab, retain_cache=False)
    run = lab.make_run(files=FILES)
    nas = lab.nas_copy(run)
    async with running(cfg, clock) as client:
        job = await ready(client, clock, run)
        nas_manifest = nas / ".exlab-wizard" / "checksums.sha256"
        assert hashlib.sha256(nas_manifest.read_bytes()).hexdigest() == job.manifest_digest  # the verified one
        first_final_push_fails(client)  # the NAS is away for the first: the job waits, data already deleted
        outcomes = acts(await client.cleanup_once())
        assert [o.action for o in outcomes] == ["waiting"]
        assert not any((run / rel).exists() for rel in FILES)  # local data gone, .exlab-wizard/ kept

        # While the job waits, the local checksums.sha256 rots (one byte, size and mtime kept).
        flip_byte_keep_stat(run / ".exlab-wizard" / "checksums.sha256", offset=3)

        await client.cleanup_once()
        job = await client.job(run)
    assert hashlib.sha256(nas_manifest.read_bytes()).hexdigest() == job.manifest_digest, (
        f"the NAS's verified checksums.sha256 was replaced by the damaged local one (job {job.state}, "
        f"local run folder exists: {run.exists()})"
    )


async def test_crash_after_the_plan_then_an_audit_failure_drops_the_plan(lab: Lab, monkeypatch) -> None:
    clock = Clock()
    cfg = config(lab)
    run = lab.make_run(files=FILES)
    async with running(cfg, clock) as client:
        await ready(client, clock, run)
        real = deletion.delete_batch

        def power_cut(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("power cut")

        monkeypatch.setattr(deletion, "delete_batch", power_cut)
        outcomes = acts(await client.cleanup_once())
        assert [o.action for o in outcomes] == ["error"]
        assert "cleanup_planned" in [e.kind for e in (await client.job(run)).events]
        monkeypatch.setattr(deletion, "delete_batch", real)
        flip_byte_keep_stat(lab.nas_copy(run) / "notes.txt")
        clock.advance(6)
        await client.audit_once()
        await client.wait_idle(timeout=60)
        outcomes = acts(await client.cleanup_once())
        assert "aborted" in [o.action for o in outcomes]
        job = await client.job(run)
        assert job.state == S.VERIFIED and job.verify_passes == 1
        assert data_intact(run)
    assert (lab.nas_copy(run) / "notes.txt").read_bytes() == FILES["notes.txt"]
