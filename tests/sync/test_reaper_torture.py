"""kill -9 torture: the reaper is killed at random moments and restarted; no byte is ever lost.

A child process (a small driver script) runs reaper passes over a lab of 40
runs x 20 files until every eligible run is cleaned; the parent SIGKILLs it
at random moments, checks the invariant while it is dead, and starts it
again. Rounds alternate ``retain_cache`` true and false, with fresh runs,
until at least 30 kills have landed.

The invariant, checked after every kill: every data file of every run (and
a note kept in ``.exlab-wizard/``) either still exists locally with its
bytes, or has a byte-identical copy on the "NAS" listed, with that hash, in
the run's verified manifest (whose digest the job recorded). Files edited,
added or damaged after verification must still exist locally with their
current bytes, and a folder outside the runs (reachable through a symlink in
one run) must be untouched.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from exlab_wizard.cache import CreationWriter
from exlab_wizard.sync.manifest_format import format_manifest, manifest_digest, parse_manifest
from exlab_wizard.sync.queue import JobQueue
from exlab_wizard.sync.reaper import record_verified_stat
from exlab_wizard.sync.states import SyncJobState

S = SyncJobState
EQ = "CONF_01"
RUNS = 40
FILES = 20
MIN_KILLS = 30
KILLS_PER_ROUND = 16  # then the round runs to completion, and the next mode gets its kills
HOUR = dt.timedelta(hours=1)

DRIVER = textwrap.dedent(
    """
    import asyncio, json, os, shutil, sys, time
    from pathlib import Path

    root = Path(sys.argv[1])
    delay = float(sys.argv[2])
    from exlab_wizard.cache import CreationWriter
    from exlab_wizard.config.models import Config
    from exlab_wizard.sync.equipment_log import EquipmentLog
    from exlab_wizard.sync.queue import JobQueue
    from exlab_wizard.sync.reaper import Reaper
    from exlab_wizard.sync.transports import make_transport

    config = Config.model_validate(json.loads((root / "config.json").read_text()))
    real_unlink = os.unlink

    def slow_unlink(*args, **kwargs):  # spread the deletion over time so kills land inside it
        time.sleep(delay)
        return real_unlink(*args, **kwargs)

    os.unlink = slow_unlink
    queue = JobQueue(root / "state" / "queue.db")
    lab, nas = root / "lab" / "CONF_01", root / "nas"

    async def push_metadata(job):
        # As the real transports do: each file to a temporary name, then renamed over the old one,
        # so a kill mid-push never leaves a truncated NAS checksums.sha256 (the invariant reads it).
        run = Path(job.run_path)
        src, dst = run / ".exlab-wizard", nas / run.relative_to(lab) / ".exlab-wizard"
        for folder, _dirs, names in os.walk(src):
            target = dst / Path(folder).relative_to(src)
            target.mkdir(parents=True, exist_ok=True)
            for name in names:
                tmp = target / f".{name}.part"
                shutil.copy2(Path(folder) / name, tmp)
                os.replace(tmp, target / name)
        return True

    async def remote_listing(job):
        return await make_transport(config.equipment_by_id(job.equipment_id)).remote_stats(Path(job.run_path))

    reaper = Reaper(
        queue, config, writer=CreationWriter(), remote_stat=lambda job: True,
        log_for=lambda eq: EquipmentLog(config.equipment_by_id(eq)), push_metadata=push_metadata,
        remote_listing=remote_listing,
    )
    print("ready", flush=True)

    async def main():
        for _ in range(60):
            outcomes = await reaper.run_pass()
            if any(o.action in ("error", "busy") for o in outcomes):
                print("trouble", [(o.action, o.reason) for o in outcomes if o.action in ("error", "busy")], flush=True)
            busy = [j for j in queue.list_jobs() if j.state in ("verified", "cleanup_eligible")]
            if not busy:
                return 0
        return 3

    sys.exit(asyncio.run(main()))
    """
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Round:
    """One lab: 40 runs, their NAS copies, verified jobs; what each file must remain."""

    def __init__(self, root: Path, retain_cache: bool, rng: random.Random):
        self.root = root
        self.retain_cache = retain_cache
        self.lab = root / "lab" / EQ
        self.nas = root / "nas"
        self.outside = root / "outside"
        self.db = root / "state" / "queue.db"
        self.expected: dict[str, dict[str, bytes]] = {}  # run -> rel -> original bytes
        self.local_only: dict[str, dict[str, bytes]] = {}  # run -> rel -> bytes that exist nowhere else
        self.must_clean: set[str] = set()
        self._build(rng)

    def _build(self, rng: random.Random) -> None:
        (self.root / "state").mkdir(parents=True)
        self.nas.mkdir()
        (self.nas / ".exlab-nas").write_text("mounted\n")
        (self.outside / "deep").mkdir(parents=True)
        for i in range(5):
            (self.outside / f"precious_{i}.raw").write_bytes(os.urandom(300))
            (self.outside / "deep" / f"more_{i}.raw").write_bytes(os.urandom(300))
        config = {
            "equipment": [
                {
                    "id": EQ,
                    "local_root": str(self.root / "lab"),
                    "transport": {"type": "mount", "mount_path": str(self.nas)},
                }
            ],
            "nas_cleanup": {
                "enabled": True,
                "min_verify_passes": 2,
                "min_age_hours": 24,
                "retain_cache": self.retain_cache,
            },
            "state_dir": str(self.root / "state"),
        }
        (self.root / "config.json").write_text(json.dumps(config))
        now = dt.datetime.now(dt.UTC)
        written = (now - 72 * HOUR).timestamp()
        writer = CreationWriter()
        queue = JobQueue(self.db)
        try:
            for r in range(RUNS):
                run = self.lab / "PROJ" / "Runs" / f"Run_{r:02d}"
                files = {}
                for f in range(FILES):
                    rel = f"img_{f:02d}.tif" if f < 10 else f"{'ch1' if f < 15 else 'ch2/z'}/slice_{f:02d}.raw"
                    files[rel] = os.urandom(rng.randint(50, 2000))
                for rel, data in files.items():
                    (run / rel).parent.mkdir(parents=True, exist_ok=True)
                    (run / rel).write_bytes(data)
                    os.utime(run / rel, (written, written))
                writer.ensure_minimal(run, local_path=str(run), nas_path=str(self.nas / run.relative_to(self.lab)))
                (run / ".exlab-wizard" / "operator-notes.txt").write_text(f"run {r}: fine\n")
                hashes = {rel: sha(data) for rel, data in files.items()}
                (run / ".exlab-wizard" / "checksums.sha256").write_bytes(format_manifest(hashes))
                shutil.copytree(run, self.nas / run.relative_to(self.lab), symlinks=True)
                verified_at = now - 25 * HOUR
                job, _ = queue.get_or_create(
                    str(run), EQ, str(self.nas / run.relative_to(self.lab)), now=verified_at - 2 * HOUR
                )
                queue.transition(job.id, S.QUEUED, S.RUNNING, now=verified_at - HOUR)
                queue.transition(job.id, S.RUNNING, S.AWAITING_VERIFY, now=verified_at - 0.5 * HOUR)
                queue.transition(
                    job.id,
                    S.AWAITING_VERIFY,
                    S.VERIFIED,
                    now=verified_at,
                    verify_passes=2,
                    verified_at=verified_at,
                    pass_times=(verified_at, verified_at + 6 * HOUR),
                    manifest_digest=manifest_digest(hashes),
                )
                record_verified_stat(
                    queue,
                    job.id,
                    run,
                    hashes,
                    verified_at,
                    hashed_since=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3),
                )
                self.expected[str(run)] = dict(files)
                self.local_only[str(run)] = {}
                # Deliberate trouble after verification, on a few runs.
                if r in (3, 17):  # an edit: new bytes, new mtime
                    new = b"edited after verification " + os.urandom(40)
                    (run / "img_05.tif").write_bytes(new)
                    self.local_only[str(run)]["img_05.tif"] = new
                elif r == 8:  # a file added
                    (run / "ch1" / "late.csv").write_bytes(b"late,export\n")
                    self.local_only[str(run)]["ch1/late.csv"] = b"late,export\n"
                elif r == 25:  # damage: bytes differ, size and mtime the same
                    old = files["img_02.tif"]
                    bad = bytes([old[0] ^ 0xFF]) + old[1:]
                    st = (run / "img_02.tif").stat()
                    (run / "img_02.tif").write_bytes(bad)
                    os.utime(run / "img_02.tif", ns=(st.st_atime_ns, st.st_mtime_ns))
                    self.local_only[str(run)]["img_02.tif"] = bad
                else:
                    self.must_clean.add(str(run))
                if r in (11, 30):  # symlinks into a folder outside every run
                    os.symlink(self.outside, run / "ch1" / "outside_link")
                    os.symlink(self.outside / "precious_0.raw", run / "link_to_file.raw")
        finally:
            queue.close()
        self.outside_before = self._snapshot(self.outside)

    @staticmethod
    def _snapshot(folder: Path) -> dict[str, bytes]:
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    def _jobs(self) -> tuple[dict[str, tuple[str, str]], int]:
        conn = sqlite3.connect(self.db)
        try:
            jobs = {
                row[0]: (row[1], row[2])
                for row in conn.execute("SELECT run_path, state, manifest_digest FROM jobs").fetchall()
            }
            try:
                planned = conn.execute("SELECT COUNT(*) FROM cleanup_progress").fetchone()[0]
            except sqlite3.OperationalError:
                planned = 0
        finally:
            conn.close()
        return jobs, planned

    def losses(self) -> tuple[list[str], int]:
        """The invariant: (violations, number of deletions in progress at this moment)."""
        jobs, planned = self._jobs()
        problems: list[str] = []
        for run_text, files in self.expected.items():
            run = Path(run_text)
            nas_run = self.nas / run.relative_to(self.lab)
            digest = jobs[run_text][1]
            try:
                manifest = parse_manifest((nas_run / ".exlab-wizard" / "checksums.sha256").read_bytes())
            except OSError:
                manifest = {}
            manifest_ok = bool(manifest) and manifest_digest(manifest) == digest
            for rel, data in files.items():
                local = run / rel
                current = self.local_only[run_text].get(rel)
                if current is not None:
                    # Changed after verification: the NAS does not hold these bytes; they must stay.
                    if local.is_symlink() or not local.is_file() or local.read_bytes() != current:
                        problems.append(f"{run.name}/{rel}: changed after verification and lost locally")
                    continue
                if local.is_file() and not local.is_symlink():
                    if local.read_bytes() != data:
                        problems.append(f"{run.name}/{rel}: local bytes differ from the original")
                    continue
                remote = nas_run / rel
                if not (
                    manifest_ok and manifest.get(rel) == sha(data) and remote.is_file() and remote.read_bytes() == data
                ):
                    problems.append(f"{run.name}/{rel}: gone locally without a verified NAS copy")
            for rel, data in self.local_only[run_text].items():
                if rel not in files and (not (run / rel).is_file() or (run / rel).read_bytes() != data):
                    problems.append(f"{run.name}/{rel}: added after verification and lost")
            note = run / ".exlab-wizard" / "operator-notes.txt"
            if not note.is_file():
                pushed = nas_run / ".exlab-wizard" / "operator-notes.txt"
                if not (pushed.is_file() and pushed.read_text() == f"run {int(run.name[4:])}: fine\n"):
                    problems.append(f"{run.name}/.exlab-wizard/operator-notes.txt: gone without a NAS copy")
        if self._snapshot(self.outside) != self.outside_before:
            problems.append("a file outside the runs changed")
        return problems, planned

    def check_finished(self) -> list[str]:
        """After the driver completed: the right runs cleaned, the others untouched and re-queued or failed."""
        jobs, planned = self._jobs()
        problems = [f"{planned} plans left"] if planned else []
        for run_text in self.expected:
            run = Path(run_text)
            state = jobs[run_text][0]
            if run_text in self.must_clean:
                if state != S.CLEANED:
                    problems.append(f"{run.name}: {state}, expected cleaned")
                elif self.retain_cache and any((run / rel).exists() for rel in self.expected[run_text]):
                    problems.append(f"{run.name}: cleaned but data left")
                elif not self.retain_cache and run.exists() and not list(run.rglob("*link*")):
                    problems.append(f"{run.name}: run folder left with retain_cache false")
            else:
                want = S.FAILED if int(run.name[4:]) == 25 else S.QUEUED
                if state != want:
                    problems.append(f"{run.name}: {state}, expected {want}")
        return problems


def _start(root: Path, delay: float) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, str(root.parent / "driver.py"), str(root), str(delay)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )


def test_kill_minus_9_torture(tmp_path: Path):
    (tmp_path / "driver.py").write_text(DRIVER)
    rng = random.Random(int(os.environ.get("EXLAB_TORTURE_SEED", "20240506")))
    started = time.monotonic()
    kills = mid_plan_kills = restarts = rounds = 0
    losses: list[str] = []
    while kills < MIN_KILLS or rounds < 2:
        retain = rounds % 2 == 0
        lab = Round(tmp_path / f"round{rounds}", retain, rng)
        rounds += 1
        round_kills = 0
        while True:
            child = _start(lab.root, delay=0.002)
            restarts += 1
            ready = child.stdout.readline()
            assert ready.strip() == "ready", child.stderr.read()
            time.sleep(rng.uniform(0.0, 0.35))
            if round_kills < KILLS_PER_ROUND and child.poll() is None:
                os.kill(child.pid, signal.SIGKILL)
                child.wait()
                kills += 1
                round_kills += 1
                found, planned = lab.losses()
                mid_plan_kills += planned > 0
                losses.extend(f"after kill {kills}: {p}" for p in found)
                continue
            out, err = child.communicate(timeout=60)
            assert child.returncode == 0, f"driver exited {child.returncode}: {out}\n{err}"
            assert "trouble" not in out, out
            found, _ = lab.losses()
            losses.extend(f"round {rounds} end: {p}" for p in found)
            losses.extend(f"round {rounds} end: {p}" for p in lab.check_finished())
            break
    elapsed = time.monotonic() - started
    print(
        f"\nreaper torture: {kills} kills ({mid_plan_kills} during a planned deletion), "
        f"{restarts} starts, {rounds} rounds of {RUNS} runs x {FILES} files, "
        f"{len(losses)} losses, {elapsed:.1f} s"
    )
    assert kills >= MIN_KILLS
    assert mid_plan_kills >= 5, "too few kills landed inside a deletion to mean anything"
    assert losses == []
