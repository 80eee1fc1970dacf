"""The three safety rules as properties, tried against random histories of a lab.

1. Never delete a local byte whose NAS copy has not been verified.
2. Never overwrite a good NAS copy with damaged or foreign data.
3. Never treat an unreachable or unmounted NAS as an empty one.

A hypothesis state machine drives the real ``NASSyncClient`` (built by
``client_from_config``) on real folders: a local lab root and a "NAS" (a
mounted share with its marker, or a remote root behind the loopback sshd),
with cleanup enabled, one verify pass and no minimum age, so the reaper can
really delete; ``retain_cache`` is drawn both ways. Each example syncs one
run first, then takes random steps: create a run, enqueue it (first sync or
again), audit, cleanup, delete the run's NAS folder, delete/truncate/flip one
NAS file, put one NAS file back from an older snapshot (other bytes, the same
size, an older mtime), flip a local byte keeping size and mtime (damage; also half way
through the client's record of a verification's file stats, and during one
of the client's reads of the file, after its open), edit a local file
(new bytes, new mtime; also between a verification's hashing and its record,
with the client's clock ahead of the file times after an audit), add a file,
delete a verified run by hand and reuse its folder and file names for a new
acquisition, retry a FAILED job, restart the client, unplug and
plug the NAS, lock the job queue for the client's next few writes (another
program holding SQLite's write lock past the busy timeout), and, where the
client has them, ``retry(accept_local=True)`` and ``restore``.

The machine keeps a model: the intended content of every file the lab ever
wrote (an edit or an accepted local version changes it; damage does not), and
the NAS bytes last seen under a verified manifest. After every step (and after
``wait_idle`` and any short backoff have settled) it checks:

(a) rule 1: every file's intended bytes are present locally, or on the NAS
    byte-identical and listed with that hash in a verified manifest (the NAS
    or the local ``.exlab-wizard/checksums.sha256`` whose digest is the job's);
(b) rule 2: a NAS file seen verified is unchanged, or replaced by the run's
    current intended bytes (an edit re-synced, accept-local, a reused run
    name) with the replaced verified version left under
    ``<remote run>/.exlab-wizard/previous/<UTC timestamp>/``. The test's own
    NAS damage steps are the only other way a verified NAS file may change;
(c) rule 3: while the NAS is away, no local file is deleted, no job reaches
    VERIFIED or CLEANED, and nothing is written where the share should be;
(d) no job is left RUNNING or AWAITING_VERIFY once the client is idle (a
    queue locked for a while included: a step meeting the lock may fail, and
    what it promises is then not asserted, but nothing may be left half done).

Damage is only done where the other side still holds the truth: the test
never destroys the last copy itself. One loss is the configuration's, not the
engine's: the reaper re-checks the NAS copy's listing (sizes) right before it
deletes, not its bytes, so NAS rot of the same size that no audit has seen
yet may cost the run when ``min_verify_passes`` is 1; it is counted as an
``event``, not a failure (a snapshot restore whose mtime is within the 2 s a
copy's mtime may be off counts the same; an older one is the engine's to see). Once an audit has run over the rot, it is the
engine's to catch. And the test never damages a local file edited since the
engine last verified it: rot after an edit looks exactly like a second edit.

Default: a fixed seed (the same examples on every run, CI included), 60
examples of up to 15 steps on the mount transport and 10 on rsync_ssh. A
long run with a fresh random seed and the example database (see
tests/properties/README.md):

    EXLAB_PROPERTY_EXAMPLES=2000 EXLAB_PROPERTY_STEPS=25 \\
        .venv/bin/python -m pytest -q tests/properties -p no:cacheprovider
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import inspect
import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from exlab_wizard.config import parse_config
from exlab_wizard.sync import job_runner, spill
from exlab_wizard.sync.manifest_format import manifest_digest, parse_manifest
from exlab_wizard.sync.nas_client import (
    EnqueueError,
    NASSyncClient,
    SyncHandleState,
    client_from_config,
)
from exlab_wizard.sync.queue import JobQueue
from exlab_wizard.sync.reaper import local_check, record_verified_stat
from exlab_wizard.sync.states import SyncJobState
from tests.properties.nas import EQ, MountNas, Nas, RsyncNas

#: The second instrument, on the same NAS as the first.
TWIN_EQ = "FACS_02"

S = SyncJobState
META = ".exlab-wizard"
EXAMPLES_ENV = "EXLAB_PROPERTY_EXAMPLES"
STEPS_ENV = "EXLAB_PROPERTY_STEPS"
LONG = EXAMPLES_ENV in os.environ
EXAMPLES = int(os.environ.get(EXAMPLES_ENV, "60"))
STEPS = int(os.environ.get(STEPS_ENV, "15"))
#: steps to leave out, comma-separated (to look past a known failure: EXLAB_PROPERTY_SKIP=nas_delete_run)
SKIP = frozenset(filter(None, os.environ.get("EXLAB_PROPERTY_SKIP", "").split(",")))
WAIT_S = 60.0
#: the client's reads of a file, as the local checks and the stats record make them
REAL_HASH_AT = local_check.hash_at
REAL_OPEN_REGULAR = local_check.open_regular

# The accept-local retry and restore are being added; their rules exist only
# when the client under test has them, so this module runs on both sides.
HAS_ACCEPT_LOCAL = "accept_local" in inspect.signature(NASSyncClient.retry).parameters
HAS_RESTORE = callable(getattr(NASSyncClient, "restore", None))

# Binary names only: the gate scans text extensions for placeholders, and random
# bytes must never block a run.
NAMES = ["image_001.tif", "stack.raw", "sub/plate_A1.bin", "sub/deeper/frame.dat"]
CONTENT = st.binary(min_size=1, max_size=4096)
FILES = st.dictionaries(st.sampled_from(NAMES), CONTENT, min_size=1, max_size=4)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read(path: Path) -> bytes | None:
    """The bytes of a regular file, or None (missing, a folder, a symlink)."""
    try:
        if path.is_symlink() or not path.is_file():
            return None
        return path.read_bytes()
    except OSError:
        return None


def flip_byte_keep_stat(path: Path, offset: int) -> None:
    """Change one byte in place; size and mtime stay (bit rot behind the filesystem's back).

    ``offset`` is taken modulo the size; an empty file gets one byte instead.
    """
    st_ = os.stat(path)
    if st_.st_size == 0:
        path.write_bytes(b"\xff")
        os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns))
        return
    offset %= st_.st_size
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns))


def is_typed_refusal(exc: BaseException) -> bool:
    """An error the client raises on purpose (its own exception types), not a crash."""
    return type(exc).__module__.startswith("exlab_wizard.")


class QueueLocked(sqlite3.OperationalError):
    """SQLite's answer when another program holds the queue's write lock past the busy timeout."""


class Clock:
    """Real UTC time plus an offset that only moves forward."""

    def __init__(self) -> None:
        self.offset = dt.timedelta(0)

    def __call__(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + self.offset

    def advance(self, hours: float) -> None:
        self.offset += dt.timedelta(hours=hours)


@dataclass
class RunModel:
    """What the test knows one run must hold."""

    path: Path
    rel: str  # relative to <local_root>/<EQ>: also its place under the NAS root
    #: the intended content of every file the lab wrote: this must survive somewhere
    truth: dict[str, bytes]
    #: NAS bytes last seen under a verified manifest (the good copy rule 2 protects)
    good: dict[str, bytes] = field(default_factory=dict)
    #: files whose truth was set by accept-local: their old NAS version must be kept
    accepted: dict[str, bytes] = field(default_factory=dict)
    #: NAS files the test rotted (same size and mtime) that no audit has looked at since
    rotten: set[str] = field(default_factory=set)
    #: local files edited (new mtime) since the engine last verified the run
    touched: set[str] = field(default_factory=set)
    #: files edited after a verification's hashing, before its record: touched even once it is VERIFIED
    late: set[str] = field(default_factory=set)
    #: such edits until the next verification: the record caught their stat, so no engine can tell
    #: them from damage (docs/cleanup.md); ``restore`` may then rightly bring the verified bytes back
    ambiguous: set[str] = field(default_factory=set)


class ThreeRules(RuleBasedStateMachine):
    """One lab, one equipment, one NAS; see the module notes."""

    make_nas: Callable[[Path], Nas]
    base: Path

    def __init__(self) -> None:
        super().__init__()
        self.example = Path(tempfile.mkdtemp(prefix="ex-", dir=self.base))
        self.local_root = self.example / "lab"
        self.local_root.mkdir()
        self.nas = self.make_nas(self.example)
        self.loop = asyncio.new_event_loop()
        self.clock = Clock()
        self.client: NASSyncClient | None = None
        self.runs: list[RunModel] = []
        self.config: Any = None
        # Rule 3 bookkeeping: the state at the end of the previous step.
        self.local_before: set[tuple[str, str]] = set()
        self.last_event = 0
        self.unplugged_before = False
        #: armed by rot_at_the_next_verification; done inside the client's next record of verified stats
        self.rot_armed = False
        #: (run path, file) the armed rot damaged, as it happened: inside a step that verifies again
        self.rotted: set[tuple[str, str]] = set()
        #: armed by edit_at_the_next_verification; done just before the client's next record
        self.edit_armed = False
        #: armed by queue_locked: writes that still go through, then writes that fail
        self.writes_before_lock = 0
        self.locked_writes = 0
        #: a write failed for the lock during this step (reset after the step's checks)
        self.lock_met = False
        #: armed by rot_during_a_read (run, file, its bytes then): done inside the client's next read of it
        self.read_rot: tuple[RunModel, str, bytes] | None = None
        self.reads_to_skip = 0
        job_runner.record_verified_stat = self._record_verified_stat
        local_check.hash_at = self._hash_at
        local_check.open_regular = self._open_regular
        real_transaction = self._real_transaction = JobQueue.transaction

        def transaction(queue: JobQueue) -> Any:
            if self.locked_writes > 0 and queue._depth == 0:
                if self.writes_before_lock > 0:
                    self.writes_before_lock -= 1
                    return real_transaction(queue)
                self.locked_writes -= 1
                self.lock_met = True
                raise QueueLocked("database is locked")
            return real_transaction(queue)

        JobQueue.transaction = transaction  # type: ignore[method-assign]

    def teardown(self) -> None:
        job_runner.record_verified_stat = record_verified_stat
        local_check.hash_at = REAL_HASH_AT
        local_check.open_regular = REAL_OPEN_REGULAR
        JobQueue.transaction = self._real_transaction  # type: ignore[method-assign]
        try:
            if self.client is not None:
                self._run(self.client.close())
        finally:
            self.loop.close()
            self.nas.cleanup()
            shutil.rmtree(self.example, ignore_errors=True)

    # ------------------------------------------------------------------ plumbing

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run a coroutine; a call the locked queue refused (what the CLI shows as an error) returns None."""
        try:
            return self.loop.run_until_complete(coro)
        except QueueLocked:
            assert self.lock_met
            return None

    def _open(self) -> NASSyncClient:
        client = client_from_config(self.config)
        client.clock = self.clock
        self._run(client.init())
        assert client.runs_workers
        return client

    def _settle(self) -> None:
        """Idle: nothing in flight, nothing due, no retry due within the next seconds."""
        assert self.client is not None
        client = self.client

        async def settle() -> None:
            for _ in range(500):
                try:
                    await client.wait_idle(timeout=WAIT_S)
                except TimeoutError:
                    rows = await client.jobs()
                    raise AssertionError(
                        f"wait_idle did not return within {WAIT_S} s: "
                        + "; ".join(f"{Path(j.run_path).name} {j.state.value}" for j in rows)
                    ) from None
                queued = await client.jobs(state=S.QUEUED)
                if not [
                    j
                    for j in queued
                    if j.next_attempt_at is not None and (j.next_attempt_at - self.clock()).total_seconds() < 2
                ]:
                    return
                await asyncio.sleep(0.02)

        self._run(settle())

    def _jobs(self) -> dict[str, Any]:
        assert self.client is not None
        return {j.run_path: j for j in self._run(self.client.jobs())}

    def _job(self, model: RunModel) -> Any:
        return self._jobs().get(str(model.path))

    def _nas_dir(self, model: RunModel) -> Path:
        return self.nas.storage / model.rel

    def _nas(self, model: RunModel, rel: str) -> bytes | None:
        return read(self._nas_dir(model) / rel)

    def _local(self, model: RunModel, rel: str) -> bytes | None:
        return read(model.path / rel)

    def _manifests(self, model: RunModel, job: Any) -> list[dict[str, str]]:
        """The verified manifests of the run: the NAS's and the local one, when their digest is the job's."""
        if job is None or not job.manifest_digest:
            return []
        out = []
        for path in (self._nas_dir(model) / META / "checksums.sha256", model.path / META / "checksums.sha256"):
            data = read(path)
            if data is None:
                continue
            try:
                parsed = parse_manifest(data)
            except ValueError:
                continue
            if manifest_digest(parsed) == job.manifest_digest:
                out.append(parsed)
        return out

    def _nas_safe(self, model: RunModel, rel: str, job: Any = None, manifests: list | None = None) -> bool:
        truth = model.truth[rel]
        if self._nas(model, rel) != truth:
            return False
        if manifests is None:
            manifests = self._manifests(model, self._job(model) if job is None else job)
        return any(m.get(rel) == sha(truth) for m in manifests)

    def _local_files(self) -> set[tuple[str, str]]:
        found = set()
        for model in self.runs:
            for rel in model.truth:
                if (model.path / rel).is_file():
                    found.add((model.rel, rel))
        return found

    def _new_run(self, files: dict[str, bytes], *, equipment: str = EQ, rel: str | None = None) -> RunModel:
        rel = rel or f"PROJ-1/Runs/Run_2026-01-0{len(self.runs) + 1}"
        run = self.local_root / equipment / rel
        (run / META).mkdir(parents=True)
        (run / META / "creation.json").write_text(
            json.dumps(
                {
                    "schema_version": "1.0",
                    "level": "run",
                    "run_kind": "experimental",
                    "paths": {"local": str(run), "nas": None},
                    "sync_status": "pending",
                    "validation_overrides": [],
                }
            )
        )
        for name, data in files.items():
            (run / name).parent.mkdir(parents=True, exist_ok=True)
            (run / name).write_bytes(data)
        model = RunModel(run, rel, dict(files))
        self.runs.append(model)
        return model

    def _enqueue(self, model: RunModel) -> None:
        assert self.client is not None
        try:
            handle = self._run(self.client.enqueue(model.path))
        except EnqueueError:
            assert not model.path.is_dir(), "enqueue refused an existing run folder"
            return  # the reaper removed the run folder (retain_cache: false)
        except Exception as exc:
            if not is_typed_refusal(exc):  # a damaged run is refused with a typed error, not re-armed
                raise
            return
        if handle is None:
            return  # the queue was locked
        assert handle.state == SyncHandleState.QUEUED, handle.blocking_findings

    def _events_since(self, last: int) -> tuple[int, list[tuple[str, str, str, str]]]:
        """Transitions to VERIFIED or CLEANED recorded after event ``last`` (run path, from, to, detail), and the newest event id."""
        conn = sqlite3.connect(f"file:{self.config.queue_db}?mode=ro", uri=True)
        try:
            newest = conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
            rows = conn.execute(
                "SELECT j.run_path, e.from_state, e.to_state, e.detail FROM events e JOIN jobs j ON j.id = e.job_id"
                " WHERE e.id > ? AND e.kind = 'transition' AND e.to_state IN ('verified', 'cleaned') ORDER BY e.id",
                (last,),
            ).fetchall()
        finally:
            conn.close()
        return newest, [tuple(r) for r in rows]

    # ------------------------------------------------------------------ candidates for the steps

    @staticmethod
    def _pick_run(data: st.DataObject, models: list[RunModel]) -> RunModel:
        """One of ``models``, drawn by run name (what a failing example prints)."""
        by_name = {m.path.name: m for m in models}
        return by_name[data.draw(st.sampled_from(sorted(by_name)), label="run")]

    @staticmethod
    def _pick_file(data: st.DataObject, files: list[tuple[RunModel, str]]) -> tuple[RunModel, str]:
        """One of ``files``, drawn as ``<run name>/<file>``."""
        by_name = {f"{m.path.name}/{rel}": (m, rel) for m, rel in files}
        return by_name[data.draw(st.sampled_from(sorted(by_name)), label="file")]

    def _sharing(self, model: RunModel) -> list[RunModel]:
        """The runs whose NAS folder is ``model``'s (itself, and a second instrument's run of that name)."""
        return [m for m in self.runs if m.rel == model.rel]

    def _nas_damageable(self) -> list[tuple[RunModel, str]]:
        """NAS files the test may damage: the intended bytes of every run there are intact locally."""
        return [
            (m, rel)
            for m in self.runs
            for rel in sorted(m.truth)
            if self._nas(m, rel) is not None
            and all(self._local(o, rel) == o.truth[rel] for o in self._sharing(m) if rel in o.truth)
        ]

    def _nas_run_deletable(self) -> list[RunModel]:
        return [
            m
            for m in self.runs
            if self._nas_dir(m).exists()
            and all(self._local(o, rel) == data for o in self._sharing(m) for rel, data in o.truth.items())
        ]

    def _forget_nas(self, model: RunModel, rel: str | None, *, rotten: bool = False) -> None:
        """The test damaged the NAS copy of ``rel`` (None: the whole folder) of every run whose folder it is."""
        for other in self._sharing(model):
            for name in list(other.good) if rel is None else [rel]:
                other.good.pop(name, None)
                other.rotten.discard(name)
                if rotten:
                    other.rotten.add(name)

    def _local_damageable(self) -> list[tuple[RunModel, str]]:
        """Local files the test may damage: intact, the NAS holds them under a verified manifest, not edited since.

        Damage to a file edited (new mtime) since the last verification looks
        exactly like a second edit: no engine can tell them apart, so the test
        does not do that.
        """
        jobs = self._jobs()
        out = []
        for m in self.runs:
            manifests = self._manifests(m, jobs.get(str(m.path)))
            out += [
                (m, rel)
                for rel in sorted(m.truth)
                if rel not in m.touched
                and self._local(m, rel) == m.truth[rel]
                and self._nas_safe(m, rel, manifests=manifests)
            ]
        return out

    def _local_present(self) -> list[tuple[RunModel, str]]:
        return [(m, rel) for m in self.runs for rel in sorted(m.truth) if self._local(m, rel) is not None]

    def _failed(self) -> list[RunModel]:
        jobs = self._jobs()
        return [m for m in self.runs if getattr(jobs.get(str(m.path)), "state", None) == S.FAILED]

    # ------------------------------------------------------------------ steps

    @initialize(retain_cache=st.booleans(), files=FILES, pending=st.none() | FILES)
    def first_run_synced(self, retain_cache: bool, files: dict[str, bytes], pending: dict[str, bytes] | None) -> None:
        """One run synced; maybe a second run written but not enqueued yet."""
        self.config = parse_config(
            {
                # A second instrument on the same share: its runs of the same project and name reach
                # the same NAS folders (the NAS path leaves the equipment id out).
                "equipment": [
                    {"id": eq, "local_root": str(self.local_root), "transport": self.nas.transport()}
                    for eq in (EQ, TWIN_EQ)
                ],
                # scan and audit intervals of an hour: the reaper and the audit run only as steps
                "sync": {"backoff_s": [0.01, 0.01], "scan_interval_s": 3600, "audit_interval_s": 6 * 3600},
                "nas_cleanup": {
                    "enabled": True,
                    "min_verify_passes": 1,
                    "min_age_hours": 0,
                    "retain_cache": retain_cache,
                },
                "state_dir": str(self.example / "state"),
            }
        )
        self.client = self._open()
        self._enqueue(self._new_run(files))
        self._settle()
        if pending is not None:
            self._new_run(pending)

    @precondition(lambda self: len(self.runs) < 3)
    @rule(files=FILES)
    def create_run(self, files: dict[str, bytes]) -> None:
        self._new_run(files)

    @rule(data=st.data())
    def enqueue(self, data: st.DataObject) -> None:
        """The first sync of a run, or enqueuing it again (re-arms a FAILED job).

        A run that is intact locally, new or FAILED for a reason other than local
        damage or another run's verified copy in its NAS folder, with the NAS
        there, and alone in its NAS folder, must end VERIFIED with every file on
        the NAS. (Of two runs sharing one NAS folder, the one that did not get
        there first is refused, whenever its push first reaches the folder.)
        """
        model = self._pick_run(data, self.runs)
        before = self._job(model)
        due = (
            not self.nas.unplugged
            and len(self._sharing(model)) == 1
            and self._intact_locally(model)
            and (
                before is None
                or (before.state == S.FAILED and before.error_kind not in ("local_damage", "remote_conflict"))
            )
        )
        self._enqueue(model)
        self._settle()
        if due and not self.lock_met:
            job = self._job(model)
            assert job is not None and job.state == S.VERIFIED, (
                f"an intact run with the NAS there did not sync: {job and (job.state.value, job.last_error)}"
            )
            # (a file edited after the hashing holds newer bytes than the ones just verified)
            missing = [
                rel for rel in sorted(model.truth) if rel not in model.late and not self._nas_safe(model, rel, job)
            ]
            assert not missing, f"VERIFIED, but not on the NAS under the verified manifest: {missing}"

    @rule()
    def audit(self) -> None:
        assert self.client is not None
        self.clock.advance(1)
        self._run(self.client.audit_once())
        self._settle()
        if not self.nas.unplugged:
            for model in self.runs:
                model.rotten.clear()  # the audit has seen the rot: from now on a loss is the engine's

    @rule()
    def cleanup(self) -> None:
        """A reaper pass. A verified run, intact locally and on the NAS, with the NAS there, is cleaned."""
        assert self.client is not None
        due = [
            m
            for m in self.runs
            if not self.nas.unplugged
            and self._intact_locally(m)
            and getattr(self._job(m), "state", None) in (S.VERIFIED, S.CLEANUP_ELIGIBLE)
            and all(self._nas_safe(m, rel) for rel in m.truth)
            # (a run folder deleted and written again by hand lost its checksums.sha256: the reaper
            # refuses it, "no recorded manifest", until it is verified again)
            and (m.path / META / "checksums.sha256").is_file()
        ]
        self._run(self.client.cleanup_once())
        self._settle()
        for model in due if not self.lock_met else ():
            job = self._job(model)
            assert job.state == S.CLEANED, (
                f"{model.path.name}: every interlock held, yet the job is {job.state.value} "
                f"({[e.detail for e in self._run(self.client.job(model.path)).events][-3:]})"
            )

    def _intact_locally(self, model: RunModel) -> bool:
        return model.path.is_dir() and all(self._local(model, rel) == data for rel, data in model.truth.items())

    @precondition(lambda self: bool(self._nas_run_deletable()))
    @rule(data=st.data())
    def nas_delete_run(self, data: st.DataObject) -> None:
        """An admin deletes the run's NAS folder (or the NAS is rolled back to an older snapshot)."""
        model = self._pick_run(data, self._nas_run_deletable())
        shutil.rmtree(self._nas_dir(model))
        self._forget_nas(model, None)

    @precondition(lambda self: bool(self._nas_damageable()))
    @rule(data=st.data())
    def nas_delete_file(self, data: st.DataObject) -> None:
        model, rel = self._pick_file(data, self._nas_damageable())
        (self._nas_dir(model) / rel).unlink()
        self._forget_nas(model, rel)

    @precondition(lambda self: bool(self._nas_damageable()))
    @rule(data=st.data())
    def nas_truncate_file(self, data: st.DataObject) -> None:
        """Half the file is left, its mtime kept (a copy cut short by an old snapshot or a full disk)."""
        model, rel = self._pick_file(data, self._nas_damageable())
        path = self._nas_dir(model) / rel
        info = os.stat(path)
        os.truncate(path, info.st_size // 2)
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
        self._forget_nas(model, rel)

    @precondition(lambda self: bool(self._nas_damageable()))
    @rule(data=st.data(), offset=st.integers(0, 4095))
    def nas_flip_byte(self, data: st.DataObject, offset: int) -> None:
        """NAS bit rot: one byte flipped, size and mtime kept."""
        model, rel = self._pick_file(data, self._nas_damageable())
        flip_byte_keep_stat(self._nas_dir(model) / rel, offset)
        self._forget_nas(model, rel, rotten=True)

    @precondition(lambda self: bool(self._nas_damageable()))
    @rule(data=st.data(), offset=st.integers(0, 4095), seconds=st.sampled_from([1, 3600, 30 * 86400]))
    def nas_snapshot_restore(self, data: st.DataObject, offset: int, seconds: int) -> None:
        """The NAS file put back from an older snapshot: other bytes, the same size, an older mtime.

        Unlike bit rot (mtime kept), the listing the reaper takes right before
        a deletion can see it: no local byte may be deleted on such a copy.
        """
        model, rel = self._pick_file(data, self._nas_damageable())
        path = self._nas_dir(model) / rel
        info = os.stat(path)
        flip_byte_keep_stat(path, offset)
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns - seconds * 10**9))
        self._forget_nas(model, rel, rotten=seconds <= 2)  # within the 2 s slack of a copy's mtime: as bit rot

    @precondition(lambda self: bool(self._local_damageable()))
    @rule(data=st.data(), offset=st.integers(0, 4095))
    def local_damage(self, data: st.DataObject, offset: int) -> None:
        """Local bit rot: one byte flipped, size and mtime kept. The intended bytes stay the old ones."""
        model, rel = self._pick_file(data, self._local_damageable())
        path = model.path / rel
        flip_byte_keep_stat(path, offset)

    @rule()
    def rot_at_the_next_verification(self) -> None:
        """Armed: at the next verification a tool rewrites a verified file's bytes and puts its old mtime back.

        Half done (the new bytes with the write's mtime) when the client records the verified
        stats: found by the torture harness, where such damage went out as an edit.
        """
        self.rot_armed = True

    @precondition(lambda self: bool(self._local_damageable()))
    @rule(data=st.data(), skip=st.integers(0, 2))
    def rot_during_a_read(self, data: st.DataObject, skip: int) -> None:
        """Armed: a byte of a verified file flips (size and mtime kept) during a coming read of it by the client.

        The read after the next ``skip`` ones (an audit's check may read it first, then the check
        before the re-transfer the audit started).

        After the read's open, before its bytes: in a local check (the reaper's, the audit's, the
        one before a re-transfer) or in the stats record's second read of a file stamped after
        the hashing. Found by the torture harness: each took the damage for an edit (a file
        being written; the newer bytes of an edit the hashing missed) and sent it over the
        verified NAS copy. It lands only while the file and its NAS copy still hold the bytes
        they held when armed (the test never damages the last copy, nor a file edited since).
        """
        model, rel = self._pick_file(data, self._local_damageable())
        self.read_rot = (model, rel, model.truth[rel])
        self.reads_to_skip = skip

    def _rots_now(self, path: str) -> bool:
        """Does the armed rot land in this read of ``path``? Disarms it when it does."""
        if self.read_rot is None:
            return False
        model, rel, good = self.read_rot
        if str(model.path / rel) != path or model.truth.get(rel) != good:
            return False
        if read(model.path / rel) != good or read(self._nas_dir(model) / rel) != good:
            return False
        if self.reads_to_skip > 0:
            self.reads_to_skip -= 1
            return False
        self.read_rot = None
        self.rotted.add((str(model.path), rel))
        return True

    def _hash_at(self, folder: int, name: str) -> Any:
        if not self._rots_now(os.path.join(os.readlink(f"/proc/self/fd/{folder}"), name)):
            return REAL_HASH_AT(folder, name)
        fd, before = REAL_OPEN_REGULAR(name, dir_fd=folder)
        try:
            flip_byte_keep_stat(Path(f"/proc/self/fd/{folder}", name), 0)
            data = os.pread(fd, before.st_size + 1, 0)
            return hashlib.sha256(data).hexdigest(), before, os.fstat(fd)
        finally:
            os.close(fd)

    def _open_regular(self, path: Any, **kwargs: Any) -> Any:
        if not kwargs and self._rots_now(str(path)):
            flip_byte_keep_stat(Path(path), 0)  # after the record's stat, before its read
        return REAL_OPEN_REGULAR(path, **kwargs)

    @rule()
    def edit_at_the_next_verification(self) -> None:
        """Armed: a file is edited (new bytes, stamped now by the file system) after the hashing, before the record.

        With the client's clock ahead of the file times (every audit moves it an hour on),
        the edit must not be recorded as a trusted stat of the verified bytes: the reaper
        would not re-read it and would delete an edit the NAS never got.
        """
        self.edit_armed = True

    def _edit_before_record(self, model: RunModel | None, hashes: Any) -> None:
        edit = [
            rel
            for rel in sorted(model.truth if self.edit_armed and model is not None else ())
            if model.truth[rel]
            and hashes.get(rel) == sha(model.truth[rel])
            and self._local(model, rel) == model.truth[rel]
        ]
        if not edit:
            return
        self.edit_armed = False
        rel = edit[0]
        model.good[rel] = model.truth[rel]  # what the NAS holds now, just verified
        # The same size: only the bytes and the file's times tell this edit from the verified file.
        content = bytes(b ^ 0x5A for b in model.truth[rel])
        (model.path / rel).write_bytes(content)
        model.truth[rel] = content
        model.accepted.pop(rel, None)
        model.late.add(rel)

    def _record_verified_stat(self, queue: Any, job_id: str, run_path: Any, hashes: Any, now: Any, **kw: Any) -> int:
        """The client's record of a verification's file stats, with the armed rot half way through it."""
        model = next((m for m in self.runs if str(m.path) == str(run_path)), None)
        self._edit_before_record(model, hashes)
        rot = [
            rel
            for rel in sorted(model.truth if self.rot_armed and model is not None else ())
            if hashes.get(rel) == sha(model.truth[rel]) and self._local(model, rel) == model.truth[rel]
        ]
        if not rot:
            return record_verified_stat(queue, job_id, run_path, hashes, now, **kw)
        self.rot_armed = False
        self.rotted.add((str(model.path), rot[0]))
        path = model.path / rot[0]
        before = os.stat(path)
        flip_byte_keep_stat(path, 0)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))  # the write's own mtime
        try:
            return record_verified_stat(queue, job_id, run_path, hashes, now, **kw)
        finally:
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # the old one put back

    @precondition(lambda self: bool(self._local_present()))
    @rule(data=st.data(), content=CONTENT)
    def local_edit(self, data: st.DataObject, content: bytes) -> None:
        """The operator rewrites a file: new bytes, new mtime. These are the intended bytes now."""
        model, rel = self._pick_file(data, self._local_present())
        path = model.path / rel
        old = os.stat(path)
        path.write_bytes(content)
        os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 10_000_000_000))
        model.truth[rel] = content
        model.accepted.pop(rel, None)
        model.touched.add(rel)

    @precondition(lambda self: bool(self._failed()))
    @rule(data=st.data())
    def retry_failed(self, data: st.DataObject) -> None:
        assert self.client is not None
        model = self._pick_run(data, self._failed())
        try:
            self._run(self.client.retry(self._job(model).id))
        except Exception as exc:
            if not is_typed_refusal(exc):
                raise
        self._settle()

    @rule(retain_cache=st.booleans())
    def restart(self, retain_cache: bool) -> None:
        """Close the client and open a new one on the same queue (a service restart, maybe a new retain_cache)."""
        assert self.client is not None
        self.locked_writes = 0  # (a service that cannot start on a locked queue is restarted later)
        self._run(self.client.close())
        self.client = None
        cleanup = self.config.nas_cleanup.model_copy(update={"retain_cache": retain_cache})
        self.config = self.config.model_copy(update={"nas_cleanup": cleanup})
        self.client = self._open()
        self._settle()

    @precondition(lambda self: any(m.path.is_dir() and len(m.truth) < 6 for m in self.runs))
    @rule(data=st.data(), content=CONTENT)
    def local_add_file(self, data: st.DataObject, content: bytes) -> None:
        """The operator adds a file to a run folder (after its sync, or even after its cleanup)."""
        model = self._pick_run(data, [m for m in self.runs if m.path.is_dir() and len(m.truth) < 6])
        rel = f"added/late_{len(model.truth)}.bin"
        (model.path / rel).parent.mkdir(exist_ok=True)
        (model.path / rel).write_bytes(content)
        model.truth[rel] = content

    @precondition(lambda self: bool(self._verified_runs()))
    @rule(data=st.data(), content=CONTENT)
    def reuse_run_name(self, data: st.DataObject, content: bytes) -> None:
        """The lab deletes a verified run by hand and a new acquisition reuses its folder and file names.

        The new run has new bytes under every old name and no ``checksums.sha256``
        yet. Its data are the truth now; the old run's verified NAS bytes are
        protected by rule 2 (kept in place or under ``previous/``).
        """
        model = self._pick_run(data, self._verified_runs())
        # A later acquisition: its files are stamped after every time the old run's files carried
        # (a step may have moved one ahead of this machine's clock, as a rewrite in progress does).
        later = max((p.stat().st_mtime_ns for p in model.path.rglob("*") if p.is_file()), default=0)
        later = max(later + 10_000_000_000, time.time_ns())
        shutil.rmtree(model.path)
        (model.path / META).mkdir(parents=True)
        for i, rel in enumerate(sorted(model.truth)):
            new = content + bytes([i]) + b"reused"
            (model.path / rel).parent.mkdir(parents=True, exist_ok=True)
            (model.path / rel).write_bytes(new)
            os.utime(model.path / rel, ns=(later, later))
            model.truth[rel] = new
            model.accepted.pop(rel, None)
            model.touched.add(rel)

    @precondition(lambda self: len(self.runs) < 4 and bool(self._twinless()))
    @rule(data=st.data(), content=CONTENT, manifest_late=st.booleans())
    def second_instrument_same_folder(self, data: st.DataObject, content: bytes, manifest_late: bool) -> None:
        """A second instrument's run of the same project and name: one NAS folder for both, then enqueued.

        Same file names (instruments write fixed names), other bytes. Its NAS
        folder may hold the first run's verified copy, which its push must never
        write over (a share folding case, two PCs set up alike do the same).
        ``manifest_late``: the first run's NAS manifest is not there yet while
        the second run goes (its metadata push after VERIFIED failed and waits
        for its retry), and lands after.
        """
        first = self._pick_run(data, self._twinless())
        files = {rel: content + bytes([i]) + b"twin" for i, rel in enumerate(sorted(first.truth))}
        manifest = self._nas_dir(first) / META / "checksums.sha256"
        held = self.example / "manifest-not-there-yet"
        late = manifest_late and manifest.is_file()
        if late:
            os.replace(manifest, held)
        self._enqueue(self._new_run(files, equipment=TWIN_EQ, rel=first.rel))
        self._settle()
        if late and not manifest.exists():
            os.replace(held, manifest)  # the first run's metadata push comes through

    def _twinless(self) -> list[RunModel]:
        """Runs of the first instrument that have no second-instrument twin yet."""
        taken = {m.rel for m in self.runs if TWIN_EQ in m.path.parts}
        return [m for m in self.runs if TWIN_EQ not in m.path.parts and m.rel not in taken]

    def _verified_runs(self) -> list[RunModel]:
        jobs = self._jobs() if self.client is not None else {}
        return [
            m
            for m in self.runs
            if m.path.is_dir() and getattr(jobs.get(str(m.path)), "state", None) in (S.VERIFIED, S.CLEANUP_ELIGIBLE)
        ]

    @rule(after=st.integers(0, 8), writes=st.integers(1, 4))
    def queue_locked(self, after: int, writes: int) -> None:
        """Armed: after the client's next ``after`` writes, another program takes the queue's write
        lock; the ``writes`` writes after them fail.

        As SQLite fails them after its busy timeout ("database is locked"), wherever they
        are: a job's transitions, its error report, the reaper's records, an API call.
        The lock is let go at the end of the step that met it.
        """
        self.writes_before_lock, self.locked_writes = after, writes

    @precondition(lambda self: not self.nas.unplugged)
    @rule(how=st.sampled_from(["down", "volume"]))
    def unplug_nas(self, how: str) -> None:
        """The NAS goes away: switched off, or up with its volume (share) not mounted."""
        self.nas.unplug(how)

    @precondition(lambda self: self.nas.unplugged)
    @rule()
    def plug_nas(self) -> None:
        stray = self.nas.plug()
        assert not stray, f"rule 3: written where the NAS volume should be while it was not mounted: {stray}"

    if HAS_ACCEPT_LOCAL:

        @precondition(lambda self: bool(self._failed()))
        @rule(data=st.data())
        def retry_accept_local(self, data: st.DataObject) -> None:
            """``retry --accept-local``: the local bytes become the truth; the NAS keeps the replaced version."""
            assert self.client is not None
            model = self._pick_run(data, self._failed())
            try:
                self._run(self.client.retry(self._job(model).id, accept_local=True))
            except Exception as exc:
                if not is_typed_refusal(exc):
                    raise
                self._settle()
                return
            if self.lock_met:
                self._settle()
                return  # not accepted: the queue was locked
            for rel in model.truth:
                local = self._local(model, rel)
                if local is None or local == model.truth[rel]:
                    continue
                model.truth[rel] = local
                if rel in model.good and model.good[rel] != local:
                    model.accepted[rel] = model.good[rel]
            self._settle()

    if HAS_RESTORE:

        @precondition(lambda self: any(self._job(m) is not None for m in self.runs))
        @rule(data=st.data())
        def restore(self, data: st.DataObject) -> None:
            """``exlab-sync restore RUN``: verified NAS bytes back over damaged local files."""
            assert self.client is not None
            model = self._pick_run(data, [m for m in self.runs if self._job(m) is not None])
            damaged = [
                rel
                for rel in sorted(model.truth)
                if self._local(model, rel) not in (None, model.truth[rel]) and self._nas_safe(model, rel)
            ]
            self.rotted.clear()
            try:
                self._run(self.client.restore(model.path))
            except Exception as exc:
                if not is_typed_refusal(exc):
                    raise
                self._settle()
                return
            self._settle()
            if self.lock_met:
                return  # the restore may have stopped part way; the rules still hold
            for rel in sorted(model.ambiguous):
                if self._local(model, rel) == model.good.get(rel):  # the operator chose the verified bytes
                    model.truth[rel] = model.good[rel]
                    model.ambiguous.discard(rel)
                    model.touched.discard(rel)
            # (the armed rot may land in the verification a restore leads to: that damage is the test's, new)
            still = [
                rel
                for rel in damaged
                if self._local(model, rel) != model.truth[rel] and (str(model.path), rel) not in self.rotted
            ]
            assert not still, f"restore returned, but these damaged files still differ from the verified bytes: {still}"

    # ------------------------------------------------------------------ the rules

    @invariant()
    def the_three_rules_hold(self) -> None:
        if self.client is None:
            return
        problems: list[str] = []
        jobs = self._jobs()
        newest, promoted = self._events_since(self.last_event)
        verified_again = {run for run, old, new, _detail in promoted if (old, new) == ("awaiting_verify", "verified")}
        for model in self.runs:
            if str(model.path) in verified_again:
                model.touched.clear()  # the engine has hashed the edited files and recorded their stat
                model.ambiguous.clear()
            model.touched |= model.late
            model.ambiguous |= model.late
            model.late.clear()
            job = jobs.get(str(model.path))
            manifests = self._manifests(model, job)
            where = (
                f"{Path(model.rel).name} (job {'none' if job is None else job.state.value}"
                + (f", {job.error_kind}: {job.last_error}" if job is not None and job.error_kind else "")
                + ")"
            )
            problems += self._rule_1(model, manifests, where)
            problems += self._rule_2(model, where)
            self._remember_good(model, manifests)
        problems += self._rule_3(newest, promoted)
        problems += [
            f"not idle: {Path(j.run_path).name} left {j.state.value}"
            for j in jobs.values()
            if j.state in (S.RUNNING, S.AWAITING_VERIFY)
        ]
        if self.lock_met:
            self.locked_writes, self.lock_met = 0, False  # the other program lets go of the lock
        assert not problems, "\n".join(problems)

    def _rule_1(self, model: RunModel, manifests: list[dict[str, str]], where: str) -> list[str]:
        out = []
        for rel, truth in sorted(model.truth.items()):
            local = self._local(model, rel)
            if local == truth:
                continue
            nas = self._nas(model, rel)
            if nas == truth and any(m.get(rel) == sha(truth) for m in manifests):
                continue
            if local is None and rel in model.rotten and nas is not None and len(nas) == len(truth):
                # The reaper re-checks the NAS copy's size right before deleting, not its bytes:
                # rot of the same size since the last verify pass is caught by the audit only.
                event("documented limit: local copy deleted while the NAS copy had rotted unaudited")
                for known in (model.truth, model.good, model.accepted):
                    known.pop(rel, None)
                model.rotten.discard(rel)
                continue
            out.append(
                f"rule 1: {where} {rel}: the intended bytes exist nowhere: "
                f"local {'missing' if local is None else 'differs'}, NAS "
                + (
                    "missing"
                    if nas is None
                    else "differs"
                    if nas != truth
                    else "holds them but no verified manifest lists them"
                )
            )
        return out

    def _rule_2(self, model: RunModel, where: str) -> list[str]:
        out = []
        for rel, good in sorted(model.good.items()):
            now = self._nas(model, rel)
            if now == good:
                continue
            if now is None:
                out.append(f"rule 2: {where} {rel}: a verified NAS file vanished (not deleted by the test)")
            elif now != model.truth.get(rel):
                sent = " (they are the damaged local bytes)" if now == self._local(model, rel) else ""
                out.append(
                    f"rule 2: {where} {rel}: the verified NAS copy was replaced by bytes that are neither "
                    f"the verified ones nor the run's intended content{sent}"
                )
            elif not self._kept_previous(model, rel, good):
                # An edit, accept-local, or a new run under a reused folder name: no check tells them
                # apart, so whatever replaces a verified NAS copy, that copy is kept first.
                how = "accept-local" if rel in model.accepted else "the run's new bytes"
                out.append(
                    f"rule 2: {where} {rel}: {how} replaced the verified NAS copy without keeping it "
                    f"under {META}/previous/<UTC timestamp>/"
                )
        return out

    def _kept_previous(self, model: RunModel, rel: str, old: bytes) -> bool:
        previous = self._nas_dir(model) / META / "previous"
        return previous.is_dir() and any(read(stamp / rel) == old for stamp in previous.iterdir())

    def _remember_good(self, model: RunModel, manifests: list[dict[str, str]]) -> None:
        for rel in model.truth:
            now = self._nas(model, rel)
            if now is not None and any(m.get(rel) == sha(now) for m in manifests):
                if model.good.get(rel) != now:
                    model.accepted.pop(rel, None)  # the accepted bytes are the verified NAS copy now
                model.good[rel] = now

    def _rule_3(self, newest: int, promoted: list[tuple[str, str, str, str]]) -> list[str]:
        out = []
        local_now = self._local_files()
        if self.unplugged_before and self.nas.unplugged:
            gone = sorted(self.local_before - local_now)
            if gone:
                out.append(f"rule 3: local files deleted while the NAS was away: {gone}")
            out += [
                f"rule 3: while the NAS was away: {Path(run).name}: {old} -> {new} ({detail})"
                for run, old, new, detail in promoted
            ]
        stray = self.nas.stray()
        if stray:
            out.append(f"rule 3: written where the NAS should be while it was away: {stray[:8]}")
        self.local_before, self.last_event, self.unplugged_before = local_now, newest, self.nas.unplugged
        return out


