"""Power-cut scenarios on the rig (:mod:`tests.powercut.rig`), their checks, the long run and its report.

A *scenario* is one lab (one run of 600 small frames and a 3 MiB stack, on
the mount transport or rsync_ssh to the loopback sshd whose remote folder is
the rig's NAS disk), cleanup on (one verify pass, no minimum age), cut once at
a chosen point or several times at random instants, then a fresh engine on the
last copies: recovery, waiting, audit and cleanup passes.

Checked right after every cut, before any engine runs (what the disks promise):

- rule 1: every data file is local and whole, or byte-identical on the NAS;
- a job the state disk holds as VERIFIED or later has its whole copy on the NAS;
- an ``enqueue`` that returned a job id left that job on the state disk.

Checked after the fresh engine: rule 1 again, the NAS holds the manifest of a
CLEANED run, and the job ended (CLEANED; after ``restore``/``retry
--accept-local``, CLEANED or FAILED ``local_damage``). A rule broken is a
*loss*; a job that did not end so is *stuck*.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import random
import shutil
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exlab_wizard.config import Config, parse_config
from exlab_wizard.sync.queue import JobQueue
from exlab_wizard.sync.states import SyncJobState
from tests.fixtures.sshd import RW_USER, SshEnv, SshServer
from tests.helpers import flip_byte_keep_stat
from tests.lab import EQ, Lab, Site, cleanup_config, make_client
from tests.powercut.rig import Rig, child_output, rig, stop_now, wait_ready, wait_stopped, write_config

S = SyncJobState
TRANSPORTS = ("mount", "rsync_ssh")
FILES = {f"frames/f{i:04d}.raw": (b"%06d" % i) * 400 for i in range(600)}
FILES["stack.tif"] = os.urandom(3 << 20)
DAMAGED = "stack.tif"  # the file flipped before a restore / accept-local cut
VERIFIED_OR_LATER = (S.VERIFIED, S.CLEANUP_ELIGIBLE, S.CLEANED)

#: Every hooked cut point of the sync flow, in the flow's order (see rig.ENGINE).
POINTS = (
    "enqueued",
    "transition:running",
    "transition:awaiting_verify",
    "transition:verified",
    "transport_push_1",
    "metadata_pushed",
    "synced",
    "transition:cleanup_eligible",
    "deleted_batch_1",
    "deleted_batch_2",
    "final_push",
    "transport_push_2",
    "transition:cleaned",
    "cleaned",
)
#: The points that exist only when the run folder's metadata is not kept (retain_cache off).
NO_RETAIN_ONLY = ("final_push", "transport_push_2")
#: rsync_ssh's points (``transport_push_<n>`` hooks the mount transport only).
RSYNC_POINTS = ("transition:verified", "metadata_pushed", "deleted_batch_1", "deleted_batch_2", "final_push", "cleaned")
#: Cuts after an operator's step on a job FAILED ``local_damage``.
RECOVERY_POINTS = (
    ("restore", "restored"),
    ("accept_local", "retried"),
    ("accept_local", "transition:running"),
    ("accept_local", "transition:awaiting_verify"),
    ("accept_local", "transition:verified"),
    ("accept_local", "synced"),
)
#: A random cut's instant, in seconds after the engine is ready (its client initialised): a whole
#: flow from there takes ~0.25 s on mount and ~1.1-1.3 s on rsync_ssh (enqueue to CLEANED), a
#: resumed one less; the window runs a little past the end so that "all done" is hit too.
RANDOM_WINDOW = {"mount": 0.3, "rsync_ssh": 1.4}


def point_cases(transport: str) -> list[tuple[str, bool]]:
    """Every valid (point, retain_cache) of ``transport``: no final push with retain_cache."""
    if transport == "rsync_ssh":
        return [(p, False) for p in RSYNC_POINTS]
    return [(p, retain) for p in POINTS for retain in (True, False) if not (retain and p in NO_RETAIN_ONLY)]


@dataclass
class Scenario:
    rig: Rig
    lab: Lab
    run: Path
    cfg: Config
    cfg_file: Path
    transport: str


@dataclass
class Cut:
    aim: str  # the hooked point, or "random +0.43s"
    state: str  # the job's state on the state disk right after the cut ("no job")
    phase: str  # state, plus "mid-deletion" when some but not all local files are gone
    problems: list[str]


@dataclass
class Outcome:
    """One scenario: its cuts, the job's end, the rules broken (losses) and whether it is stuck."""

    transport: str
    label: str
    cuts: list[Cut] = field(default_factory=list)
    final: str = ""
    losses: list[str] = field(default_factory=list)
    stuck: str | None = None

    def problems(self) -> list[str]:
        return self.losses + ([f"stuck: {self.stuck}"] if self.stuck else [])

    def describe(self) -> str:
        cuts = "; ".join(f"{c.aim} -> {c.phase}" for c in self.cuts)
        return f"{self.transport} {self.label}: cuts [{cuts}], ended {self.final}"


