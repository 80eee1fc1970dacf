"""The torture harness: the real ``exlab-sync serve`` over a generated lab, faults injected at random.

One *round* builds a fresh lab (local runs, a NAS on a small loop-mounted
ext4, foreign data already on that NAS), starts ``exlab-sync serve`` as a
subprocess with cleanup enabled (one verify pass, no minimum age, short
scan and audit intervals), enqueues the runs through the API and, while
they sync, injects a seeded random schedule of faults: SIGKILL of the
service aimed at a phase (transfer, verification, metadata push, audit,
deletion: read from the queue database, the durable record), the sshd
stopped and restarted (rsync_ssh and rclone rounds), a NAS byte flipped between transfer and
verification, a NAS file or run folder deleted after verification, a local
byte flipped after verification (size and mtime kept, the service frozen
meanwhile so that it sees the flip whole, as bit rot is), a local file edited
after verification, the NAS run folder made immutable (``chattr +i``, which
stops root too), the NAS full, the mount marker gone, another process
holding a run's ``creation.json.lock`` past the writer's timeout.

Transports: ``mount`` (the NAS folder itself), ``rsync_ssh`` and ``rclone``
(an sftp remote), both of these to a loopback sshd (tests/fixtures/sshd.py)
whose unprivileged user writes into the NAS folder; the NAS faults act on that
folder alike. An rclone round hashes on the server (``sha256sum`` through ssh)
or by downloading, drawn from the round's seed.

After a recovery period without faults the round checks the invariant (see
:func:`check_round`) and its findings are summed in a :class:`Tally`, which
:func:`report` writes as ``docs/reliability.md``.

Everything is reproducible from ``(seed, round index)`` up to the timing of
the service itself; every fault records whether it landed where it aimed.
Needs root (loop mounts, chattr, the sshd fixture's users).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import re
import selectors
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

import exlab_wizard
from exlab_wizard.sync.manifest_format import parse_manifest
from exlab_wizard.sync.transports.mount import is_temp_name
from tests.fixtures.sshd import RW_USER, SshEnv, SshServer, write_rclone_sftp_config
from tests.helpers import client_tls, processes, tool_processes
from tests.lab import mark_nas, write_creation

TRANSPORTS = ("mount", "rsync_ssh", "rclone")
#: transports reaching the NAS through the round's sshd (as its unprivileged user)
SSH_TRANSPORTS = ("rsync_ssh", "rclone")
EQ = "CONFOCAL_01"
PROJECT = "PROJ-1"
MARKER = ".exlab-nas"
META = ".exlab-wizard"
EXE = str(Path(sys.executable).with_name("exlab-sync"))
SRC = str(Path(exlab_wizard.__file__).resolve().parents[1])

KILL_PHASES = ("transfer", "verification", "metadata_push", "audit", "deletion")
ENDED = ("cleaned", "failed", "verified", "cleanup_eligible")
CREATION_LOCK_TIMEOUT_S = 10.0  # CreationWriter's default (cache/creation.py)
_RSYNC_TEMP = re.compile(r"^\..+\.[A-Za-z0-9]{6}$")
#: fileio.atomic_write_bytes's temporary name (creation.json, checksums.sha256 under .exlab-wizard/)
_ATOMIC_TEMP = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


# --------------------------------------------------------------------------- records


@dataclass
class Fault:
    kind: str
    round: int
    aim: str = ""  # the phase or state aimed at
    hit: str = ""  # what it hit (phase seen at the kill, state at the injection)
    landed: bool = True  # False: the window was missed, nothing was done
    detail: str = ""


@dataclass
class Tally:
    rounds: int = 0
    rounds_by_transport: Counter = field(default_factory=Counter)
    faults: list[Fault] = field(default_factory=list)
    restarts: int = 0  # serve started again after a kill
    recovered_rounds: int = 0  # rounds whose jobs all settled in the recovery period
    jobs: Counter = field(default_factory=Counter)  # final state (failed:<kind>)
    files_checked: int = 0
    losses: list[str] = field(default_factory=list)
    nas_damage: list[str] = field(default_factory=list)
    foreign_overwritten: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    nas_flips_repaired: int = 0
    nas_flips_detected: int = 0
    #: .exlab-wizard/.<name>.<hex>.tmp left by a SIGKILL inside an atomic metadata write (see the report)
    metadata_temps: list[str] = field(default_factory=list)
    #: transfer temps in the NAS folder of a FAILED job (its next push removes them)
    failed_temps: list[str] = field(default_factory=list)
    #: NAS files off their manifest in a run the harness damaged whose job then FAILED (its local copy is checked)
    nas_failed: list[str] = field(default_factory=list)
    nas_flips_undetected: int = 0
    #: findings on a file whose NAS copy the harness flipped after its verification (see the report)
    late_flip: list[str] = field(default_factory=list)
    #: tools (rsync, rclone, ssh, the remote programs) still running seconds after their service was killed
    outlived: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def problems(self) -> list[str]:
        return [*self.losses, *self.nas_damage, *self.foreign_overwritten, *self.leftovers, *self.stuck, *self.outlived]


# --------------------------------------------------------------------------- the NAS and the service


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


#: rounds played at once take their loop devices one after the other
_LOOP_SETUP = threading.Lock()


class LoopNas:
    """A small ext4 (no reserved blocks) loop-mounted at ``mnt``; unmounted by :meth:`close`."""

    def __init__(self, root: Path, mib: int):
        self.image = root / "nas.img"
        self.mnt = root / "nas"
        self.mnt.mkdir()
        with open(self.image, "wb") as f:
            f.truncate(mib * 1024 * 1024)
        _sh("mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", str(self.image))
        with _LOOP_SETUP:
            _sh("mount", "-o", "loop", str(self.image), str(self.mnt))
        shutil.rmtree(self.mnt / "lost+found", ignore_errors=True)

    def close(self) -> None:
        subprocess.run(["chattr", "-R", "-i", str(self.mnt)], capture_output=True)
        for _ in range(20):
            if subprocess.run(["umount", str(self.mnt)], capture_output=True).returncode == 0:
                break
            time.sleep(0.25)
        else:
            subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)
        self.image.unlink(missing_ok=True)


class Serve:
    """``exlab-sync serve`` as a subprocess: its address, its token, stopped by PID."""

    def __init__(self, config: Path, state: Path):
        env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.log = open(state.parent / "serve.log", "a")  # noqa: SIM115 - closed in stop/kill
        self.proc = subprocess.Popen(
            [EXE, "serve", "--config", str(config), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )
        self.url = self._wait_for_url(60)
        self.token = (state / "api-token").read_text().strip()

    def _wait_for_url(self, timeout: float) -> str:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sel.select(timeout=0.2):
                line = self.proc.stdout.readline()
                if "listening on " in line:
                    return line.split("listening on ", 1)[1].split()[0]
                if not line and self.proc.poll() is not None:
                    break
        self.kill()
        raise RuntimeError(f"serve did not start (exit {self.proc.returncode})")

    def post(self, path: str, body: dict) -> httpx.Response:
        return httpx.post(
            self.url + path,
            json=body,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=30,
            verify=client_tls(),
        )

    def jobs(self) -> list[dict]:
        return httpx.get(self.url + "/api/jobs", params={"limit": 1000}, timeout=30, verify=client_tls()).json()["jobs"]

    def kill(self) -> None:
        """SIGKILL of the service process alone, as a crash; its tools must die with it (checked after each kill)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
                return -9
        self.log.close()
        return self.proc.returncode