def _settings(examples: int, *, shrink: bool = True) -> settings:
    phases = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target] + ([Phase.shrink] if shrink else [])
    return settings(
        max_examples=examples,
        stateful_step_count=STEPS,
        deadline=None,
        derandomize=not LONG,  # the default run is the same on every machine; a long run explores
        database=None if not LONG else settings.default.database,
        suppress_health_check=list(HealthCheck),
        print_blob=LONG,
        report_multiple_bugs=False,
        phases=phases,  # never "explain": each of its runs is a whole example with real I/O
    )


def _machine(make_nas: Callable[[Path], Nas], base: Path) -> type[ThreeRules]:
    unknown = SKIP - {name for name in dir(ThreeRules) if not name.startswith("_")}
    assert not unknown, f"EXLAB_PROPERTY_SKIP names no step: {sorted(unknown)}"
    skipped = {name: None for name in SKIP}  # a rule shadowed by None is not a rule
    return type("ThreeRules", (ThreeRules,), {"make_nas": staticmethod(make_nas), "base": base, **skipped})


@pytest.mark.timeout(0 if LONG else 300)
def test_three_rules_hold_on_the_mount_transport(tmp_path: Path) -> None:
    run_state_machine_as_test(_machine(MountNas, tmp_path), settings=_settings(EXAMPLES))


