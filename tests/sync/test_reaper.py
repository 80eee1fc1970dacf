"""The cleanup reaper on real files and a real queue database.

Every test builds a lab: runs under ``<local_root>/CONF_01/PROJ/Runs``, a
"NAS" folder holding byte-identical copies, the verified manifest, and a job
set up in the queue as the client leaves it after verification (files written
three days ago, transfer 26 h ago, first verification 25 h ago).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import fcntl
import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest

from exlab_wizard.sync import reaper as reaper_mod
from exlab_wizard.sync.manifest_format import format_manifest
from exlab_wizard.sync.policy.cleanup import CleanupCode
from exlab_wizard.sync.queue import JobQueue
from exlab_wizard.sync.reaper import (
    Reaper,
    deletion,
    load_verified_stats,
    local_check,
    record_verified_stat,
    scan_run,
)
from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports.base import TransportError
from exlab_wizard.sync.verifier import hash_tree
from tests.lab import VERIFIED_FILES as DEFAULT_FILES
from tests.lab import VerifiedLab as Lab
from tests.lab import deletion_killed_after_two

S = SyncJobState
HOUR = dt.timedelta(hours=1)
EQ = Lab.EQ


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def snapshot(root: Path) -> dict[str, tuple[str, bytes | str]]:
    """Everything under ``root`` (not following symlinks): kind and content or link target."""
    out: dict[str, tuple[str, bytes | str]] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir", b"")
            else:
                out[rel] = ("file", path.read_bytes())
    return out


@pytest.fixture
def lab(tmp_path: Path):
    lab = Lab.build(tmp_path)
    yield lab
    lab.queue.close()


def assert_nothing_deleted(lab: Lab, run: Path, files: dict[str, bytes] | None = None) -> None:
    assert lab.manifest_files_intact(run, files)
    with lab.queue.transaction() as conn:
        assert conn.execute("SELECT COUNT(*) FROM cleanup_plan").fetchone()[0] == 0


# --------------------------------------------------------------------------- all six hold


def test_all_six_hold_deletes_exactly_the_manifest_files(lab: Lab):
    run, job_id = lab.make_run()
    (run / ".exlab-wizard" / "operator-notes.txt").write_text("not in the manifest, kept with the cache\n")
    (run / "empty_marker").mkdir()  # a folder that was empty before: not "left empty" by the deletion
    outcomes = lab.run_pass()

    assert [o.action for o in outcomes] == ["promoted", "deleted"]
    assert outcomes[1].files == 4 and outcomes[1].bytes == sum(map(len, DEFAULT_FILES.values()))
    assert snapshot(run).keys() == {
        ".exlab-wizard",
        ".exlab-wizard/creation.json",
        ".exlab-wizard/creation.json.lock",
        ".exlab-wizard/checksums.sha256",
        ".exlab-wizard/operator-notes.txt",
        "empty_marker",
    }
    # The NAS copy is untouched.
    assert lab.manifest_files_intact(lab.nas_copy(run))
    job = lab.job(job_id)
    assert job.state == S.CLEANED
    kinds = [(e.kind, e.to_state) for e in lab.queue.events(job_id)]
    assert ("cleanup_planned", None) in kinds and ("cleanup_deleted", None) in kinds
    assert kinds[-1] == ("transition", "cleaned")
    cleaned = lab.writer.read(run).raw["local_cleaned"]
    assert cleaned["files"] == 4 and cleaned["bytes"] == 10012 and cleaned["manifest_digest"] == job.manifest_digest
    line = next(line for line in lab.log_text().splitlines() if " cleanup_deleted " in line)
    assert "files=4 bytes=10012 verify_passes=2 " in line
    assert f"manifest_digest={job.manifest_digest}" in line
    assert (
        "pass_times=" + ",".join(t.isoformat(timespec="seconds").replace("+00:00", "Z") for t in job.pass_times) in line
    )
    with lab.queue.transaction() as conn:
        for table in ("cleanup_plan", "cleanup_progress", "verified_files"):
            assert conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0


def test_the_plan_is_written_before_anything_is_deleted(lab: Lab, monkeypatch):
    run, job_id = lab.make_run(eligible=True)
    seen = []
    real = deletion.delete_batch

    def spy(run_path, batch):
        with lab.queue.transaction() as conn:
            rows = conn.execute("SELECT path, size, sha256, manifest_digest FROM cleanup_plan").fetchall()
        seen.append({os.fsdecode(r["path"]): (r["size"], r["sha256"], r["manifest_digest"]) for r in rows})
        assert lab.manifest_files_intact(run)
        return real(run_path, batch)

    monkeypatch.setattr(deletion, "delete_batch", spy)
    lab.run_pass()
    digest = lab.job(job_id).manifest_digest
    assert seen[0] == {rel: (len(data), sha(data), digest) for rel, data in DEFAULT_FILES.items()}


# --------------------------------------------------------------------------- one test per interlock


def test_interlock_1_cleanup_disabled(lab: Lab):
    lab.cleanup(enabled=False)
    run, job_id = lab.make_run()
    lab.run_pass()
    lab.run_pass()
    assert lab.job(job_id).state == S.VERIFIED  # with cleanup off, a job is not shown as about to be deleted
    assert lab.refusals(job_id) == ["cleanup disabled"]  # recorded once, not every pass
    assert_nothing_deleted(lab, run)


def test_interlock_2_verify_passes(lab: Lab):
    run, job_id = lab.make_run(passes=1)
    lab.run_pass()
    assert lab.job(job_id).state == S.VERIFIED
    assert lab.refusals(job_id) == ["waiting: 1 of 2 verify passes"]
    assert_nothing_deleted(lab, run)


def test_interlock_3_age(lab: Lab):
    run, job_id = lab.make_run(verified_hours_ago=20)
    lab.run_pass()
    lab.now += HOUR
    lab.run_pass()  # 21 h of 24 h: the same refusal, not recorded again
    assert lab.job(job_id).state == S.VERIFIED
    assert lab.refusals(job_id) == ["waiting: 20 h of 24 h"]
    assert_nothing_deleted(lab, run)


def test_interlock_4_remote_unreachable(lab: Lab):
    run, job_id = lab.make_run()
    lab.reachable = False
    lab.run_pass()
    lab.run_pass()
    assert lab.job(job_id).state == S.CLEANUP_ELIGIBLE
    assert lab.refusals(job_id) == ["remote unreachable"]
    assert "cleanup_refused" in lab.log_text() and 'reason="remote unreachable"' in lab.log_text()
    assert_nothing_deleted(lab, run)
    lab.reachable = True
    assert [o.action for o in lab.run_pass()] == ["deleted"]


@pytest.mark.parametrize("probe", ["raises", "sync_false"])
def test_interlock_4_probe_that_raises_or_answers_synchronously(lab: Lab, probe):
    run, job_id = lab.make_run()

    def remote_stat(job):
        if probe == "raises":
            raise OSError("no route to host")
        return False

    lab.run_pass(remote_stat=remote_stat)
    assert lab.refusals(job_id) == ["remote unreachable"]
    assert_nothing_deleted(lab, run)


def _damage_nas(lab: Lab, run: Path, damage: str) -> tuple[str, ...]:
    """Make the NAS copy incomplete one way; returns the manifest files the NAS no longer holds whole."""
    nas = lab.nas_copy(run)
    if damage == "run folder deleted":
        shutil.rmtree(nas)
        return tuple(sorted(DEFAULT_FILES, key=os.fsencode))
    if damage == "run folder emptied":
        for rel in DEFAULT_FILES:
            (nas / rel).unlink()
        return tuple(sorted(DEFAULT_FILES, key=os.fsencode))
    if damage == "file deleted":
        (nas / "sub" / "notes.txt").unlink()
    elif damage == "file truncated":
        os.truncate(nas / "sub" / "notes.txt", 3)
    elif damage == "file grown":
        with open(nas / "sub" / "notes.txt", "ab") as handle:
            handle.write(b"more")
    elif damage == "file replaced by a symlink":  # to a file of the same size: not the file itself
        (nas / "sub" / "notes.txt").rename(nas / "sub" / "elsewhere.txt")
        (nas / "sub" / "notes.txt").symlink_to("elsewhere.txt")
    elif damage == "file replaced by a folder":
        (nas / "sub" / "notes.txt").unlink()
        (nas / "sub" / "notes.txt").mkdir()
    return ("sub/notes.txt",)


@pytest.mark.parametrize(
    "damage",
    [
        "run folder deleted",
        "run folder emptied",
        "file deleted",
        "file truncated",
        "file grown",
        "file replaced by a symlink",
        "file replaced by a folder",
    ],
)
def test_interlock_4_an_incomplete_nas_copy_requeues_and_deletes_nothing(lab: Lab, damage: str):
    run, job_id = lab.make_run()
    bad = _damage_nas(lab, run, damage)
    outcomes = lab.run_pass()
    assert [o.action for o in outcomes] == ["promoted", "requeued"], outcomes
    assert outcomes[1].paths == bad
    assert_nothing_deleted(lab, run)
    job = lab.job(job_id)
    assert job.state == S.QUEUED and job.error_kind == "hash_mismatch"
    assert job.rewrite_paths == bad and job.mismatch_count == 1  # sent again; a second mismatch is FAILED
    assert job.verify_passes == 0 and job.verified_at is None  # the clock starts again after the re-transfer
    back = lab.queue.events(job_id)[-1]
    assert (back.from_state, back.to_state) == ("cleanup_eligible", "queued")
    assert back.detail.startswith("NAS copy incomplete: ") and "sub/notes.txt" in back.detail
    assert "nothing deleted" in back.detail
    assert "cleanup_requeued" in lab.log_text()
    with lab.queue.transaction() as conn:
        assert conn.execute("SELECT COUNT(*) FROM cleanup_plan").fetchone()[0] == 0


def test_interlock_4_a_listing_shows_someone_elses_extra_files_as_no_obstacle(lab: Lab):
    run, job_id = lab.make_run()
    (lab.nas_copy(run) / "their_notes.txt").write_text("a colleague's file beside the run")
    assert [o.action for o in lab.run_pass()] == ["promoted", "deleted"]


def test_interlock_4_a_share_unmounted_with_a_probe_saying_yes_waits(lab: Lab):
    """remote_stat answers True (an injected probe), but the listing finds the share unmounted."""
    run, job_id = lab.make_run()
    (lab.nas / ".exlab-nas").unlink()
    lab.run_pass()
    lab.run_pass()
    job = lab.job(job_id)
    assert job.state == S.CLEANUP_ELIGIBLE
    [refusal] = lab.refusals(job_id)  # recorded once
    assert refusal.startswith("remote unreachable: ") and "not mounted" in refusal
    assert_nothing_deleted(lab, run)
    (lab.nas / ".exlab-nas").write_text("mounted\n")
    assert [o.action for o in lab.run_pass()] == ["deleted"]


@pytest.mark.parametrize("listing", ["none", "raises", "not a mapping"])
def test_interlock_4_without_a_usable_listing_nothing_is_deleted(lab: Lab, listing: str):
    run, job_id = lab.make_run()

    async def broken(job):
        if listing == "raises":
            raise TransportError("auth", "permission denied (publickey)")
        return [("sub/notes.txt", 12)]

    lab.run_pass(remote_listing=None if listing == "none" else broken)
    assert lab.job(job_id).state == S.CLEANUP_ELIGIBLE
    [refusal] = lab.refusals(job_id)
    assert refusal.startswith("remote run folder cannot be listed" if listing == "none" else "remote listing failed")
    assert_nothing_deleted(lab, run)


def test_interlock_4_incomplete_nas_copy_and_local_damage_fails_and_sends_nothing(lab: Lab):
    run, job_id = lab.make_run()
    (lab.nas_copy(run) / "sub" / "notes.txt").unlink()
    target = run / "sub" / "notes.txt"
    info = target.stat()
    target.write_bytes(b"ACQUIRED OK\n")  # same size, mtime put back: damage
    os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
    outcomes = lab.run_pass()
    assert outcomes[-1].action == "failed"
    job = lab.job(job_id)
    assert job.state == S.FAILED and job.error_kind == "local_damage" and "sub/notes.txt" in job.last_error
    assert not (lab.nas_copy(run) / "sub" / "notes.txt").exists()  # nothing was sent


def test_dry_run_shows_an_incomplete_nas_copy(lab: Lab):
    run, job_id = lab.make_run()
    os.truncate(lab.nas_copy(run) / "image_002.tif", 10)
    events_before = len(lab.queue.events(job_id))
    [outcome] = asyncio.run(lab.reaper().plan(dry_run=True))
    assert outcome.action == "would_requeue" and outcome.paths == ("image_002.tif",)
    assert outcome.reason == "NAS copy incomplete: other size on the NAS: image_002.tif"
    assert len(lab.queue.events(job_id)) == events_before and lab.job(job_id).state == S.VERIFIED
    assert_nothing_deleted(lab, run)


def _override(oid: str, **extra) -> dict:
    entry = {
        "id": oid,
        "problem_class": "reserved_filesystem_name",
        "operator": "asmith",
        "recorded_at": "2024-01-01T00:00:00Z",
        "expires_at": None,
        "reason": "instrument names it AUX",
        "revoked": False,
    }
    entry.update(extra)
    return entry


def test_interlock_5_override_revoked(lab: Lab):
    entries = [
        _override("ov-1"),
        {
            "id": "t-1",
            "revokes": "ov-1",
            "operator": "bsmith",
            "recorded_at": "2024-02-01T00:00:00Z",
            "reason": "wrong",
            "revoked": True,
        },
    ]
    run, job_id = lab.make_run(overrides=("ov-1",), override_entries=entries)
    lab.run_pass()
    assert lab.job(job_id).state == S.CLEANUP_ELIGIBLE
    assert lab.refusals(job_id) == ["override revoked since verification: ov-1"]
    assert_nothing_deleted(lab, run)


def test_interlock_5_override_expired(lab: Lab):
    expired = (lab.now - HOUR).isoformat().replace("+00:00", "Z")
    run, job_id = lab.make_run(overrides=("ov-2",), override_entries=[_override("ov-2", expires_at=expired)])
    lab.run_pass()
    assert lab.refusals(job_id) == ["override revoked since verification: ov-2"]
    assert_nothing_deleted(lab, run)


def test_interlock_5_override_still_active_allows_cleanup(lab: Lab):
    run, job_id = lab.make_run(overrides=("ov-3",), override_entries=[_override("ov-3")])
    assert [o.action for o in lab.run_pass()] == ["promoted", "deleted"]


def test_interlock_6_local_file_changed(lab: Lab):
    run, job_id = lab.make_run()
    (run / "image_001.tif").write_bytes(b"A" * 2999 + b"Z")  # an edit: new mtime
    outcomes = lab.run_pass()
    assert outcomes[-1].action == "requeued"
    job = lab.job(job_id)
    assert job.state == S.QUEUED and job.error_kind == "local_changed"
    assert job.last_error == "local file changed: image_001.tif"
    assert "local file changed: image_001.tif" in lab.queue.events(job_id)[-1].detail
    assert (run / "image_001.tif").read_bytes() == b"A" * 2999 + b"Z"
    assert lab.manifest_files_intact(run, {k: v for k, v in DEFAULT_FILES.items() if k != "image_001.tif"})
    assert job.verify_passes == 0 and job.verified_at is None  # the new copy starts a new clock


# --------------------------------------------------------------------------- local changes


def test_file_added_after_verification_requeues_and_nothing_is_deleted(lab: Lab):
    run, job_id = lab.make_run()
    (run / "sub" / "late_export.csv").write_text("a,b\n")
    outcomes = lab.run_pass()
    assert outcomes[-1].action == "requeued"
    assert lab.job(job_id).state == S.QUEUED
    assert lab.job(job_id).last_error == "local file added: sub/late_export.csv"
    assert_nothing_deleted(lab, run)
    assert (run / "sub" / "late_export.csv").exists()


def test_edited_and_added_files_both_stop_the_deletion(lab: Lab):
    run, job_id = lab.make_run()
    (run / "sub" / "notes.txt").write_text("acquired ok, then re-annotated\n")
    (run / "extra.bin").write_bytes(b"new")
    outcomes = lab.run_pass()
    assert outcomes[-1].action == "requeued"
    assert set(outcomes[-1].paths) == {"sub/notes.txt", "extra.bin"}
    assert all((run / rel).exists() for rel in DEFAULT_FILES)


def test_local_damage_same_size_and_mtime_fails_and_deletes_nothing(lab: Lab):
    run, job_id = lab.make_run()
    target = run / "image_002.tif"
    st = target.stat()
    target.write_bytes(b"B" * 1000 + b"\x00" + b"B" * 999)  # same size
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime
    nas_before = snapshot(lab.nas_copy(run))
    outcomes = lab.run_pass()
    assert outcomes[-1].action == "failed"
    job = lab.job(job_id)
    assert job.state == S.FAILED and job.error_kind == "local_damage"
    assert "local damage: image_002.tif" in job.last_error
    assert_nothing_deleted(lab, run, {k: v for k, v in DEFAULT_FILES.items() if k != "image_002.tif"})
    assert snapshot(lab.nas_copy(run)) == nas_before  # never copied over the NAS
    assert "cleanup_failed" in lab.log_text()


def test_touched_file_with_unchanged_content_is_still_cleaned(lab: Lab):
    run, job_id = lab.make_run()
    os.utime(run / "image_001.tif")  # a backup tool touched it; the bytes are the verified ones
    outcomes = lab.run_pass()
    assert outcomes[-1].action == "deleted"


def test_vanished_file_fails_with_local_file_vanished(lab: Lab):
    run, job_id = lab.make_run()
    (run / "sub" / "notes.txt").unlink()
    lab.run_pass()
    job = lab.job(job_id)
    assert job.state == S.FAILED and job.error_kind == "local_file_vanished"
    assert "local file missing: sub/notes.txt" in job.last_error
    assert lab.manifest_files_intact(run, {k: v for k, v in DEFAULT_FILES.items() if k != "sub/notes.txt"})


def test_tampered_manifest_is_refused(lab: Lab):
    run, job_id = lab.make_run()
    hashes = {rel: sha(data) for rel, data in DEFAULT_FILES.items() if rel != "sub/notes.txt"}
    (run / ".exlab-wizard" / "checksums.sha256").write_bytes(format_manifest(hashes))
    lab.run_pass()
    assert lab.refusals(job_id) == ["manifest changed since verification"]
    assert_nothing_deleted(lab, run)


# --------------------------------------------------------------------------- symlinks


def test_symlink_in_the_run_pointing_outside_is_never_followed(lab: Lab):
    outside = lab.tmp / "outside"
    (outside / "folder").mkdir(parents=True)
    (outside / "precious.tif").write_bytes(b"P" * 100)
    (outside / "folder" / "inner.tif").write_bytes(b"Q" * 100)
    before = snapshot(outside)
    run, job_id = lab.make_run()
    os.symlink(outside / "precious.tif", run / "sub" / "link_to_file.tif")
    os.symlink(outside / "folder", run / "sub" / "deeper" / "link_to_folder")
    outcomes = lab.run_pass()
    assert outcomes[-1].action == "deleted"
    assert snapshot(outside) == before
    # The links are not ours to delete (never synced, never in a manifest): they stay, and keep their folders.
    assert (run / "sub" / "link_to_file.tif").is_symlink()
    assert (run / "sub" / "deeper" / "link_to_folder").is_symlink()
    assert not (run / "image_001.tif").exists()


def test_listed_file_replaced_by_a_symlink_is_not_deleted(lab: Lab):
    outside = lab.tmp / "outside"
    outside.mkdir()
    (outside / "image_001.tif").write_bytes(DEFAULT_FILES["image_001.tif"])  # same bytes, elsewhere
    run, job_id = lab.make_run()
    (run / "image_001.tif").unlink()
    os.symlink(outside / "image_001.tif", run / "image_001.tif")
    outcomes = lab.run_pass()
    assert outcomes[-1].action == "requeued" and "image_001.tif" in outcomes[-1].reason
    assert (outside / "image_001.tif").read_bytes() == DEFAULT_FILES["image_001.tif"]
    assert (run / "image_001.tif").is_symlink()


def test_listed_folder_replaced_by_a_symlink_is_not_followed(lab: Lab):
    outside = lab.tmp / "outside"
    run, job_id = lab.make_run()
    shutil.move(run / "sub", outside)
    os.symlink(outside, run / "sub")
    before = snapshot(outside)
    outcomes = lab.run_pass()
    assert outcomes[-1].action == "requeued"
    assert snapshot(outside) == before


def test_run_folder_replaced_by_a_symlink_after_verification(lab: Lab):
    run, job_id = lab.make_run()
    elsewhere = lab.tmp / "elsewhere" / "Run_1"
    elsewhere.parent.mkdir()
    shutil.move(run, elsewhere)
    os.symlink(elsewhere, run)
    before = snapshot(elsewhere)
    lab.run_pass()
    lab.run_pass()
    assert lab.job(job_id).state == S.CLEANUP_ELIGIBLE
    assert lab.refusals(job_id) == ["run folder is a symlink"]
    assert snapshot(elsewhere) == before


def test_run_folder_replaced_by_a_symlink_during_an_interrupted_deletion(lab: Lab, monkeypatch):
    run, job_id = lab.make_run(eligible=True)

    def crash(run_path, batch):
        raise RuntimeError("power cut")

    monkeypatch.setattr(deletion, "delete_batch", crash)
    assert [o.action for o in lab.run_pass()] == ["error"]
    monkeypatch.undo()
    with lab.queue.transaction() as conn:
        assert conn.execute("SELECT COUNT(*) FROM cleanup_plan").fetchone()[0] == 4
    elsewhere = lab.tmp / "elsewhere"
    shutil.move(run, elsewhere)
    os.symlink(elsewhere, run)
    before = snapshot(elsewhere)
    outcomes = lab.run_pass()
    assert outcomes[0].action == "waiting" and outcomes[0].reason == "deletion paused: run folder is a symlink"
    assert snapshot(elsewhere) == before
    # The folder comes back: the plan completes.
    os.unlink(run)
    shutil.move(elsewhere, run)
    assert [o.action for o in lab.run_pass()] == ["deleted"]
    assert not (run / "image_001.tif").exists()


# --------------------------------------------------------------------------- the verification clock


def test_clock_counts_from_first_verification_not_the_last_pass(lab: Lab):
    """min_age_hours 24, audits every 6 h, first verified 25 h ago: cleaned."""
    run, job_id = lab.make_run(passes=5, verified_hours_ago=25)
    job = lab.job(job_id)
    assert job.pass_times[-1] == lab.now - HOUR  # the last audit was an hour ago
    assert [o.action for o in lab.run_pass()] == ["promoted", "deleted"]
    assert lab.job(job_id).state == S.CLEANED


# --------------------------------------------------------------------------- retain_cache false


def test_retain_cache_false_removes_the_run_folder_after_a_verified_push(lab: Lab):
    lab.cleanup(retain_cache=False)
    run, job_id = lab.make_run()
    outcomes = lab.run_pass()
    assert outcomes[-1].action == "deleted"
    assert not run.exists()
    assert lab.job(job_id).state == S.CLEANED
    # The push came after the data deletion and carried the cleanup record to the NAS.
    assert lab.pushes == [{"creation": lab.pushes[0]["creation"], "data_left": []}]
    assert lab.pushes[0]["creation"]["files"] == 4
    nas_meta = lab.nas_copy(run) / ".exlab-wizard" / "creation.json"
    assert '"local_cleaned"' in nas_meta.read_text()
    assert "cleanup_run_folder_removed" in lab.log_text()


def test_retain_cache_false_keeps_the_run_folder_while_the_push_fails(lab: Lab):
    lab.cleanup(retain_cache=False)
    lab.push_ok = False
    run, job_id = lab.make_run()
    outcomes = lab.run_pass()
    assert outcomes[-1].action == "waiting"
    assert outcomes[-1].reason == "waiting: final metadata push not verified"
    assert run.is_dir() and (run / ".exlab-wizard" / "creation.json").exists()
    assert not (run / "image_001.tif").exists()  # the data (verified on the NAS) is gone
    assert lab.job(job_id).state == S.CLEANUP_ELIGIBLE
    lab.run_pass()
    assert lab.refusals(job_id) == ["waiting: final metadata push not verified"]
    assert lab.log_text().count(" cleanup_deleted ") == 1  # logged once, not on every retry
    lab.push_ok = True
    assert [o.action for o in lab.run_pass()] == ["deleted"]
    assert not run.exists()
    assert lab.job(job_id).state == S.CLEANED


def test_retain_cache_false_keeps_a_run_folder_holding_what_is_not_ours(lab: Lab):
    lab.cleanup(retain_cache=False)
    outside = lab.tmp / "outside.raw"
    outside.write_bytes(b"not ours")
    run, job_id = lab.make_run()
    os.symlink(outside, run / "link.raw")
    outcomes = lab.run_pass()
    assert outcomes[-1].action == "deleted"
    assert lab.job(job_id).state == S.CLEANED
    assert sorted(p.name for p in run.iterdir()) == ["link.raw"]
    assert outside.read_bytes() == b"not ours"
    assert "run folder kept" in lab.queue.events(job_id)[-1].detail
    assert "cleanup_run_folder_kept" in lab.log_text()


def test_retain_cache_false_without_a_push_keeps_the_run_folder(lab: Lab):
    lab.cleanup(retain_cache=False)
    run, job_id = lab.make_run()
    reaper = Reaper(
        lab.queue,
        lab.config,
        writer=lab.writer,
        log_for=lab.log_for,
        remote_stat=lambda job: True,
        now=lambda: lab.now,
        remote_listing=lab._remote_listing,
    )
    outcomes = asyncio.run(reaper.run_pass())
    assert outcomes[-1].action == "waiting" and "no final metadata push" in outcomes[-1].reason
    assert (run / ".exlab-wizard" / "creation.json").exists()


# --------------------------------------------------------------------------- crashes and restarts


def test_resume_after_a_crash_part_way(lab: Lab, monkeypatch):
    files = {f"f{i:02d}.bin": bytes([i]) * (100 + i) for i in range(10)}
    run, job_id = lab.make_run(files=files, eligible=True)
    real = deletion.delete_batch

    def half_then_crash(run_path, batch):
        real(run_path, batch[:4])
        raise RuntimeError("killed")

    monkeypatch.setattr(deletion, "delete_batch", half_then_crash)
    lab.run_pass()
    monkeypatch.undo()
    assert sum((run / rel).exists() for rel in files) == 6
    outcomes = lab.run_pass()
    assert [o.action for o in outcomes] == ["deleted"]
    assert outcomes[0].files == 10
    assert not any((run / rel).exists() for rel in files)
    assert "cleanup_resumed" in lab.log_text() and "resumed=true" in lab.log_text()


def test_resume_never_deletes_a_file_changed_after_the_plan(lab: Lab, monkeypatch):
    files = {f"f{i:02d}.bin": bytes([i]) * 100 for i in range(6)}
    run, job_id = lab.make_run(files=files, eligible=True)
    with deletion_killed_after_two(monkeypatch):
        lab.run_pass()
    (run / "f04.bin").write_bytes(b"edited while the machine was down")
    outcomes = lab.run_pass()
    assert outcomes[0].action == "aborted"
    job = lab.job(job_id)
    assert job.state == S.FAILED and job.error_kind == "local_changed_during_cleanup"
    # 2 before the crash, 2 after
    assert "f04.bin" in job.last_error and "4 of 6 planned files were deleted" in job.last_error
    assert (run / "f04.bin").read_bytes() == b"edited while the machine was down"
    assert (run / "f05.bin").exists()  # nothing after the stop either
    with lab.queue.transaction() as conn:
        assert conn.execute("SELECT COUNT(*) FROM cleanup_plan").fetchone()[0] == 0


def test_a_plan_whose_job_moved_on_is_dropped_not_carried_out(lab: Lab, monkeypatch):
    run, job_id = lab.make_run(eligible=True)

    def crash(run_path, batch):
        raise RuntimeError("killed")

    monkeypatch.setattr(deletion, "delete_batch", crash)
    lab.run_pass()
    monkeypatch.undo()
    # The audit loop found the NAS copy bad meanwhile: back to QUEUED for a re-transfer.
    lab.queue.transition(job_id, S.CLEANUP_ELIGIBLE, S.QUEUED, now=lab.now, detail="audit mismatch")
    outcomes = lab.run_pass()
    assert outcomes[0].action == "aborted"
    assert_nothing_deleted(lab, run)
    assert lab.queue.events(job_id)[-1].kind == "cleanup_aborted"


def test_resumed_plan_lists_the_nas_again_and_requeues_when_nothing_was_deleted(lab: Lab, monkeypatch):
    run, job_id = lab.make_run(eligible=True)
    monkeypatch.setattr(deletion, "delete_batch", lambda r, b: (_ for _ in ()).throw(RuntimeError("killed")))
    lab.run_pass()  # the plan is written, then the process dies before the first unlink
    monkeypatch.undo()
    with lab.queue.transaction() as conn:
        assert conn.execute("SELECT COUNT(*) FROM cleanup_plan").fetchone()[0] == 4
    (lab.nas_copy(run) / "image_001.tif").unlink()  # while the machine was down
    outcomes = lab.run_pass()
    assert [o.action for o in outcomes] == ["requeued"] and outcomes[0].paths == ("image_001.tif",)
    assert_nothing_deleted(lab, run)
    job = lab.job(job_id)
    assert job.state == S.QUEUED and job.rewrite_paths == ("image_001.tif",)
    with lab.queue.transaction() as conn:
        assert conn.execute("SELECT COUNT(*) FROM cleanup_plan").fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM cleanup_progress").fetchone()[0] == 0


def test_resumed_plan_part_deleted_stops_when_the_nas_lost_a_file_still_here(lab: Lab, monkeypatch):
    files = {f"f{i:02d}.bin": bytes([i]) * 100 for i in range(6)}
    run, job_id = lab.make_run(files=files, eligible=True)
    with deletion_killed_after_two(monkeypatch):
        lab.run_pass()
    os.truncate(lab.nas_copy(run) / "f04.bin", 0)
    outcomes = lab.run_pass()
    assert outcomes[0].action == "aborted"
    job = lab.job(job_id)
    assert job.state == S.FAILED and job.error_kind == "remote_changed_during_cleanup"
    assert "f04.bin" in job.last_error and "2 of 6 planned files were already deleted" in job.last_error
    assert all((run / f"f{i:02d}.bin").read_bytes() == files[f"f{i:02d}.bin"] for i in range(2, 6))
    with lab.queue.transaction() as conn:
        assert conn.execute("SELECT COUNT(*) FROM cleanup_plan").fetchone()[0] == 0


def test_resumed_plan_waits_while_the_listing_cannot_be_taken(lab: Lab, monkeypatch):
    run, job_id = lab.make_run(eligible=True)
    monkeypatch.setattr(deletion, "delete_batch", lambda r, b: (_ for _ in ()).throw(RuntimeError("killed")))
    lab.run_pass()
    monkeypatch.undo()
    (lab.nas / ".exlab-nas").unlink()
    outcomes = lab.run_pass()
    assert outcomes[0].action == "waiting" and outcomes[0].reason.startswith("deletion paused: remote unreachable")
    assert lab.manifest_files_intact(run)  # the plan is kept for when the share is back
    (lab.nas / ".exlab-nas").write_text("mounted\n")
    assert [o.action for o in lab.run_pass()] == ["deleted"]


def test_resumed_plan_waits_while_cleanup_is_disabled(lab: Lab, monkeypatch):
    run, job_id = lab.make_run(eligible=True)
    monkeypatch.setattr(deletion, "delete_batch", lambda r, b: (_ for _ in ()).throw(RuntimeError("killed")))
    lab.run_pass()
    monkeypatch.undo()
    lab.cleanup(enabled=False)
    outcomes = lab.run_pass()
    assert outcomes[0].reason == "deletion paused: cleanup disabled"
    assert lab.manifest_files_intact(run)


# --------------------------------------------------------------------------- record_verified_stat


def test_record_verified_stat_keeps_the_first_trusted_stat(lab: Lab):
    run, job_id = lab.make_run()
    first = load_verified_stats(lab.queue, job_id)
    assert all(v.trusted for v in first.values())
    (run / "image_001.tif").write_bytes(b"edited")  # an audit pass then records again, without re-hashing
    hashes = {rel: sha(data) for rel, data in DEFAULT_FILES.items()}
    record_verified_stat(lab.queue, job_id, run, hashes, lab.now)
    assert load_verified_stats(lab.queue, job_id) == first
    lab.run_pass()
    assert lab.job(job_id).last_error == "local file changed: image_001.tif"


def test_record_verified_stat_distrusts_files_written_while_hashing(lab: Lab, monkeypatch):
    monkeypatch.setattr(local_check, "RACE_SLACK_NS", 0)  # the test cannot wait out 2 s of slack
    monkeypatch.setattr(local_check, "writeback_window_ns", lambda: 0)  # nor the kernel's writeback window
    run, job_id = lab.make_run()
    # The hashing's start read from the file system's own (coarse) clock, as the mtimes are: the wall
    # clock can be a tick ahead of the mtime of a file written right after it (flaky under load).
    time.sleep(0.05)  # past the tick of the run's files
    probe = run.parent / "clock-probe"
    probe.write_bytes(b"")
    hashing_began = dt.datetime.fromtimestamp(probe.stat().st_mtime_ns / 1e9, dt.UTC)
    (run / "image_001.tif").write_bytes(b"A" * 3000)  # rewritten (same bytes) while being hashed
    hashes = {rel: sha(data) for rel, data in DEFAULT_FILES.items()}
    with lab.queue.transaction() as conn:
        conn.execute("DELETE FROM verified_files")
    record_verified_stat(lab.queue, job_id, run, hashes, lab.now, hashed_since=hashing_began)
    stats = load_verified_stats(lab.queue, job_id)
    assert not stats["image_001.tif"].trusted and stats["image_002.tif"].trusted
    scan = scan_run(run, hashes, stats, verified_at=lab.now - 25 * HOUR)
    assert scan.check.clean and scan.rehashed == ("image_001.tif",)


def test_record_verified_stat_ignores_metadata_and_drops_files_no_longer_verified(lab: Lab):
    run, job_id = lab.make_run()
    hashes = {"image_001.tif": sha(DEFAULT_FILES["image_001.tif"]), ".exlab-wizard/creation.json": "0" * 64}
    record_verified_stat(lab.queue, job_id, run, hashes, lab.now)
    assert set(load_verified_stats(lab.queue, job_id)) == {"image_001.tif"}


def test_a_file_named_like_the_metadata_folder_is_data(tmp_path: Path):
    # fileio's rule (and the verifier's): only the top-level *folder* .exlab-wizard/ is metadata.
    run = tmp_path / "Run_1"
    run.mkdir()
    (run / ".exlab-wizard").write_bytes(b"a data file, oddly named")
    (run / "a.raw").write_bytes(b"a")
    manifest = hash_tree(run)
    assert set(manifest) == {".exlab-wizard", "a.raw"}
    scan = scan_run(run, manifest, {})
    assert scan.check.clean, scan.check
    assert sorted(f.path for f in scan.files) == [".exlab-wizard", "a.raw"]
    unlisted = scan_run(run, {"a.raw": manifest["a.raw"]}, {})
    assert unlisted.check.added == (".exlab-wizard",)
    assert local_check._data_paths({".exlab-wizard": "AB", ".exlab-wizard/c.json": "cd"}) == {".exlab-wizard": "ab"}


def test_without_recorded_stats_every_file_is_rehashed(lab: Lab):
    run, job_id = lab.make_run()
    with lab.queue.transaction() as conn:
        conn.execute("DELETE FROM verified_files")
    outcomes = lab.run_pass()
    assert outcomes[-1].action == "deleted"


def test_non_utf8_file_names_round_trip(lab: Lab):
    name = os.fsdecode(b"scan_\xff.raw")
    run, job_id = lab.make_run(files={name: b"binary name"})
    assert [o.action for o in lab.run_pass()] == ["promoted", "deleted"]
    assert not os.path.lexists(os.path.join(os.fsencode(run), b"scan_\xff.raw"))


# --------------------------------------------------------------------------- dry run, events, locking


def test_dry_run_reports_and_changes_nothing(lab: Lab):
    run_ok, ok_id = lab.make_run("Run_ok")
    run_young, young_id = lab.make_run("Run_young", verified_hours_ago=20)
    run_added, added_id = lab.make_run("Run_added", eligible=True)
    (run_added / "new.bin").write_bytes(b"x")
    before = {p: snapshot(p) for p in (run_ok, run_young, run_added)}
    events_before = {j: len(lab.queue.events(j)) for j in (ok_id, young_id, added_id)}
    reaper = lab.reaper()
    outcomes = {o.job_id: o for o in asyncio.run(reaper.plan(dry_run=True))}
    assert outcomes[ok_id].action == "would_delete"
    assert (outcomes[ok_id].files, outcomes[ok_id].bytes) == (4, 10012)
    assert outcomes[young_id].action == "waiting" and outcomes[young_id].reason == "waiting: 20 h of 24 h"
    assert outcomes[added_id].action == "would_requeue" and outcomes[added_id].paths == ("new.bin",)
    assert {p: snapshot(p) for p in before} == before
    assert {j: len(lab.queue.events(j)) for j in events_before} == events_before
    assert lab.job(ok_id).state == S.VERIFIED


def test_refusals_are_recorded_again_after_a_state_change(lab: Lab):
    run, job_id = lab.make_run()
    lab.reachable = False
    lab.run_pass()
    lab.run_pass()
    lab.cleanup(enabled=False)
    lab.run_pass()
    lab.cleanup(enabled=True)
    lab.run_pass()
    assert lab.refusals(job_id) == ["remote unreachable", "cleanup disabled", "remote unreachable"]


def test_a_repeated_refusal_is_recognised_by_its_code_not_its_text(lab: Lab):
    """An unreachable NAS whose error message changes each pass is one refusal, stored with its code."""
    run, job_id = lab.make_run()
    answers = iter(["connection timed out after 10 s", "connection timed out after 12 s"])

    async def unreachable(job):
        raise TransportError("network", next(answers))

    lab.run_pass(remote_listing=unreachable)
    outcomes = lab.run_pass(remote_listing=unreachable)
    assert [(o.action, o.code) for o in outcomes] == [("waiting", CleanupCode.REMOTE_UNREACHABLE)]
    assert lab.refusals(job_id) == ["remote unreachable: connection timed out after 10 s"]
    [event] = [e for e in lab.queue.events(job_id) if e.kind == "cleanup_refused"]
    assert event.code == "remote_unreachable" and event.to_dict()["code"] == "remote_unreachable"
    assert_nothing_deleted(lab, run)


def test_a_refusal_with_another_code_is_recorded_even_when_its_text_matches_the_last(lab: Lab):
    run, job_id = lab.make_run()
    lab.queue.record_event(job_id, "cleanup_refused", "remote unreachable", now=lab.now, code="remote_listing_failed")
    lab.reachable = False
    lab.run_pass()
    assert lab.refusals(job_id) == ["remote unreachable", "remote unreachable"]


def test_a_second_reaper_process_is_kept_out(lab: Lab):
    run, job_id = lab.make_run()
    fd = os.open(str(lab.queue.db_path) + ".reaper.lock", os.O_RDWR | os.O_CREAT)
    try:
        # flock locks are per open file: a separate open of the same file conflicts, as another process would.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert [o.action for o in lab.run_pass()] == ["busy"]
    finally:
        os.close(fd)
    assert lab.manifest_files_intact(run)
    assert [o.action for o in lab.run_pass()] == ["promoted", "deleted"]


def test_unknown_equipment_refuses_rather_than_deleting_unlogged(lab: Lab):
    run, job_id = lab.make_run(eligible=True)

    def no_log(equipment_id):
        raise KeyError(equipment_id)

    reaper = Reaper(
        lab.queue, lab.config, writer=lab.writer, log_for=no_log, remote_stat=lambda job: True, now=lambda: lab.now
    )
    outcomes = asyncio.run(reaper.run_pass())
    assert outcomes[0].action == "waiting" and outcomes[0].reason.startswith("equipment log unavailable")
    assert lab.manifest_files_intact(run)


def test_a_queue_database_made_again_in_the_same_process_gets_the_reaper_tables(tmp_path: Path) -> None:
    # A state folder removed and created again can give the new queue.db the old inode number;
    # the tables must be made for the new database all the same.
    db = tmp_path / "state" / "queue.db"
    for _round in range(3):
        db.parent.mkdir()
        queue = JobQueue(db)
        reaper_mod.ensure_cleanup_schema(queue)
        with queue.transaction() as conn:
            assert conn.execute("SELECT count(*) FROM cleanup_progress").fetchone()[0] == 0
        queue.close()
        shutil.rmtree(db.parent)


def test_a_folder_whose_planned_files_are_found_gone_is_fsynced_before_the_deletion_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Pass 1 unlinked the files and was killed before its fsync; pass 2 finds them gone: it makes that durable."""
    import stat as stat_mod

    from exlab_wizard.sync.reaper.store import PlannedFile

    run = tmp_path / "Run_1"
    (run / "sub").mkdir(parents=True)
    planned = []
    for name in ("a.bin", "b.bin"):
        path = run / "sub" / name
        path.write_bytes(b"x")
        st = path.stat()
        planned.append(PlannedFile(f"sub/{name}", st.st_size, st.st_mtime_ns, st.st_ino, "0" * 64, st.st_ctime_ns))
        path.unlink()  # by the killed pass
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat_mod.S_ISDIR(os.fstat(fd).st_mode):
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    result = deletion.delete_batch(run, planned)
    assert (result.deleted, result.gone, result.stop) == (0, 2, None)
    assert str(run / "sub") in synced