# --------------------------------------------------------------------------- the queue, read as the durable record


def read_jobs(db: Path) -> list[dict]:
    """Every job row with its cleanup plan (if any), read-only; [] while the database is busy."""
    if not db.exists():
        return []
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.5)
        try:
            con.row_factory = sqlite3.Row
            rows = [dict(r) for r in con.execute("SELECT * FROM jobs")]
            plans = {r[0]: r[1] for r in con.execute("SELECT job_id, data_deleted_at FROM cleanup_progress")}
        finally:
            con.close()
    except sqlite3.Error:
        return []
    for row in rows:
        row["plan"] = row["id"] in plans
    return rows


def _log_loss_history(rnd, run, frel: str, good: str, nas_dir: Path, job: dict | None) -> None:
    """What the next look at a loss needs: where the wanted bytes still are, and the job's history."""
    kept = sorted(
        str(path.relative_to(nas_dir))
        for path in (nas_dir / ".exlab-wizard" / "previous").glob(f"*/{frel}")
        if _file_sha(path) == good
    )
    rnd.log(f"    wanted bytes kept on the NAS under: {kept or 'nothing'}")
    if job is None:
        return
    for event in job_events(rnd.db, job["id"]):
        rnd.log(
            f"    event {event['id']} {event['kind']} {event.get('from_state') or ''}->{event.get('to_state') or ''}"
            f" {(event.get('detail') or '')[:200]}"
        )


def job_events(db: Path, job_id: str) -> list[dict]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        con.row_factory = sqlite3.Row
        return [dict(r) for r in con.execute("SELECT * FROM events WHERE job_id = ? ORDER BY id", (job_id,))]
    finally:
        con.close()


def phase_of(row: dict) -> str | None:
    """The work a job is in, as the queue records it (what a SIGKILL now would interrupt)."""
    state = row["state"]
    if state == "running":
        return "transfer"
    if state == "awaiting_verify":
        return "verification"
    if state in ("verified", "cleanup_eligible"):
        if row["plan"]:
            return "deletion"
        if row.get("metadata_push_due_at"):
            return "metadata_push"
        return "audit"
    return None


# --------------------------------------------------------------------------- the lab


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Run:
    path: Path
    rel: str  # relative to the equipment folder (and to the NAS root)
    files: dict[str, str] = field(default_factory=dict)  # rel -> sha256 the lab last wrote
    damaged: dict[str, str] = field(default_factory=dict)  # rel -> sha256 of the good bytes (local flipped)
    enqueued: bool = False
    touched: bool = False  # a damage fault hit it already (one per run: two would destroy both copies)


