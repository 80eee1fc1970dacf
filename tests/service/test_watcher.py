"""The completion watcher over the real client, queue, gate and mount transport on tmp folders."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
from pathlib import Path

import pytest

from exlab_wizard.cache import CreationWriter
from exlab_wizard.service import watcher as watcher_mod
from exlab_wizard.sync.equipment_log import log_path_for
from exlab_wizard.sync.queue import JobQueue
from exlab_wizard.sync.states import SyncJobState
from tests.service.conftest import EQ, Running, WatchLab, start, stop

PLACEHOLDER = "{{sample}}.csv"  # one hard finding: leftover_jinja_marker


def _log_events(wlab: WatchLab, event: str) -> list[str]:
    path = log_path_for(wlab.config().equipment[0])
    if not path.exists():
        return []
    return [line for line in path.read_text().splitlines() if f" {event} " in line or line.endswith(f" {event}")]


# ------------------------------------------------------------------ sentinel


async def test_run_written_slowly_is_enqueued_after_the_sentinel_and_once(
    wlab: WatchLab,
) -> None:
    wlab.sync = {"enabled": True}
    w = await start(wlab.config())
    try:
        run = wlab.run_dir()
        for index in range(3):
            (run / f"part{index}.bin").write_bytes(os.urandom(2000))
            report = await w.watcher.scan_once()
            assert report.enqueued == [] and report.waiting == 1
            assert await w.client.status(run) == "none"
        [waiting] = w.watcher.incomplete()
        assert waiting.run_path == str(run) and "acquisition_complete.flag" in waiting.reason

        (run / "acquisition_complete.flag").write_text("")
        report = await w.watcher.scan_once()
        assert report.enqueued == [str(run)]
        assert w.spy.calls == [run]
        assert w.watcher.incomplete() == []

        await w.client.wait_idle(timeout=30)
        assert await w.client.status(run) == SyncJobState.VERIFIED.value
        for _ in range(3):
            report = await w.watcher.scan_once()
            assert report.enqueued == [] and report.already_queued == 1 and report.examined == 0
        assert w.spy.calls == [run]
        assert len(await w.client.jobs()) == 1
        assert [e["action"] for e in w.events if e["action"] != "waiting"] == ["enqueued"]
        assert len(_log_events(wlab, "watcher_enqueued")) == 1
    finally:
        await stop(w)


async def test_a_sentinel_that_is_not_a_regular_file_does_not_count(wlab: WatchLab, watching: Running) -> None:
    run = wlab.run_dir()
    (run / "data.bin").write_bytes(b"x")
    os.symlink(run / "data.bin", run / "acquisition_complete.flag")
    report = await watching.watcher.scan_once()
    assert report.enqueued == [] and watching.spy.calls == []
    assert "not a regular file" in watching.watcher.incomplete()[0].reason


async def test_test_runs_are_watched_too(wlab: WatchLab, watching: Running) -> None:
    run = wlab.finished_run("TestRun_2026-01-02")
    assert (await watching.watcher.scan_once()).enqueued == [str(run)]


# ------------------------------------------------------------------ manifest


def _write_manifest(run: Path, files: dict[str, int]) -> None:
    (run / "run_manifest.json").write_text(json.dumps({"files": [{"path": p, "size": s} for p, s in files.items()]}))


async def test_manifest_run_waits_while_a_file_is_still_growing(wlab: WatchLab) -> None:
    wlab.signal = "manifest"
    w = await start(wlab.config())
    try:
        run = wlab.run_dir()
        _write_manifest(run, {"a.bin": 1000, "sub/b.bin": 3000})
        (run / "a.bin").write_bytes(b"a" * 1000)
        (run / "sub").mkdir()
        report = await w.watcher.scan_once()
        assert report.enqueued == [] and "sub/b.bin (missing)" in w.watcher.incomplete()[0].reason
        growing = os.open(run / "sub" / "b.bin", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            for chunk in range(3):
                os.write(growing, b"b" * 1000)
                report = await w.watcher.scan_once()
                if chunk < 2:
                    assert report.enqueued == [] and w.spy.calls == []
                    assert f"sub/b.bin ({(chunk + 1) * 1000} of 3000 bytes)" in w.watcher.incomplete()[0].reason
        finally:
            os.close(growing)
        assert report.enqueued == [str(run)] and w.spy.calls == [run]
        assert (await w.watcher.scan_once()).enqueued == [] and w.spy.calls == [run]
    finally:
        await stop(w)


async def test_malformed_manifest_waits_with_a_reason_then_a_fixed_one_counts(
    wlab: WatchLab,
) -> None:
    wlab.signal = "manifest"
    w = await start(wlab.config())
    try:
        run = wlab.run_dir()
        (run / "a.bin").write_bytes(b"a" * 10)
        (run / "run_manifest.json").write_text('{"files": [{"path": "a.bin", "si')  # half written
        report = await w.watcher.scan_once()
        assert report.enqueued == [] and report.errors == []
        [waiting] = w.watcher.incomplete()
        assert waiting.signal == "manifest" and "malformed manifest run_manifest.json" in waiting.reason
        assert [e["reason"] for e in w.events if e["action"] == "waiting"] == [waiting.reason]
        assert (await w.watcher.scan_once()).enqueued == []
        assert [e["action"] for e in w.events] == ["waiting"]  # the same reason is not sent again

        _write_manifest(run, {"a.bin": 10})
        assert (await w.watcher.scan_once()).enqueued == [str(run)]
    finally:
        await stop(w)


@pytest.mark.parametrize(
    ("manifest", "setup", "reason"),
    [
        (None, None, "waiting for the manifest run_manifest.json"),
        (b"[1, 2]", None, 'expected an object with a "files" list'),
        (
            b'{"files": [{"path": "../outside.bin", "size": 1}]}',
            None,
            "not a relative path inside the run",
        ),
        (
            b'{"files": [{"path": "/etc/passwd", "size": 1}]}',
            None,
            "not a relative path inside the run",
        ),
        (
            b'{"files": [{"path": "a.bin", "size": true}]}',
            None,
            "size must be a whole number",
        ),
        (
            b'{"files": [{"path": "a.bin", "size": -1}]}',
            None,
            "size must be a whole number",
        ),
        (b'{"files": [{"path": "a.bin"}]}', None, "size must be a whole number"),
        (b'{"files": ["a.bin"]}', None, "files[0] is not an object"),
        (
            b'{"files": [{"path": "link.bin", "size": 4}]}',
            "file_link",
            "link.bin is not a regular file",
        ),
        (
            b'{"files": [{"path": "linked/a.bin", "size": 4}]}',
            "folder_link",
            "its folder is missing or not a folder",
        ),
        (None, "manifest_link", "is a symbolic link"),
        (None, "manifest_fifo", "is a FIFO"),
        (
            b'{"files": [{"path": "a.bin", "size": 4}, {"path": "a.bin", "size": 4}]}',
            None,
            "",
        ),
        (b'{"files": []}', None, ""),
    ],
)
def test_manifest_completeness_table(wlab: WatchLab, manifest: bytes | None, setup: str | None, reason: str) -> None:
    wlab.signal = "manifest"
    equipment = wlab.config().equipment[0]
    run = wlab.run_dir()
    (run / "a.bin").write_bytes(b"aaaa")
    elsewhere = wlab.root / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "a.bin").write_bytes(b"aaaa")
    (elsewhere / "m.json").write_text('{"files": []}')
    if manifest is not None:
        (run / "run_manifest.json").write_bytes(manifest)
    if setup == "file_link":
        os.symlink(elsewhere / "a.bin", run / "link.bin")
    elif setup == "folder_link":
        os.symlink(elsewhere, run / "linked")
    elif setup == "manifest_link":
        os.symlink(elsewhere / "m.json", run / "run_manifest.json")
    elif setup == "manifest_fifo":
        os.mkfifo(run / "run_manifest.json")
    check = watcher_mod.completeness(equipment, run)
    assert check.complete is (reason == "")
    assert reason in check.reason


# ------------------------------------------------------------------ none


async def test_signal_none_never_enqueues(wlab: WatchLab) -> None:
    wlab.signal = "none"
    w = await start(wlab.config())
    try:
        run = wlab.finished_run()
        _write_manifest(run, {"data.bin": 100})
        for _ in range(3):
            report = await w.watcher.scan_once()
            assert report.enqueued == [] and report.skipped_equipment == [EQ]
        assert w.spy.calls == [] and await w.client.jobs() == []
        assert await w.client.status(run) == "none"
    finally:
        await stop(w)


# ------------------------------------------------------------------ the gate


async def test_blocked_run_is_reported_once_and_enqueued_after_an_override(wlab: WatchLab, watching: Running) -> None:
    run = wlab.finished_run(files={"data.bin": b"x" * 10, PLACEHOLDER: b"1,2\n"})
    report = await watching.watcher.scan_once()
    assert report.blocked == [str(run)] and report.enqueued == []
    [blocked] = watching.watcher.blocked()
    assert blocked.run_path == str(run)
    assert {f.rule for f in blocked.findings} == {"leftover_jinja_marker"}
    assert json.loads((run / ".exlab-wizard" / "creation.json").read_text())["sync_status"] == "blocked_by_validation"

    for _ in range(3):
        report = await watching.watcher.scan_once()
        assert report.blocked == [] and report.still_blocked == 1 and report.enqueued == []
    assert watching.spy.calls == [run]  # the gate was asked once, not at every pass
    assert await watching.client.jobs() == []
    assert [e["action"] for e in watching.events] == ["blocked"]
    assert watching.events[0]["findings"][0]["rule"] == "leftover_jinja_marker"
    assert len(_log_events(wlab, "watcher_blocked")) == 1

    CreationWriter().append_override(
        run,
        problem_class="leftover_jinja_marker",
        operator="asmith",
        reason="instrument template name",
    )
    report = await watching.watcher.scan_once()
    assert report.enqueued == [str(run)]
    assert watching.spy.calls == [run, run]
    assert watching.watcher.blocked() == []
    assert await watching.client.status(run) == SyncJobState.QUEUED.value
    assert (await watching.watcher.scan_once()).enqueued == [] and len(watching.spy.calls) == 2


async def test_blocked_run_is_enqueued_after_the_offending_file_is_renamed(wlab: WatchLab, watching: Running) -> None:
    run = wlab.finished_run(files={"data.bin": b"x" * 10, PLACEHOLDER: b"1,2\n"})
    assert (await watching.watcher.scan_once()).blocked == [str(run)]
    assert (await watching.watcher.scan_once()).still_blocked == 1
    (run / PLACEHOLDER).rename(run / "S0042.csv")
    assert (await watching.watcher.scan_once()).enqueued == [str(run)]
    assert len(watching.spy.calls) == 2


async def test_blocked_run_whose_override_does_not_help_stays_blocked(wlab: WatchLab, watching: Running) -> None:
    run = wlab.finished_run(files={PLACEHOLDER: b"1,2\n"})
    assert (await watching.watcher.scan_once()).blocked == [str(run)]
    CreationWriter().append_override(
        run,
        problem_class="reserved_filesystem_name",
        operator="asmith",
        reason="wrong rule",
    )
    report = await watching.watcher.scan_once()
    assert report.blocked == [str(run)] and report.enqueued == []  # asked again: it changed
    assert (await watching.watcher.scan_once()).still_blocked == 1
    assert len(watching.spy.calls) == 2


# ------------------------------------------------------------------ durability and cost


async def test_a_new_watcher_on_the_same_state_does_not_enqueue_again(
    wlab: WatchLab,
) -> None:
    done = [wlab.finished_run(f"Run_{i}") for i in range(3)]
    bad = wlab.finished_run("Run_bad", files={PLACEHOLDER: b"x"})
    first = await start(wlab.config())
    try:
        report = await first.watcher.scan_once()
        assert sorted(report.enqueued) == sorted(map(str, done)) and report.blocked == [str(bad)]
    finally:
        await stop(first)

    second = await start(wlab.config())  # a restart: new client, new watcher, same state_dir
    try:
        assert [b.run_path for b in second.watcher.blocked()] == [str(bad)]  # known before any pass
        report = await second.watcher.scan_once()
        assert report.enqueued == [] and report.blocked == [] and report.adopted == []
        assert report.already_queued == 3 and report.still_blocked == 1
        assert second.spy.calls == []
        assert len(await second.client.jobs()) == 3
    finally:
        await stop(second)


async def test_runs_with_a_job_made_by_hand_are_adopted_not_enqueued(wlab: WatchLab, watching: Running) -> None:
    run = wlab.finished_run()
    await watching.client.enqueue(run)  # the operator, before the watcher looked
    watching.spy.calls.clear()
    report = await watching.watcher.scan_once()
    assert report.adopted == [str(run)] and report.enqueued == [] and watching.spy.calls == []
    assert (await watching.watcher.scan_once()).already_queued == 1


async def test_handed_over_runs_cost_memory_for_their_path_alone(wlab: WatchLab, watching: Running) -> None:
    """The watcher remembers every run still in the tree: a handed-over one must not cost a full record each."""
    for i in range(4):
        wlab.finished_run(f"Run_{i}")
    by_hand = wlab.finished_run("Run_hand")
    await watching.client.enqueue(by_hand)
    report = await watching.watcher.scan_once()
    assert len(report.enqueued) == 4 and report.adopted == [str(by_hand)]
    known = watching.watcher._known
    assert len(known) == 5 and len({id(row) for row in known.values()}) == 1  # one shared record per equipment
    assert (await watching.watcher.scan_once()).already_queued == 5
    rows = sqlite3.connect(wlab.config().queue_db).execute("SELECT job_id, first_seen_at FROM watched_runs").fetchall()
    assert len(rows) == 5 and all(job_id and seen for job_id, seen in rows)  # the durable rows keep it all


class _Counter:
    """Counts file-system calls on paths inside given run folders."""

    def __init__(self, runs: list[Path]):
        self.runs = {str(run) for run in runs}
        self.inside: list[str] = []
        self.scandirs = 0

    def _note(self, path: object) -> None:
        if isinstance(path, int):
            return
        text = os.fsdecode(os.fspath(path))  # type: ignore[arg-type]
        parent = text
        while parent not in ("/", ""):
            if parent in self.runs:
                self.inside.append(text)
                return
            parent = os.path.dirname(parent)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in ("lstat", "stat", "open", "scandir", "listdir"):
            real = getattr(os, name)

            def wrapped(
                path: object = ".",
                *args: object,
                _real=real,
                _name=name,
                **kwargs: object,
            ) -> object:
                self._note(path)
                if _name == "scandir":
                    self.scandirs += 1
                return _real(path, *args, **kwargs)

            monkeypatch.setattr(os, name, wrapped)


async def test_a_pass_over_many_finished_runs_does_not_look_into_them(
    wlab: WatchLab,
    watching: Running,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 2,000 finished runs in 4 projects: 40 enqueued by the watcher, the others
    # queued earlier (seeded in one transaction: 2,000 real enqueues take too long).
    runs: list[Path] = []
    for index in range(2000):
        run = wlab.equipment_root / f"PROJ-{index % 4}" / "Runs" / f"Run_{index:05d}"
        run.mkdir(parents=True)
        (run / "data.bin").write_bytes(b"x")
        (run / "acquisition_complete.flag").write_bytes(b"")
        runs.append(run)
    queue = JobQueue(wlab.config().queue_db)
    now = watching.client.clock()
    with queue.transaction():
        for run in runs[40:]:
            queue.get_or_create(str(run), EQ, "/nas/" + run.name, now=now)
    queue.close()

    report = await watching.watcher.scan_once()
    assert len(report.enqueued) == 40 and len(report.adopted) == 1960 and report.errors == []

    walks: list[str] = []
    for name in ("completeness", "fingerprint"):
        real = getattr(watcher_mod, name)
        monkeypatch.setattr(
            watcher_mod,
            name,
            lambda *a, _real=real, _name=name: walks.append(_name) or _real(*a),
        )
    counter = _Counter(runs)
    counter.install(monkeypatch)
    report = await watching.watcher.scan_once()
    listings = counter.scandirs
    new = wlab.finished_run("Run_new", project="PROJ-0")
    report_with_new = await watching.watcher.scan_once()
    monkeypatch.undo()

    assert report.already_queued == 2000 and report.examined == 0 and report.enqueued == []
    assert walks == [
        "completeness",
        "fingerprint",
    ]  # only for the new run, in the last pass
    assert counter.inside == []  # nothing under a run already handed over was stat'ed, opened or listed
    assert listings == 1 + 4 + 4  # the root, the projects, their Runs/: per pass, not per run
    assert report_with_new.enqueued == [str(new)] and report_with_new.examined == 1


# ------------------------------------------------------------------ folders that come and go


async def test_symlinked_run_project_or_runs_folder_is_not_followed(wlab: WatchLab, watching: Running) -> None:
    outside = wlab.root / "outside" / "Run_real"
    outside.mkdir(parents=True)
    (outside / "data.bin").write_bytes(b"x")
    (outside / "acquisition_complete.flag").write_text("")
    runs = wlab.equipment_root / "PROJ-1" / "Runs"
    runs.mkdir(parents=True)
    os.symlink(outside, runs / "Run_link")
    os.symlink(outside.parent, wlab.equipment_root / "PROJ-1" / "TestRuns")
    (wlab.equipment_root / "PROJ-2").mkdir()
    os.symlink(wlab.equipment_root / "PROJ-1", wlab.equipment_root / "PROJ-3")

    report = await watching.watcher.scan_once()
    assert report.runs_seen == 0 and report.examined == 0 and report.enqueued == []
    assert watching.spy.calls == [] and await watching.client.jobs() == []


async def test_a_run_that_disappears_is_forgotten_but_an_unmounted_root_forgets_nothing(
    wlab: WatchLab,
    watching: Running,
) -> None:
    keep = wlab.finished_run("Run_keep")
    gone = wlab.finished_run("Run_gone", files={PLACEHOLDER: b"x"})
    report = await watching.watcher.scan_once()
    assert report.enqueued == [str(keep)] and report.blocked == [str(gone)]

    moved = wlab.root / "lab-unmounted"
    wlab.equipment_root.rename(moved)  # the disk is gone for a while
    report = await watching.watcher.scan_once()
    assert report.skipped_equipment == [EQ] and report.forgotten == []
    moved.rename(wlab.equipment_root)
    assert (await watching.watcher.scan_once()).already_queued == 1

    import shutil

    shutil.rmtree(gone)
    report = await watching.watcher.scan_once()
    assert report.forgotten == [str(gone)] and watching.watcher.blocked() == []
    rows = sqlite3.connect(wlab.config().queue_db).execute("SELECT run_path, status FROM watched_runs").fetchall()
    assert rows == [(str(keep), "handed_over")]


async def test_run_loop_enqueues_a_run_by_itself(wlab: WatchLab, watching: Running) -> None:
    task = asyncio.create_task(watching.watcher.run())
    try:
        run = wlab.finished_run()
        for _ in range(500):  # a bound, not a timing assertion
            if await watching.client.status(run) != "none":
                break
            await asyncio.sleep(0.02)
        assert await watching.client.status(run) == SyncJobState.QUEUED.value
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert watching.spy.calls == [run]