# ----------------------------------------------------------------------------- labs on the rig


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@contextlib.contextmanager
def mount_scenario(root: Path, *, retain_cache: bool = False) -> Iterator[Scenario]:
    """A lab on the mount transport, its state, local root and NAS each a disk of the rig."""
    with rig(root) as r:
        lab = Lab.build(root, equipment=(EQ,), nas_per_equipment=False)
        run = lab.make_run(files=FILES)
        cfg = cleanup_config(lab, min_verify_passes=1, min_age_hours=0, retain_cache=retain_cache)
        cfg_file = write_config(root / "config.json", cfg.model_dump(mode="json", by_alias=True))
        r.sync()  # the instrument's data and the NAS marker were written long ago
        yield Scenario(r, lab, run, cfg, cfg_file, "mount")


@contextlib.contextmanager
def rsync_scenario(root: Path, server: SshServer) -> Iterator[Scenario]:
    """A lab on rsync_ssh to ``server``: the remote folder (owned by its login user) is the rig's NAS disk."""
    remote = Path(tempfile.mkdtemp(prefix="exlab-powercut-"))  # outside pytest's 0700 tree: the login user walks in
    remote.chmod(0o755)
    try:
        with rig(root, {"nas": remote}) as r:
            shutil.chown(remote, RW_USER, RW_USER)
            remote.chmod(0o755)
            site = Site(root, root / "lab", remote, root / "state", (EQ,), nas_per_equipment=False, kind="rsync_ssh")
            site.transport = {
                "type": "rsync_ssh",
                "ssh_target": f"{RW_USER}@127.0.0.1",
                "ssh_key_path": str(server.env.client_key),
                "ssh_port": server.port,
                "remote_path": str(remote),
                "ssh_known_hosts": str(server.known_hosts),
            }
            run = site.make_run(files=FILES)
            data = site.config_data(
                sync={"scan_interval_s": 3600, "audit_interval_s": 6 * 3600},
                cleanup={"enabled": True, "min_verify_passes": 1, "min_age_hours": 0, "retain_cache": False},
            )
            cfg_file = write_config(root / "config.json", data)
            r.sync()
            yield Scenario(r, site, run, parse_config(data), cfg_file, "rsync_ssh")
    finally:
        shutil.rmtree(remote, ignore_errors=True)


@contextlib.contextmanager
def scenario(root: Path, transport: str, server: SshServer | None, *, retain_cache: bool = False):
    if transport == "mount":
        with mount_scenario(root, retain_cache=retain_cache) as scn:
            yield scn
    else:
        assert server is not None, "rsync_ssh needs the sshd"
        with rsync_scenario(root, server) as scn:
            yield scn


# ----------------------------------------------------------------------------- checks


def lost_files(scn: Scenario, expected: dict[str, bytes] = FILES) -> list[str]:
    """Rule 1: the files neither local and whole nor byte-identical on the NAS."""
    nas = scn.lab.nas_copy(scn.run)
    bad = []
    for rel, data in expected.items():
        local = scn.run / rel
        if local.is_file() and local.read_bytes() == data:
            continue
        remote = nas / rel
        if not (remote.is_file() and remote.read_bytes() == data):
            where = "gone" if not local.exists() else "damaged"
            bad.append(f"{rel}: local {where}, NAS copy {'missing' if not remote.exists() else 'different'}")
    return bad


def nas_copy_gaps(scn: Scenario, expected: dict[str, bytes] = FILES) -> list[str]:
    """The files a VERIFIED job's NAS copy lacks or holds different."""
    nas = scn.lab.nas_copy(scn.run)
    return [
        f"{rel}: NAS copy {'missing' if not (nas / rel).exists() else 'different'}"
        for rel, data in expected.items()
        if not ((nas / rel).is_file() and (nas / rel).read_bytes() == data)
    ]