@pytest.mark.timeout(0 if LONG else 300)
def test_three_rules_hold_on_the_mount_transport_with_every_map_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same machine with every per-file map (the push's listing and plan, the local digests) spilled."""
    monkeypatch.setattr(spill, "SPILL_AT", 0)
    run_state_machine_as_test(_machine(MountNas, tmp_path), settings=_settings(max(1, EXAMPLES // 2)))


@pytest.mark.network
@pytest.mark.timeout(0 if LONG else 300)
def test_three_rules_hold_on_rsync_ssh(sshd_factory: Callable[[], Any], remote_dir: Path, tmp_path: Path) -> None:
    server = sshd_factory()  # our own server: the steps stop and start it
    run_state_machine_as_test(
        _machine(lambda _example: RsyncNas(server, remote_dir), tmp_path),
        # Shrinking over ssh takes minutes: the default run reports the example as found.
        settings=_settings(max(EXAMPLES // 6, 5), shrink=LONG),
    )


class _Pick:
    """A stand-in for hypothesis's ``data()`` in a fixed history: draws the choice whose name holds ``name``."""

    def __init__(self, name: str):
        self.name = name

    def draw(self, strategy: Any, label: str | None = None) -> Any:
        inner = getattr(strategy, "wrapped_strategy", strategy)
        return next(choice for choice in inner.elements if self.name in choice)


def test_an_edit_between_the_hashing_and_the_record_with_the_clock_ahead_is_never_deleted(tmp_path: Path) -> None:
    """A fixed history the machine can draw: audit (the client's clock an hour ahead), the edit armed,
    the second run synced (edited, same size, after its hashing), two reaper passes.

    Before the record read the file system's clock, the edit's stat was recorded as trusted
    (its times looked an hour older than the hashing), matched at the reaper's check, and the
    edit was deleted with the NAS holding the pre-edit bytes: rule 1.
    """
    machine = _machine(MountNas, tmp_path)()
    try:
        machine.first_run_synced(
            retain_cache=False,
            files={"image_001.tif": b"A" * 100, "stack.raw": b"B" * 50},
            pending={"image_001.tif": b"C" * 100, "stack.raw": b"D" * 50},
        )
        second = sorted(model.path.name for model in machine.runs)[-1]
        steps: list[Callable[[], None]] = [
            machine.audit,
            machine.edit_at_the_next_verification,
            lambda: machine.enqueue(_Pick(second)),
            machine.cleanup,
            machine.cleanup,
        ]
        for step in steps:
            step()
            machine.the_three_rules_hold()
        assert machine.edit_armed is False, "the edit was never made: the history tests nothing"
    finally:
        machine.teardown()


def test_a_reused_run_name_right_after_a_rewrite_keeps_the_verified_copy(tmp_path: Path) -> None:
    """A fixed history the machine found: the NAS copy truncated, the reaper's rewrite (which keeps the
    truncated copy under ``previous/<stamp>/``), then the run's name reused within the same second.

    The second round of kept copies took the same stamp, found its file already there, took it as kept
    by a retry of its own round, and the push wrote the new run over the verified copy: rule 2.
    """
    machine = _machine(MountNas, tmp_path)()
    try:
        machine.first_run_synced(retain_cache=False, files={"image_001.tif": b"\x00"}, pending=None)
        run = machine.runs[0]
        steps: list[Callable[[], None]] = [
            lambda: machine.nas_truncate_file(_Pick("image_001.tif")),
            machine.cleanup,
            lambda: machine.reuse_run_name(_Pick(run.path.name), b"\x00"),
            lambda: machine.enqueue(_Pick(run.path.name)),
        ]
        for step in steps:
            step()
            machine.the_three_rules_hold()
        stamps = sorted(p.name for p in (machine._nas_dir(run) / META / "previous").iterdir())
        assert len(stamps) == 2, stamps  # the truncated copy, and the verified one of the old run
    finally:
        machine.teardown()


def test_three_rounds_of_kept_copies_within_two_seconds_never_share_a_stamp(tmp_path: Path) -> None:
    """A fixed history the long run found: a NAS flip mended (its copy kept, a push stamp reserved one
    second ahead), then two edits sent back by the reaper within the same two seconds.

    A new round's stamp was one second past the *times* of the job's earlier kept/reserved events; the
    reserved stamp lay one second ahead of its own event, so the next round took that very stamp, and
    the round after it found its file already under the stamp, took it as kept by a retry, and the
    push wrote the edit over the verified copy without keeping it: rule 2.
    """
    machine = _machine(MountNas, tmp_path)()
    try:
        machine.first_run_synced(retain_cache=False, files={"image_001.tif": b"\x00"}, pending=None)
        machine.the_three_rules_hold()
        steps: list[Callable[[], None]] = [
            machine.edit_at_the_next_verification,
            lambda: machine.nas_flip_byte(_Pick("image_001.tif"), 0),
            machine.audit,
            machine.edit_at_the_next_verification,
            machine.cleanup,
            machine.cleanup,
        ]
        for step in steps:
            step()
            machine.the_three_rules_hold()
        run = machine.runs[0]
        stamps = sorted(p.name for p in (machine._nas_dir(run) / META / "previous").iterdir())
        assert len(stamps) == 3, stamps  # the flipped copy, then each verified version replaced by an edit
    finally:
        machine.teardown()