class Round:
    """One round: a lab, its NAS, the service, a fault schedule and the invariant check."""

    def __init__(
        self,
        index: int,
        seed: int,
        transport: str,
        kills: int,
        faults: list[str],
        runs: int,
        workdir: Path,
        ssh_env: SshEnv | None,
        log=print,
    ):
        self.index, self.transport, self.kills, self.fault_kinds = index, transport, kills, faults
        self.rng = random.Random(f"{seed}:{index}")
        self.n_runs = runs
        self.root = Path(tempfile.mkdtemp(prefix=f"torture-{index}-", dir=workdir))
        self.root.chmod(0o755)
        self.ssh_env = ssh_env
        self.log = log
        self.faults: list[Fault] = []
        self.restarts = 0
        self.outlived: list[str] = []
        self.runs: list[Run] = []
        self.foreign: dict[Path, str] = {}
        #: (run rel, file rel, job id, last event id before the flip): NAS bytes the harness corrupted
        self.flipped_nas: list[tuple[str, str, str, int]] = []
        self.serve: Serve | None = None
        self.sshd: SshServer | None = None
        self.remote_sha256 = False  # rclone rounds: the NAS hashes with sha256sum over ssh
        self.serve_lock = threading.Lock()
        self.background: list[threading.Thread] = []

    # ---- setup

    @property
    def db(self) -> Path:
        return self.state / "queue.db"

    def setup(self) -> None:
        self.local_root = self.root / "lab"
        self.state = self.root / "state"
        self.nasfs = LoopNas(self.root, 192)
        if self.transport == "mount":
            self.nas_root = mark_nas(self.nasfs.mnt / EQ)
            transport = {"type": "mount", "mount_path": str(self.nas_root)}
        else:
            self.nas_root = self.nasfs.mnt
            shutil.chown(self.nas_root, RW_USER, RW_USER)
            self.nas_root.chmod(0o755)
            self.sshd = SshServer(self.ssh_env, self.root / "sshd").start()
            transport = {
                "type": "rsync_ssh",
                "ssh_target": f"{RW_USER}@127.0.0.1",
                "ssh_key_path": str(self.ssh_env.client_key),
                "ssh_port": self.sshd.port,
                "remote_path": str(self.nas_root),
                "ssh_known_hosts": str(self.sshd.known_hosts),
            }
            if self.transport == "rclone":
                self.remote_sha256 = self.rng.random() < 0.5
                # in the round's folder: a tool left running names it on its command line (see _outliving)
                conf = write_rclone_sftp_config(self.root / "rclone.conf", self.sshd, remote_sha256=self.remote_sha256)
                transport = {
                    "type": "rclone",
                    "rclone_remote": "labsftp",
                    "rclone_remote_path": str(self.nas_root),
                    "rclone_config": str(conf),
                }
                hashing = "on the server (sha256sum)" if self.remote_sha256 else "by download"
                self.log(f"  round {self.index} rclone sftp, NAS hashed {hashing}")
        transport["bandwidth"] = {"upload_mbps": 48}  # ~6 MB/s: transfers last long enough to be hit
        config = {
            "equipment": [{"id": EQ, "local_root": str(self.local_root), "transport": transport}],
            "sync": {"backoff_s": [0.2, 0.5, 1, 1, 2, 2, 2, 2, 2, 2], "scan_interval_s": 0.5, "audit_interval_s": 0.5},
            "nas_cleanup": {"enabled": True, "min_verify_passes": 1, "min_age_hours": 0, "retain_cache": True},
            "state_dir": str(self.state),
        }
        self.config = self.root / "config.yaml"
        self.config.write_text(json.dumps(config))
        self._place_foreign()

    def _place_foreign(self) -> None:
        """Data already on the NAS that is no run of this lab: it must never be touched."""
        places = [f"{PROJECT}/Runs/Run_foreign_{k}/{name}" for k in range(2) for name in ("a.dat", "sub/b.dat")]
        places += [f"{PROJECT}/notes_from_another_lab.txt", f"{PROJECT}/Runs/Run_0000/../README_nas.txt"]
        for rel in places:
            target = Path(os.path.normpath(self.nas_root / rel))
            target.parent.mkdir(parents=True, exist_ok=True)
            data = self.rng.randbytes(self.rng.randint(100, 5000))
            target.write_bytes(data)
            self.foreign[target] = sha(data)
        if self.transport in SSH_TRANSPORTS:
            for folder, dirs, files in os.walk(self.nas_root):
                for name in [*dirs, *files]:
                    shutil.chown(os.path.join(folder, name), RW_USER, RW_USER)

    def _make_run(self, i: int) -> Run:
        rel = f"{PROJECT}/Runs/Run_{i:04d}"
        path = self.local_root / EQ / rel
        path.mkdir(parents=True)
        write_creation(path, overrides=[])
        run = Run(path, rel)
        big = self.rng.randbytes(self.rng.randint(1, 3) * 1024 * 1024 + self.rng.randint(0, 999))
        payload = {"stack.raw": big}
        for k in range(self.rng.randint(10, 40)):
            payload[f"tiles/t{k:03d}.tif"] = self.rng.randbytes(self.rng.randint(1, 30000))
        for frel, data in payload.items():
            target = path / frel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            run.files[frel] = sha(data)
        return run

    # ---- the service

    def start_serve(self) -> None:
        with self.serve_lock:
            self.serve = Serve(self.config, self.state)

    def enqueue(self, run: Run) -> None:
        for _ in range(50):
            try:
                reply = self.serve.post("/api/enqueue", {"run_path": str(run.path)})
                if reply.status_code < 300:
                    run.enqueued = True
                    return
                raise RuntimeError(f"enqueue {run.rel}: {reply.status_code} {reply.text}")
            except httpx.HTTPError:
                time.sleep(0.2)  # the service is being restarted
        raise RuntimeError(f"enqueue {run.rel}: no service")

    def feed(self) -> None:
        """Keep work flowing: a new run enqueued while fewer than two jobs are under way.

        At most ``runs`` + kills + other faults runs per round.
        """
        active = [r for r in read_jobs(self.db) if r["state"] not in ("cleaned", "failed")]
        if len(active) < 2 and len(self.runs) < self.n_runs + self.kills + len(self.fault_kinds):
            run = self._make_run(len(self.runs))
            self.runs.append(run)
            self.enqueue(run)

    def wait_for(self, pred, timeout: float) -> dict | None:
        """The first job row for which ``pred(row)`` holds, polled from the queue database."""
        deadline = time.monotonic() + timeout
        turn = 0
        while time.monotonic() < deadline:
            for row in read_jobs(self.db):
                if pred(row):
                    return row
            turn += 1
            if turn % 25 == 0:
                self.feed()
            time.sleep(0.02)
        return None

    def run_of(self, row: dict) -> Run:
        return next(r for r in self.runs if str(r.path) == row["run_path"])

    # ---- the faults

    def fault_kill(self, aim: str) -> Fault:
        row = self.wait_for(lambda r: phase_of(r) == aim, 6.0)
        with self.serve_lock:
            rows = read_jobs(self.db) if row is None else [row]
            self.serve.kill()
        self.outlived += [f"round {self.index}: outlived the killed service: {cmd}" for cmd in _outliving(self.root)]
        seen = [p for p in (phase_of(r) for r in rows) if p]
        hit = phase_of(row) if row else (seen[0] if seen else "idle")
        time.sleep(self.rng.uniform(0, 0.5))
        self.start_serve()
        self.restarts += 1
        return Fault("sigkill", self.index, aim, hit, landed=row is not None)

    def fault_sshd(self) -> Fault:
        if self.sshd is None:
            return self.fault_marker_gone()
        busy = self.wait_for(lambda r: r["state"] in ("running", "awaiting_verify", "verified"), 5.0)
        self.sshd.stop()
        time.sleep(self.rng.uniform(2, 4))
        self.sshd.start()
        return Fault("sshd_restart", self.index, "busy", busy["state"] if busy else "idle")

    def fault_marker_gone(self) -> Fault:
        if self.transport != "mount":
            return self.fault_sshd()
        busy = self.wait_for(lambda r: r["state"] == "running", 5.0)
        marker = self.nas_root / MARKER
        marker.unlink()
        time.sleep(self.rng.uniform(2, 4))
        marker.write_text("mounted\n")
        return Fault("share_unmounted", self.index, "running", busy["state"] if busy else "idle")

    def fault_nas_flip(self) -> Fault:
        row = self.wait_for(lambda r: r["state"] == "awaiting_verify" and not self.run_of(r).touched, 10.0)
        if row is None:
            return Fault("nas_flip_before_verify", self.index, "awaiting_verify", "not seen", landed=False)
        run = self.run_of(row)
        run.touched = True
        since = self._last_event(row["id"])
        frel = "stack.raw"
        target = self.nas_root / run.rel / frel
        try:
            _flip(target, self.rng)
        except OSError as exc:
            return Fault("nas_flip_before_verify", self.index, "awaiting_verify", "no file", False, str(exc))
        after = next((r["state"] for r in read_jobs(self.db) if r["id"] == row["id"]), "?")
        self.flipped_nas.append((run.rel, frel, row["id"], since))
        return Fault("nas_flip_before_verify", self.index, "awaiting_verify", after, detail=f"{run.rel}/{frel}")

    def _verified(self, timeout: float = 15.0) -> dict | None:
        """A VERIFIED job with no cleanup plan yet, on a run no damage fault touched before."""
        row = self.wait_for(
            lambda r: r["state"] == "verified" and not r["plan"] and not self.run_of(r).touched, timeout
        )
        if row is not None:
            self.run_of(row).touched = True
        return row

    def _last_event(self, job_id: str) -> int:
        events = job_events(self.db, job_id)
        return events[-1]["id"] if events else 0

    def fault_nas_delete(self) -> Fault:
        row = self._verified()
        if row is None:
            return Fault("nas_delete_after_verify", self.index, "verified", "not seen", landed=False)
        run = self.run_of(row)
        whole = self.rng.random() < 0.5
        target = self.nas_root / run.rel
        if whole:
            shutil.rmtree(target, ignore_errors=True)
        else:
            target = target / self.rng.choice(sorted(run.files))
            target.unlink(missing_ok=True)
        state = next((r["state"] for r in read_jobs(self.db) if r["id"] == row["id"]), "?")
        kind = "nas_run_folder_deleted" if whole else "nas_file_deleted"
        return Fault(kind, self.index, "verified", state, detail=str(target.relative_to(self.nas_root)))

    def fault_local_flip(self) -> Fault:
        row = self._verified()
        if row is None:
            return Fault("local_flip_after_verify", self.index, "verified", "not seen", landed=False)
        run = self.run_of(row)
        frel = self.rng.choice(sorted(run.files))
        target = run.path / frel
        try:
            with self.service_stopped():
                st = os.stat(target)
                _flip(target, self.rng)
                os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
        except OSError as exc:
            return Fault("local_flip_after_verify", self.index, "verified", "gone", False, str(exc))
        run.damaged[frel] = run.files[frel]
        state = next((r["state"] for r in read_jobs(self.db) if r["id"] == row["id"]), "?")
        return Fault("local_flip_after_verify", self.index, "verified", state, detail=f"{run.rel}/{frel}")

    @contextlib.contextmanager
    def service_stopped(self):
        """The service frozen (SIGSTOP) meanwhile: it sees the local flip whole, as bit rot is.

        The flip is a write (stamped with the time) and then the old mtime put back. Seen in
        between, it is an edit, rightly re-synced: the round could count its bytes as lost.
        The service catching that half-done rewrite in its verified stats is
        tests/client/test_local_damage.py's (``rot_while_the_stats_are_recorded``).
        """
        with self.serve_lock:
            proc = self.serve.proc if self.serve is not None and self.serve.proc.poll() is None else None
            if proc is not None:
                os.kill(proc.pid, signal.SIGSTOP)
            try:
                yield
            finally:
                if proc is not None:
                    os.kill(proc.pid, signal.SIGCONT)

    def fault_local_edit(self) -> Fault:
        row = self._verified()
        if row is None:
            return Fault("local_edit_after_verify", self.index, "verified", "not seen", landed=False)
        run = self.run_of(row)
        frel = self.rng.choice(sorted(f for f in run.files if f not in run.damaged))
        target = run.path / frel
        try:
            fd = os.open(target, os.O_WRONLY | os.O_APPEND)  # never re-creates a deleted file
        except OSError as exc:
            return Fault("local_edit_after_verify", self.index, "verified", "gone", False, str(exc))
        with os.fdopen(fd, "ab") as f:
            f.write(b"edited by the lab\n")
        run.files[frel] = sha(target.read_bytes())
        state = next((r["state"] for r in read_jobs(self.db) if r["id"] == row["id"]), "?")
        return Fault("local_edit_after_verify", self.index, "verified", state, detail=f"{run.rel}/{frel}")

    def fault_readonly(self) -> Fault:
        row = self.wait_for(lambda r: r["state"] in ("running", "queued"), 8.0)
        rel = self.run_of(row).rel if row else PROJECT
        target = self.nas_root / rel
        while not target.exists():
            target = target.parent
        _sh("chattr", "+i", str(target))
        try:
            time.sleep(self.rng.uniform(2, 4))
        finally:
            _sh("chattr", "-i", str(target))
        return Fault(
            "nas_read_only",
            self.index,
            "running",
            row["state"] if row else "idle",
            detail=str(target.relative_to(self.nasfs.mnt)),
        )

    def fault_nas_full(self) -> Fault:
        row = self.wait_for(lambda r: r["state"] == "running", 8.0)
        filler = self.nasfs.mnt / ".harness-filler"
        with open(filler, "wb") as f, contextlib.suppress(OSError):
            block = b"\0" * (1 << 20)
            while True:
                f.write(block)
                f.flush()
        try:
            time.sleep(self.rng.uniform(2, 4))
        finally:
            filler.unlink()
        return Fault("nas_full", self.index, "running", row["state"] if row else "idle")

    def fault_lock(self) -> Fault:
        """Hold a run's creation.json.lock (flock, as FileLock) past the writer's timeout, in the background."""
        row = self.wait_for(lambda r: r["state"] in ("running", "awaiting_verify"), 8.0)
        run = self.run_of(row) if row else self.rng.choice(self.runs)
        lock = run.path / META / "creation.json.lock"
        hold = CREATION_LOCK_TIMEOUT_S + 2

        def holder() -> None:
            with open(lock, "a+") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                time.sleep(hold)

        thread = threading.Thread(target=holder, daemon=True)
        thread.start()
        self.background.append(thread)
        return Fault(
            "creation_lock_held", self.index, "running", row["state"] if row else "idle", detail=f"{run.rel} {hold:g} s"
        )

    FAULTS = {
        "sshd_restart": fault_sshd,
        "share_unmounted": fault_marker_gone,
        "nas_flip": fault_nas_flip,
        "nas_delete": fault_nas_delete,
        "local_flip": fault_local_flip,
        "local_edit": fault_local_edit,
        "read_only": fault_readonly,
        "nas_full": fault_nas_full,
        "creation_lock": fault_lock,
    }

    # ---- the round

    def play(self, recovery_s: float = 90.0) -> dict:
        try:
            self.setup()
            self.start_serve()
            schedule = [("kill", KILL_PHASES[(self.index + k) % len(KILL_PHASES)]) for k in range(self.kills)]
            schedule += [("fault", kind) for kind in self.fault_kinds]
            self.rng.shuffle(schedule)
            self.feed()
            for kind, arg in schedule:
                self.feed()
                fault = self.fault_kill(arg) if kind == "kill" else self.FAULTS[arg](self)
                self.faults.append(fault)
                self.log(
                    f"  round {self.index} {fault.kind:24} aim={fault.aim:14} hit={fault.hit:16} "
                    f"{'landed' if fault.landed else 'missed'} {fault.detail}"
                )
            for thread in self.background:
                thread.join()
            settled = self.recover(recovery_s)
            result = self.check(settled)
        finally:
            self.close()
        return result

    def recover(self, timeout: float) -> bool:
        """No faults: wait until every job ended (cleaned or failed), or verified and quiet."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = read_jobs(self.db)
            if rows and len(rows) == len(self.runs) and all(r["state"] in ("cleaned", "failed") for r in rows):
                return True
            time.sleep(0.2)
        return False

    def check(self, settled: bool) -> dict:
        jobs = self.serve.jobs()
        self.serve.stop()
        self.serve = None
        return check_round(self, jobs, settled)

    def close(self) -> None:
        if self.serve is not None:
            self.serve.kill()
        for proc in _orphans(self.root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc, signal.SIGKILL)
        if self.sshd is not None:
            self.sshd.stop()
        self.nasfs.close() if hasattr(self, "nasfs") else None
        shutil.rmtree(self.root, ignore_errors=True)


def _flip(path: Path, rng: random.Random) -> None:
    """Invert one byte in place (size kept)."""
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise OSError(f"{path}: empty")
        offset = rng.randrange(size)
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())


#: Seconds a tool's remote end may take to see its connection close.
OUTLIVE_GRACE_S = 3.0


#: Seconds more for a tool the kernel has already sent SIGKILL (its parent-death signal): it runs no
#: more of its own code, but a read or write it is blocked in (state D, a loaded disk) ends first.
DYING_GRACE_S = 10.0


def _killed_pending(pid: int) -> bool:
    """Has ``pid`` a SIGKILL pending (sent, not yet acted on: it is dying)?"""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True  # gone meanwhile
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("SigPnd", "ShdPnd") and int(value.strip(), 16) & (1 << (signal.SIGKILL - 1)):
            return True
    return False


def _outliving(root: Path) -> list[str]:
    """The tools of a service just killed that are still running after the grace period.

    A tool with a SIGKILL pending (the kernel's parent-death signal, sent at the kill) is dying: it
    gets :data:`DYING_GRACE_S` more to leave a blocked read or write. Each one named by the start
    and the end of its command line, its state and whether the SIGKILL reached it.
    """
    deadline = time.monotonic() + OUTLIVE_GRACE_S
    left = tool_processes(str(root))
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = tool_processes(str(root))
    dying = deadline + DYING_GRACE_S
    while left and all(_killed_pending(pid) for pid in left) and time.monotonic() < dying:
        time.sleep(0.1)
        left = tool_processes(str(root))
    named = []
    for pid, cmd in left.items():
        shown = cmd if len(cmd) <= 300 else f"{cmd[:150]} ... {cmd[-150:]}"
        named.append(f"{shown} (pid {pid}, {_state(pid)}, SIGKILL pending: {_killed_pending(pid)})")
    return sorted(named)


def _state(pid: int) -> str:
    try:
        return "state " + Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return "gone"


def _orphans(root: Path) -> list[int]:
    """Processes (rsync, ssh left by a killed service) whose command line names this round's folder."""
    return [pid for pid, cmdline, _state in processes() if str(root).encode() in cmdline]


# --------------------------------------------------------------------------- the invariant


def is_leftover(name: str) -> bool:
    """A transfer's temporary file: mount's, rsync's partials, rclone's."""
    return (
        is_temp_name(name)
        or name == ".rsync-partial"
        or bool(_RSYNC_TEMP.match(name))
        or name.endswith(".partial")
        or ".exlab-tmp-" in name
        or name.endswith(".tmp")
    )


def _nas_manifest(run_dir: Path) -> dict[str, str]:
    path = run_dir / META / "checksums.sha256"
    try:
        return parse_manifest(path.read_bytes())
    except (OSError, ValueError):
        return {}


def _file_sha(path: Path) -> str | None:
    try:
        return sha(path.read_bytes()) if path.is_file() and not path.is_symlink() else None
    except OSError:
        return None


def check_round(rnd: Round, jobs: list[dict], settled: bool) -> dict:
    """The invariant, after the recovery period; returns the round's findings."""
    out: dict = {
        "losses": [],
        "nas_damage": [],
        "foreign": [],
        "leftovers": [],
        "stuck": [],
        "jobs": Counter(),
        "files": 0,
        "flips_repaired": 0,
        "late_flip": [],
        "metadata_temps": [],
        "failed_temps": [],
        "nas_failed": [],
        "flips_detected": 0,
        "flips_undetected": 0,
    }
    by_path = {j["run_path"]: j for j in jobs}
    undetected = set()  # flips the engine never reacted to: they landed after the bytes were verified
    for run_rel, frel, job_id, since in rnd.flipped_nas:
        later = [e for e in job_events(rnd.db, job_id) if e["id"] > since]
        # Detected in time: before the reaper planned the deletion. An audit that finds the flip
        # after the local copy was deleted (a deletion cut by a kill, the audit first after the
        # restart) comes too late: the verification missed it, as for a flip never detected.
        planned = next((e["id"] for e in later if e["kind"] == "cleanup_planned"), None)
        detected = any(e["to_state"] in ("queued", "failed") and (planned is None or e["id"] < planned) for e in later)
        out["flips_detected" if detected else "flips_undetected"] += 1
        if not detected:
            undetected.add((run_rel, frel))
    for run in rnd.runs:
        job = by_path.get(str(run.path))
        state = "missing" if job is None else job["state"]
        if job is not None and state == "failed":
            out["jobs"][f"failed:{job.get('error_kind') or 'no reason'}"] += 1
            rnd.log(
                f"  round {rnd.index} {run.rel} failed {job.get('error_kind')}: {(job.get('last_error') or '')[:300]}"
            )
            if not job.get("error_kind") and not job.get("last_error"):
                out["stuck"].append(f"round {rnd.index} {run.rel}: failed without a reason")
        else:
            out["jobs"][state] += 1
        if state not in ("cleaned", "failed", "verified", "cleanup_eligible"):
            out["stuck"].append(f"round {rnd.index} {run.rel}: {state} after the recovery period")
        nas_dir = rnd.nas_root / run.rel
        manifest = _nas_manifest(nas_dir)
        for frel, want in run.files.items():
            out["files"] += 1
            good = run.damaged.get(frel, want)
            local = _file_sha(run.path / frel)
            nas = _file_sha(nas_dir / frel)
            if local == good and frel not in run.damaged:
                continue
            if nas == good and manifest.get(frel) == good:
                continue
            late = (run.rel, frel) in undetected
            out["late_flip" if late else "losses"].append(
                f"round {rnd.index} {run.rel}/{frel}: local {local and local[:8]}, "
                f"NAS {nas and nas[:8]}, manifest {manifest.get(frel, '-')[:8]}, want {good[:8]} "
                f"(job {state})"
            )
            if not late:
                _log_loss_history(rnd, run, frel, good, nas_dir, job)
        for frel, want in manifest.items():  # every verified NAS file is the manifest's bytes
            got = _file_sha(nas_dir / frel)
            late = (run.rel, frel) in undetected
            bucket = "late_flip" if late else "nas_failed" if state == "failed" and run.touched else "nas_damage"
            if got != want:
                out[bucket].append(
                    f"round {rnd.index} {run.rel}/{frel}: NAS {got and got[:8]} != manifest {want[:8]} (job {state})"
                )
        for flipped_run, frel, _job, _since in rnd.flipped_nas:
            if flipped_run == run.rel and _file_sha(nas_dir / frel) == run.files.get(frel):
                out["flips_repaired"] += 1
    for path, want in rnd.foreign.items():
        if _file_sha(path) != want:
            out["foreign"].append(f"round {rnd.index} foreign {path.relative_to(rnd.nas_root)} changed or gone")
    # a FAILED job's transfer temps (say the folder went read-only mid-copy) are removed by its next push
    failed_dirs = [rnd.nas_root / r.rel for r in rnd.runs if by_path.get(str(r.path), {}).get("state") == "failed"]
    for tree in (rnd.nas_root, rnd.local_root):
        for folder, dirs, files in os.walk(tree):
            for name in [*dirs, *files]:
                if _ATOMIC_TEMP.match(name) and Path(folder).name == META:
                    out["metadata_temps"].append(f"round {rnd.index} {Path(folder, name).relative_to(rnd.root)}")
                elif is_leftover(name) and any(Path(folder, name).is_relative_to(d) for d in failed_dirs):
                    out["failed_temps"].append(f"round {rnd.index} {Path(folder, name).relative_to(rnd.root)}")
                elif is_leftover(name):
                    out["leftovers"].append(f"round {rnd.index} {Path(folder, name).relative_to(rnd.root)}")
    out["settled"] = settled
    return out


# --------------------------------------------------------------------------- many rounds, the report

OTHER_FAULTS = (
    "sshd_restart",
    "share_unmounted",
    "nas_flip",
    "nas_delete",
    "local_flip",
    "local_edit",
    "read_only",
    "nas_full",
    "creation_lock",
)


def plan_rounds(rounds: int, kills: int, transports: tuple[str, ...]) -> list[tuple[str, int, list[str]]]:
    """Transports alternate; kills spread evenly; every other fault kind once per round.

    The sshd restart only on rsync_ssh and rclone rounds, the marker removal only on mount rounds.
    """
    unknown = sorted(set(transports) - set(TRANSPORTS))
    if unknown or not transports:
        raise ValueError(f"transports: {', '.join(unknown) or 'none'} (known: {', '.join(TRANSPORTS)})")
    plans = []
    for i in range(rounds):
        transport = transports[i % len(transports)]
        k = kills // rounds + (1 if i < kills % rounds else 0)
        faults = [
            f
            for f in OTHER_FAULTS
            if not (f == "sshd_restart" and transport == "mount")
            and not (f == "share_unmounted" and transport != "mount")
        ]
        plans.append((transport, k, faults))
    return plans


def torture(
    *,
    rounds: int,
    kills: int,
    seed: int,
    runs: int = 4,
    transports: tuple[str, ...] = ("mount", "rsync_ssh"),
    faults: list[str] | None = None,
    workdir: Path | None = None,
    recovery_s: float = 90.0,
    parallel: int = 1,
    log=print,
) -> Tally:
    """Play ``rounds`` rounds with ``kills`` SIGKILLs in all; ``faults``: the other faults per round (default: all).

    ``parallel``: rounds played at once, each with its own lab, NAS, service and sshd (they
    share nothing but the ssh keys); the tally is summed in round order all the same.
    """
    tally = Tally()
    started = time.monotonic()
    workdir = workdir or Path(tempfile.mkdtemp(prefix="exlab-torture-"))
    workdir.chmod(0o755)  # the sshd's unprivileged user walks down to the NAS folder
    env = SshEnv.create(workdir / "ssh-env") if set(SSH_TRANSPORTS) & set(transports) else None
    plans = list(enumerate(plan_rounds(rounds, kills, transports)))

    def play(plan: tuple[int, tuple[str, int, list[str]]]) -> tuple[Round, dict]:
        i, (transport, k, kinds) = plan
        if faults is not None:
            kinds = [f for f in faults if f in kinds]
        log(f"round {i}: {transport}, {k} kills, faults {', '.join(kinds)}")
        rnd = Round(i, seed, transport, k, kinds, runs, workdir, env, log)
        return rnd, rnd.play(recovery_s)

    try:
        if parallel <= 1:
            for rnd, result in map(play, plans):  # one after the other, in this thread
                _tally_round(tally, rnd, result, log)
        else:
            pool = ThreadPoolExecutor(max_workers=parallel)
            try:
                for rnd, result in pool.map(play, plans):
                    _tally_round(tally, rnd, result, log)
            finally:  # rounds under way end and clean up in their own threads
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        if env is not None:
            env.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    tally.seconds = time.monotonic() - started
    return tally


def _tally_round(tally: Tally, rnd: Round, result: dict, log) -> None:
    tally.rounds += 1
    tally.rounds_by_transport[rnd.transport] += 1
    tally.faults += rnd.faults
    tally.restarts += rnd.restarts
    tally.outlived += rnd.outlived
    tally.recovered_rounds += bool(result["settled"])
    tally.jobs.update(result["jobs"])
    tally.files_checked += result["files"]
    tally.losses += result["losses"]
    tally.nas_damage += result["nas_damage"]
    tally.foreign_overwritten += result["foreign"]
    tally.leftovers += result["leftovers"]
    tally.stuck += result["stuck"]
    tally.nas_flips_repaired += result["flips_repaired"]
    tally.late_flip += result["late_flip"]
    tally.nas_flips_detected += result["flips_detected"]
    tally.metadata_temps += result["metadata_temps"]
    tally.failed_temps += result["failed_temps"]
    tally.nas_failed += result["nas_failed"]
    for finding in result["metadata_temps"]:
        log(f"  METADATA TEMP LEFT {finding}")
    tally.nas_flips_undetected += result["flips_undetected"]
    for finding in result["late_flip"]:
        log(f"  LATE NAS FLIP {finding}")
    for finding in result["nas_failed"]:
        log(f"  NAS OFF ITS MANIFEST, JOB FAILED {finding}")
    for problem in [
        *result["losses"],
        *result["nas_damage"],
        *result["foreign"],
        *result["leftovers"],
        *result["stuck"],
        *rnd.outlived,
    ]:
        log(f"  PROBLEM {problem}")


def _transports_text(tally: Tally) -> str:
    """The transports the rounds played, in words, for the report's first paragraph."""
    words = {
        "mount": "the mount transport",
        "rsync_ssh": "rsync_ssh to a loopback sshd",
        "rclone": "rclone sftp to a loopback sshd",
    }
    names = [words.get(t, t) for t in TRANSPORTS if tally.rounds_by_transport[t]] or ["no transport"]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def report(tally: Tally, *, command: str, seed: int) -> str:
    """The reliability page: rounds, faults by kind, recoveries, losses."""
    kills = [f for f in tally.faults if f.kind == "sigkill"]
    by_phase = Counter(f.hit for f in kills)
    aimed = Counter(f.aim for f in kills)
    landed_aim = Counter(f.aim for f in kills if f.landed)
    others = Counter(f.kind for f in tally.faults if f.kind != "sigkill")
    others_landed = Counter(f.kind for f in tally.faults if f.kind != "sigkill" and f.landed)
    hits = {kind: Counter(f.hit for f in tally.faults if f.kind == kind and f.landed) for kind in others}
    lines = [
        "# Reliability under faults",
        "",
        "Generated by the torture harness (`tests/torture/`): the real `exlab-sync serve` over a generated",
        "lab with cleanup enabled (`min_verify_passes: 1`, `min_age_hours: 0`, scan and audit every 0.5 s),",
        f"on {_transports_text(tally)}, each NAS a small loop-mounted ext4,",
        "with faults injected at random (seeded). After each round, and a recovery period without faults,",
        "the invariant is checked: every file the lab wrote is still local or byte-identical on the NAS under",
        "the verified manifest; no NAS file differs from its manifest; foreign NAS data untouched; no",
        "temporary file left; every job ended (cleaned, verified or failed with a reason).",
        "",
        f"Command: `{command}` (seed {seed}), {tally.seconds / 60:.1f} minutes.",
        "",
        "## Summary",
        "",
        "| figure | value |",
        "|---|---|",
        f"| rounds | {tally.rounds} ({', '.join(f'{t} {n}' for t, n in sorted(tally.rounds_by_transport.items()))}) |",
        f"| SIGKILLs of the service | {len(kills)} |",
        f"| other faults injected (landed / tried) | {sum(others_landed.values())} / {sum(others.values())} |",
        f"| service restarts after a kill (all came back) | {tally.restarts} |",
        f"| tools (rsync, rclone, ssh, remote programs) still running {OUTLIVE_GRACE_S:g} s after a kill | "
        f"{len(tally.outlived)} |",
        f"| rounds whose jobs all ended in the recovery period | {tally.recovered_rounds} / {tally.rounds} |",
        f"| files checked against the invariant | {tally.files_checked} |",
        "| NAS byte flips: detected by the engine / not detected (landed after the bytes were verified) | "
        f"{tally.nas_flips_detected} / {tally.nas_flips_undetected} |",
        f"| NAS byte flips repaired (the file back to the manifest's bytes) | {tally.nas_flips_repaired} |",
        f"| **losses** (a file neither local nor verified on the NAS) | **{len(tally.losses)}** |",
        f"| NAS files differing from their manifest | {len(tally.nas_damage)} |",
        "| ... in a run the harness damaged whose repair then FAILED with a reason (local copy kept) | "
        f"{len(tally.nas_failed)} |",
        f"| foreign NAS files changed | {len(tally.foreign_overwritten)} |",
        f"| transfer temporary files left (mount, rsync, rclone) | {len(tally.leftovers)} |",
        "| transfer temporary files in a FAILED job's NAS folder (its next push removes them) | "
        f"{len(tally.failed_temps)} |",
        "| metadata temporary files left (`.exlab-wizard/.<name>.<hex>.tmp`, see below) | "
        f"{len(tally.metadata_temps)} |",
        f"| jobs stuck or failed without a reason | {len(tally.stuck)} |",
        "",
        "## SIGKILLs by phase",
        "",
        "The phase is read from the queue database at the kill (RUNNING: transfer; AWAITING_VERIFY:",
        "verification; VERIFIED with the metadata push due: metadata push; VERIFIED with a cleanup plan:",
        "deletion; VERIFIED otherwise: audit). A kill aimed at a phase that did not show within 6 s",
        "is done anyway and counted under what it hit.",
        "",
        "| phase | aimed | aim seen | hit |",
        "|---|---|---|---|",
    ]
    for phase in [*KILL_PHASES, *sorted(set(by_phase) - set(KILL_PHASES))]:
        lines.append(f"| {phase} | {aimed[phase]} | {landed_aim[phase]} | {by_phase[phase]} |")
    lines += [
        "",
        "## Other faults",
        "",
        "| fault | tried | landed | state of the job hit at injection |",
        "|---|---|---|---|",
    ]
    for kind in sorted(others):
        seen = ", ".join(f"{s} {n}" for s, n in hits[kind].most_common())
        lines.append(f"| {kind} | {others[kind]} | {others_landed[kind]} | {seen} |")
    lines += ["", "## How the jobs ended", "", "| final state | jobs |", "|---|---|"]
    for state, n in sorted(tally.jobs.items()):
        lines.append(f"| {state} | {n} |")
    lines += [
        "",
        "## NAS corruption after verification, before the deletion",
        "",
        "A NAS byte flipped after the job was already VERIFIED (the flip aimed at the short",
        "AWAITING_VERIFY window and missed it). With `min_verify_passes: 1` and `min_age_hours: 0`",
        "the reaper may delete the local copy before any audit re-reads the NAS, because its",
        "re-check right before the deletion compares the NAS listing (sizes, mtimes), not the bytes;",
        "the local copy is then gone and the NAS copy is damaged. The defaults (2 passes, 24 h)",
        "put an audit between the verification and the deletion. Counted apart from the losses:",
        "",
    ]
    lines += [f"- {p}" for p in tally.late_flip] if tally.late_flip else ["None in this run."]
    lines += [
        "",
        "## Metadata temporary files left by a SIGKILL",
        "",
        "`fileio.atomic_write_bytes` writes `creation.json` and `checksums.sha256` through",
        "`.<name>.<12 hex>.tmp` and removes that file on every failure it sees, but a SIGKILL between",
        "the create and the rename leaves it. Every push removes a leftover of `checksums.sha256`",
        "first (the job's runner is that file's one writer), so none reaches the NAS any more;",
        "`creation.json`'s writer removes its own under the file's lock at its next write. Harmless",
        "to the data (no reader takes one for the real file) but clutter that a lab's IT would see.",
        "Found:",
        "",
    ]
    lines += [f"- {p}" for p in tally.metadata_temps] if tally.metadata_temps else ["None in this run."]
    lines += [
        "",
        "## Losses this harness found before, and what mends them",
        "",
        "- A byte flipped (size and mtime kept) while the client recorded a verification's file stats,",
        "  the rewrite half done: the record took the rewrite's mtime for the verified bytes', and the",
        "  damage went out as an edit. Mended in the record; `tests/sync/test_damage_or_edit.py`.",
        "- A byte flipped while the client read the file: in the stats record's second read of a file",
        "  stamped after the hashing (taken for the newer bytes of an edit the hashing missed), or in a",
        "  local check (taken for a file being written). Either way the re-transfer sent the damage over",
        "  the verified NAS copy (kept under `previous/`) and verified it: 1 loss in about 20 short rounds",
        "  under load (CI on 141afe4, rsync_ssh; a repeated round, mount). Mended in 74d9ace: newer bytes",
        "  count only when read under the very stat recorded, and a check reads a file again while a write",
        "  lands during its read. `tests/client/test_local_damage.py` (`damage_landing_*`).",
        "- A local byte flipped after a verification whose metadata push could not go out (the ssh",
        "  master broken, then sshd restarted): the job FAILED `local_damage` and its owed push waited",
        "  for a restore, so the NAS held the verified bytes but no `checksums.sha256` (seed 21 on",
        "  d51dfa8, rsync_ssh; counted a loss as no verified manifest stood beside them). Mended in",
        "  6769329: such a job still sends the push it owes. `tests/client/test_local_damage.py`",
        "  (`local_damage_job_still_sends_the_metadata_push_it_owes`).",
    ]
    problems = tally.problems()
    lines += ["", "## Problems found", ""]
    lines += [f"- {p}" for p in problems] if problems else ["None."]
    return "\n".join(lines) + "\n"