def _job_on_disk(scn: Scenario):
    with JobQueue(scn.lab.state / "queue.db") as queue:
        return queue.by_run(str(scn.run))


def after_cut(scn: Scenario, aim: str, output: str, expected: dict[str, bytes] = FILES) -> Cut:
    """What the cut left on the three disks, checked before any engine runs."""
    job = _job_on_disk(scn)
    problems = []
    enqueued = [line.split()[1] for line in output.splitlines() if line.startswith("ENQUEUED")]
    if enqueued and (job is None or job.id != enqueued[0]):
        problems.append(f"enqueue returned job {enqueued[0]}, the cut lost it")
    if job is not None and job.state in VERIFIED_OR_LATER:
        problems += [f"{job.state.value} but {gap}" for gap in nas_copy_gaps(scn, expected)]
    problems += [f"right after the cut: {loss}" for loss in lost_files(scn, expected)]
    state = job.state.value if job is not None else "no job"
    phase = state
    gone = sum(not (scn.run / rel).exists() for rel in FILES)
    if 0 < gone < len(FILES):
        phase += " mid-deletion"
    elif gone == len(FILES) and state != "cleaned":
        phase += " files deleted"
    return Cut(aim, state, phase, problems)


async def _restart(cfg: Config, run: Path, passes: int = 4):
    client = make_client(cfg)
    client.clock = _now
    await client.init()
    try:
        await client.wait_idle(timeout=120)
        for _ in range(passes):
            await client.audit_once()
            await client.cleanup_once()
            await client.wait_idle(timeout=120)
        return await client.job(run)
    finally:
        await client.close()


def finish(scn: Scenario, out: Outcome, *, expected: dict[str, bytes] = FILES, may_fail_damage: bool = False) -> None:
    """A fresh engine on the cut disks: recovery, audit and cleanup passes; then the checks."""
    for cut in out.cuts:
        out.losses += [f"{cut.aim}: {p}" for p in cut.problems]
    job = asyncio.run(_restart(scn.cfg, scn.run))
    out.losses += [f"after the restart: {loss}" for loss in lost_files(scn, expected)]
    if job is None:
        out.final = "no job"
        out.stuck = "no job after the restart"
        return
    out.final = job.state.value + (f" {job.error_kind}" if job.error_kind else "")
    if job.state in VERIFIED_OR_LATER:
        out.losses += [f"after the restart, {job.state.value} but {gap}" for gap in nas_copy_gaps(scn, expected)]
    manifest = scn.lab.nas_copy(scn.run) / ".exlab-wizard" / "checksums.sha256"
    if job.state == S.CLEANED and not (manifest.is_file() and manifest.stat().st_size > 0):
        out.losses.append("CLEANED but the NAS lost the verified manifest")
    ended = job.state == S.CLEANED or (may_fail_damage and job.state == S.FAILED and job.error_kind == "local_damage")
    if not ended:
        events = [e.detail for e in getattr(job, "events", [])][-6:]
        out.stuck = f"{job.state.value} {job.error_kind or ''} {job.last_error or ''} {events}".strip()


def _cut_at_hook(scn: Scenario, flow: str, point: str) -> tuple[str, str]:
    child = scn.rig.start_engine(scn.cfg_file, flow, point, scn.run)
    if not wait_stopped(child, 120):
        child.kill()
        raise RuntimeError(f"the engine never reached {point}:\n{child_output(child)}")
    scn.rig.cut(child)
    return point, child_output(child)


# ----------------------------------------------------------------------------- the scenarios


def cut_at_point(scn: Scenario, point: str) -> Outcome:
    """The sync flow cut right after ``point``; a fresh engine finishes."""
    out = Outcome(scn.transport, f"{point} retain_cache={scn.cfg.nas_cleanup.retain_cache}")
    aim, output = _cut_at_hook(scn, "sync", point)
    out.cuts.append(after_cut(scn, aim, output))
    finish(scn, out)
    return out


def cut_at_random(scn: Scenario, rnd: random.Random, chain: int = 3) -> Outcome:
    """``chain`` engines in a row on the same disks, each cut at a random instant; a fresh engine finishes."""
    out = Outcome(scn.transport, f"random x{chain}")
    for _ in range(chain):
        delay = rnd.uniform(0, RANDOM_WINDOW[scn.transport])
        child = scn.rig.start_engine(scn.cfg_file, "sync", "random", scn.run)
        head = wait_ready(child)
        time.sleep(delay)
        if child.poll() is None:
            stop_now(child)
        scn.rig.cut(child)
        out.cuts.append(after_cut(scn, f"random +{delay:.2f}s", head + child_output(child)))
    finish(scn, out)
    return out


async def _fail_local_damage(scn: Scenario) -> None:
    """Sync the run to VERIFIED, flip a byte of ``DAMAGED`` (size, mtime kept): cleanup fails it local_damage."""
    client = make_client(scn.cfg)
    client.clock = _now
    await client.init()
    try:
        await client.enqueue(scn.run)
        for _ in range(500):
            await client.wait_idle(timeout=60)
            job = await client.job(scn.run)
            if job.state == S.VERIFIED and not job.metadata_push_pending:
                break
            await asyncio.sleep(0.02)
        flip_byte_keep_stat(scn.run / DAMAGED, 4242)
        await client.cleanup_once()
        job = await client.job(scn.run)
        if not (job.state == S.FAILED and job.error_kind == "local_damage"):
            raise RuntimeError(f"setup: expected FAILED local_damage, got {job.state} {job.last_error}")
    finally:
        await client.close()


def _previous_copies(nas_run: Path, rel: str) -> list[bytes]:
    root = nas_run / ".exlab-wizard" / "previous"
    return [p.read_bytes() for p in root.glob(f"*/{rel}") if p.is_file()] if root.is_dir() else []


def cut_after_recovery_step(scn: Scenario, flow: str, point: str) -> Outcome:
    """A job FAILED ``local_damage``; ``restore`` or ``retry --accept-local`` cut at ``point``.

    Beyond the usual checks: the verified bytes of the damaged file are kept
    somewhere (local, the NAS place, or the NAS's ``previous/``), and a job
    VERIFIED on the accepted bytes has them on the NAS.
    """
    out = Outcome(scn.transport, f"{flow} {point}")
    asyncio.run(_fail_local_damage(scn))
    damaged = (scn.run / DAMAGED).read_bytes()
    os.sync()  # the setup is old news when the cut comes
    aim, output = _cut_at_hook(scn, flow, point)
    expected = dict(FILES) | ({DAMAGED: damaged} if flow == "accept_local" else {})
    cut = after_cut(scn, aim, output, expected)
    nas_run = scn.lab.nas_copy(scn.run)

    def verified_bytes_kept(when: str) -> list[str]:
        places = [scn.run / DAMAGED, nas_run / DAMAGED]
        held = [p.read_bytes() for p in places if p.is_file()] + _previous_copies(nas_run, DAMAGED)
        return [] if FILES[DAMAGED] in held else [f"{when}: the verified bytes of {DAMAGED} are gone everywhere"]

    cut.problems += verified_bytes_kept("right after the cut")  # after_cut checked a VERIFIED job's copy
    out.cuts.append(cut)
    finish(scn, out, expected=expected, may_fail_damage=True)
    out.losses += verified_bytes_kept("after the restart")
    return out


# ----------------------------------------------------------------------------- the long run


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # a scenario that could not be played (never reached...)
    self_check: str | None = "not run"
    seconds: float = 0.0

    @property
    def cuts(self) -> list[tuple[str, Cut]]:
        return [(o.transport, c) for o in self.outcomes for c in o.cuts]

    def losses(self) -> list[str]:
        return [f"{o.describe()}: {loss}" for o in self.outcomes for loss in o.losses]

    def stuck(self) -> list[str]:
        return [f"{o.describe()}: {o.stuck}" for o in self.outcomes if o.stuck]

    def problems(self) -> list[str]:
        return self.losses() + self.stuck() + self.errors + ([self.self_check] if self.self_check else [])


def long_run(
    *,
    labs: int,
    seed: int,
    transports: tuple[str, ...] = TRANSPORTS,
    chain: int = 3,
    points: bool = True,
    log: Callable[[str], Any] = print,
) -> Tally:
    """The rig's self-check, every hooked point (``points``), then ``labs`` labs of ``chain`` random cuts.

    The random labs alternate ``transports``; lab ``i``'s instants come from ``(seed, i)``.
    """
    tally = Tally()
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="exlab-powercut-run-"))
    env = server = None
    try:
        if "rsync_ssh" in transports:
            env = SshEnv.create(workdir / "ssh-env")
            server = SshServer(env, workdir / "sshd").start()
        n = 0

        def play(label: str, transport: str, body: Callable[[Scenario], Outcome], **kw: Any) -> None:
            nonlocal n
            n += 1
            root = workdir / f"s{n:03d}"
            root.mkdir()
            try:
                with scenario(root, transport, server, **kw) as scn:
                    outcome = body(scn)
                tally.outcomes.append(outcome)
                log(f"{outcome.describe()}" + (f"  PROBLEMS {outcome.problems()}" if outcome.problems() else ""))
            except Exception as exc:
                tally.errors.append(f"{transport} {label}: {exc!r}")
                log(f"{transport} {label}: ERROR {traceback.format_exc(limit=3)}")
            finally:
                shutil.rmtree(root, ignore_errors=True)

        root = workdir / "self-check"
        root.mkdir()
        with rig(root) as r:
            tally.self_check = r.self_check()
        log(f"self-check: {tally.self_check or 'a cut loses what was not fsynced'}")
        if points:
            for transport in transports:
                for point, retain in point_cases(transport):
                    play(point, transport, lambda scn, p=point: cut_at_point(scn, p), retain_cache=retain)
            if "mount" in transports:
                for flow, point in RECOVERY_POINTS:
                    play(
                        f"{flow} {point}",
                        "mount",
                        lambda scn, f=flow, p=point: cut_after_recovery_step(scn, f, p),
                        retain_cache=True,
                    )
        for i in range(labs):
            transport = transports[i % len(transports)]
            rnd = random.Random(f"{seed}-{i}")
            play(f"random lab {i}", transport, lambda scn, rnd=rnd: cut_at_random(scn, rnd, chain))
    finally:
        if server is not None:
            server.stop()
        if env is not None:
            env.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    tally.seconds = time.monotonic() - started
    return tally


def report(tally: Tally, *, command: str, seed: int) -> str:
    """The run's figures as markdown: cuts, where they landed, losses, stuck jobs."""
    cuts = tally.cuts
    random_cuts = [(t, c) for t, c in cuts if c.aim.startswith("random")]
    hooked = [(t, c) for t, c in cuts if not c.aim.startswith("random")]
    by_phase = Counter((t, c.phase) for t, c in random_cuts)
    ends = Counter((o.transport, o.final) for o in tally.outcomes)
    transports = sorted({t for t, _ in cuts})
    lines = [
        f"Command: `{command}` (seed {seed}), {tally.seconds / 60:.1f} minutes.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| rig self-check (a cut loses what was not fsynced) | {tally.self_check or 'passed'} |",
        f"| scenarios played | {len(tally.outcomes)} |",
        f"| cuts at hooked points | {len(hooked)} ({len({c.aim for _, c in hooked})} points) |",
        f"| cuts at random instants | {len(random_cuts)} |",
        f"| **losses** (a rule broken after a cut or after the restart) | **{len(tally.losses())}** |",
        f"| jobs stuck (not CLEANED, nor FAILED local_damage after a recovery step) | {len(tally.stuck())} |",
        f"| scenarios that could not be played | {len(tally.errors)} |",
        "",
        "Random cuts by what the state disk held right after the cut:",
        "",
        "| transport | job state at the cut | cuts |",
        "|---|---|---|",
    ]
    for (transport, phase), count in sorted(by_phase.items()):
        lines.append(f"| {transport} | {phase} | {count} |")
    lines += ["", "How the jobs ended:", "", "| transport | final state | scenarios |", "|---|---|---|"]
    for (transport, final), count in sorted(ends.items()):
        lines.append(f"| {transport} | {final} | {count} |")
    if not transports:
        lines.append("(no cut made)")
    problems = tally.problems()
    lines += ["", "Problems:" if problems else "Problems: none.", ""]
    lines += [f"- {p}" for p in problems]
    return "\n".join(lines).rstrip() + "\n"
