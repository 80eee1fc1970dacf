"""Labs for the tests, built in one place.

A lab lives under one temporary folder: a local root with equipment folders,
runs with their ``.exlab-wizard/creation.json`` and data files, a "NAS" folder
per equipment carrying the mount marker ``.exlab-nas``, a state folder, and
the config (a :class:`Config` or a file for the console script) tying them
together. :class:`Lab` builds that; the variants below reuse it:

- :func:`client_lab`: two equipments (``CONFOCAL_01``, ``FACS_02``), each on
  its own NAS folder ``nas/<id>`` (the client tests' ``lab`` fixture); the
  cli tests build a one-equipment :class:`Lab` the same way.
- :class:`Site`: one equipment on the mount transport or on rsync_ssh to the
  loopback sshd (the client tests' ``site`` fixture).
- :class:`VerifiedLab`: one equipment whose runs are already synced and
  verified in a real queue, as the client leaves them (the reaper tests).
- :class:`MountLab`: one run folder and a real :class:`MountTransport`.
- :func:`make_hostile_run` and :func:`rsync_equipment`: the run with hostile
  names the transport tests send, and an rsync_ssh equipment on the sshd.
- :func:`make_client`, :func:`running`, :func:`synced`, :func:`ready`,
  :func:`ready_run`, :func:`ready_client`: a real client over a lab.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from exlab_wizard.cache import CreationWriter
from exlab_wizard.config import Config, parse_config
from exlab_wizard.config.models import EquipmentConfig
from exlab_wizard.sync.equipment_log import EquipmentLog
from exlab_wizard.sync.manifest_format import format_manifest, manifest_digest
from exlab_wizard.sync.nas_client import NASSyncClient, SyncHandleState
from exlab_wizard.sync.queue import JobQueue, SyncJobRow
from exlab_wizard.sync.reaper import Reaper, record_verified_stat
from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports import RemoteFile, make_transport
from exlab_wizard.sync.transports.mount import MountTransport
from exlab_wizard.validator import Validator
from tests.fixtures.sshd import RW_USER, SshServer
from tests.helpers import Clock

__all__ = [
    "EQ",
    "FILES",
    "TWIN_FILES",
    "everything_under",
    "flip_before_read_back",
    "held_files",
    "nothing_deleted",
    "ready_client",
    "ready_run",
    "rewrite_in_place",
    "metadata_push_down",
    "retry_now",
    "HOSTILE",
    "MARKER",
    "RUN_REL",
    "Lab",
    "MountLab",
    "Site",
    "VERIFIED_FILES",
    "VerifiedLab",
    "acts",
    "cleanup_config",
    "client_lab",
    "creation_data",
    "data_intact",
    "events",
    "make_client",
    "make_hostile_run",
    "mark_nas",
    "ready",
    "rsync_equipment",
    "running",
    "synced",
    "write_creation",
    "write_files",
]

S = SyncJobState
HOUR = dt.timedelta(hours=1)
EQ = "CONFOCAL_01"
MARKER = ".exlab-nas"
METADATA = ".exlab-wizard"


# --------------------------------------------------------------------------- the parts


def mark_nas(folder: Path, text: str = "mounted\n") -> Path:
    """A "NAS" folder as the mount transport expects it: it exists and carries the marker."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text(text)
    return folder


def act_once_in(
    monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, when: Callable[..., bool], action: Callable[[], None]
) -> list[int]:
    """Run ``action`` once, right before the first call of ``owner.name`` whose arguments ``when`` accepts.

    Places a user's action in a window of the engine's steps. The list
    returned holds one item once the action ran (a test asserts it did).
    """
    real = getattr(owner, name)
    fired: list[int] = []

    def hook(*args: Any, **kwargs: Any) -> Any:
        if not fired and when(*args, **kwargs):
            fired.append(1)
            action()
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, hook)
    return fired


def on_share(cfg: Config, equipment_id: str, share: Path) -> Config:
    """``cfg`` with the mount transport of ``equipment_id`` moved to the share at ``share``."""
    equipment = [
        eq.model_copy(update={"transport": eq.transport.model_copy(update={"mount_path": share})})
        if eq.id == equipment_id
        else eq
        for eq in cfg.equipment
    ]
    return cfg.model_copy(update={"equipment": equipment})


def swap_folder(mine: Path, theirs: Path) -> None:
    """A user puts folder ``theirs`` in the place of ``mine`` (renamed ``<name>_old``)."""
    os.rename(mine, mine.with_name(mine.name + "_old"))
    os.rename(theirs, mine)


def write_files(run: Path, files: Mapping[str, bytes | str], *, mtime: float | None = None) -> None:
    """Write ``files`` (relative path -> bytes or text) under ``run``, optionally with one mtime."""
    for rel, data in files.items():
        target = run / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            target.write_text(data)
        else:
            target.write_bytes(data)
        if mtime is not None:
            os.utime(target, (mtime, mtime))


def creation_data(
    run: Path,
    *,
    kind: str = "experimental",
    nas: str | None = None,
    paths: bool = True,
    overrides: list | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The creation.json of a pending run; ``paths=False`` leaves out its paths."""
    data: dict[str, Any] = {"schema_version": "1.0", "level": "run", "run_kind": kind}
    if paths:
        data["paths"] = {"local": str(run), "nas": nas}
    data["sync_status"] = "pending"
    if overrides is not None:
        data["validation_overrides"] = overrides
    return {**data, **extra}


def write_creation(run: Path, **kwargs: Any) -> Path:
    """Write the run's ``.exlab-wizard/creation.json`` (see :func:`creation_data`)."""
    (run / METADATA).mkdir(parents=True, exist_ok=True)
    path = run / METADATA / "creation.json"
    path.write_text(json.dumps(creation_data(run, **kwargs)))
    return path


# --------------------------------------------------------------------------- the lab


@dataclass
class Lab:
    """Local root, equipment on mounted "NAS" folders, state folder, all under ``root``.

    ``nas_per_equipment``: each equipment's NAS folder is ``nas/<id>``; else
    (one equipment) ``nas`` itself is its mount path.
    """

    root: Path
    local_root: Path
    nas: Path
    state: Path
    equipment: tuple[str, ...] = (EQ, "FACS_02")
    project: str = "PROJ-1"
    nas_per_equipment: bool = True
    creation_extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        root: Path,
        *,
        equipment: tuple[str, ...] = (EQ, "FACS_02"),
        local: str = "lab",
        nas_per_equipment: bool = True,
        marker: str | None = "mounted\n",
        **kwargs: Any,
    ) -> Lab:
        """Make the folders: a NAS folder with the marker per equipment (none when ``marker`` is None)."""
        lab = cls(
            root, root / local, root / "nas", root / "state", equipment, nas_per_equipment=nas_per_equipment, **kwargs
        )
        if marker is not None:
            for eq in equipment:
                mark_nas(lab.mount_path(eq), marker)
        lab.local_root.mkdir(parents=True, exist_ok=True)
        return lab

    def mount_path(self, equipment: str = EQ) -> Path:
        return self.nas / equipment if self.nas_per_equipment else self.nas

    def transport_data(self, equipment: str = EQ) -> dict[str, Any]:
        return {"type": "mount", "mount_path": str(self.mount_path(equipment))}

    def equipment_data(self, equipment: str = EQ) -> dict[str, Any]:
        return {"id": equipment, "local_root": str(self.local_root), "transport": self.transport_data(equipment)}

    def config_data(self, *, sync: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
        """The config: every equipment, the ``sync`` section when given, other sections as given."""
        data: dict[str, Any] = {"equipment": [self.equipment_data(eq) for eq in self.equipment]}
        if sync is not None:
            data["sync"] = sync
        data["state_dir"] = str(self.state)
        data.update(sections)
        return data

    def config(self, **sync: Any) -> Config:
        """The config with fast retries and scans; ``sync``: more ``sync`` settings."""
        return parse_config(self.config_data(sync={"backoff_s": [0.01, 0.01], "scan_interval_s": 0.05, **sync}))

    def write_config(self, data: dict[str, Any], path: Path | None = None) -> Path:
        """Write ``data`` as the config file (JSON is YAML); ``root/config.yaml`` unless ``path``."""
        path = path or self.root / "config.yaml"
        path.write_text(json.dumps(data))
        return path

    def run_path(self, name: str, *, equipment: str = EQ, project: str | None = None) -> Path:
        parent = "TestRuns" if name.startswith("TestRun_") else "Runs"
        return self.local_root / equipment / (project or self.project) / parent / name

    def make_run(
        self,
        name: str = "Run_2026-01-01",
        files: Mapping[str, bytes | str] | None = None,
        *,
        equipment: str = EQ,
        project: str | None = None,
        overrides: list[dict] | None = None,
        creation: bool = True,
        meta: dict[str, bytes] | None = None,
        nas: str | None = None,
    ) -> Path:
        """A run with its creation.json and ``files`` (one 1000-byte file unless given).

        ``meta``: more files in its ``.exlab-wizard/``; ``nas``: the NAS path
        its creation.json names. A ``TestRun_`` name makes a test run.
        """
        run = self.run_path(name, equipment=equipment, project=project)
        run.mkdir(parents=True)
        if creation:
            kind = "test" if name.startswith("TestRun_") else "experimental"
            write_creation(run, kind=kind, nas=nas, overrides=overrides or [], **self.creation_extra)
        write_files(run, {"data.bin": b"x" * 1000} if files is None else files)
        write_files(run, {f"{METADATA}/{rel}": data for rel, data in (meta or {}).items()})
        return run

    def nas_copy(self, run: Path, equipment: str = EQ) -> Path:
        return self.mount_path(equipment) / run.relative_to(self.local_root / equipment)

    def server_copy(self, run: Path, server_root: Path) -> Path:
        """The run's NAS copy as the server's own disk holds it (not through the mount), the NAS being
        the share whose folder on that disk is ``server_root``."""
        return server_root / self.nas_copy(run).relative_to(self.nas)

    def equipment_log(self, equipment: str = EQ) -> Path:
        return self.local_root / equipment / METADATA / f"wizard.{socket.gethostname()}.log"

    def log_lines(self, event: str, equipment: str = EQ) -> list[str]:
        path = self.equipment_log(equipment)
        if not path.exists():
            return []
        return [line for line in path.read_text().splitlines() if f" {event} " in line or line.endswith(f" {event}")]

    def job(self, run: Path) -> SyncJobRow:
        with JobQueue(self.state / "queue.db") as queue:
            row = queue.job_with_events(str(run), limit=500)
        assert row is not None
        return row


def client_lab(root: Path) -> Lab:
    """The client tests' lab: two equipments, a lab note in every creation.json to show it is kept."""
    return Lab.build(root, creation_extra={"lab_note": {"keep": ["me"]}})


# --------------------------------------------------------------------------- one equipment on a real transport


@dataclass
class Site(Lab):
    """One equipment (``CONFOCAL_01``) on the mount transport or rsync_ssh to the loopback sshd."""

    kind: str = "mount"
    transport: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def on(cls, request: pytest.FixtureRequest, root: Path, kind: str) -> Site:
        """The site for ``kind`` (``mount`` or ``rsync_ssh``); rsync_ssh starts the sshd fixture."""
        if kind == "mount":
            site = cls.build(root, equipment=(EQ,), kind=kind)
            site.transport = Lab.transport_data(site)
            return site
        server = request.getfixturevalue("sshd")
        site = cls(root, root / "lab", request.getfixturevalue("remote_dir"), root / "state", (EQ,), kind=kind)
        site.local_root.mkdir()
        site.nas_root.mkdir()  # the configured remote root exists (a missing one is a volume not mounted)
        shutil.chown(site.nas_root, RW_USER, RW_USER)
        site.transport = {
            "type": "rsync_ssh",
            "ssh_target": f"{RW_USER}@127.0.0.1",
            "ssh_key_path": str(server.env.client_key),
            "ssh_port": server.port,
            "remote_path": str(site.nas_root),
            "ssh_known_hosts": str(server.known_hosts),
        }
        return site

    @property
    def nas_root(self) -> Path:
        """Where the transport puts this equipment's runs."""
        return self.mount_path(EQ)

    def transport_data(self, equipment: str = EQ) -> dict[str, Any]:
        return dict(self.transport)

    def config_data(
        self,
        *,
        sync: dict[str, Any] | None = None,
        cleanup: dict[str, Any] | None = None,  # type: ignore[override]
        bandwidth: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        data = Lab.config_data(self, sync={"backoff_s": [0.01, 0.01], "scan_interval_s": 30, **(sync or {})})
        if bandwidth is not None:
            data["equipment"][0]["transport"]["bandwidth"] = bandwidth
        if cleanup is not None:
            data["nas_cleanup"] = cleanup
        return data

    def config(self, **kwargs: Any) -> Config:  # type: ignore[override]
        return parse_config(self.config_data(**kwargs))

    def write_config(self, **kwargs: Any) -> Path:  # type: ignore[override]
        path = self.root / f"config-{len(list(self.root.glob('config-*.yaml')))}.yaml"
        return Lab.write_config(self, self.config_data(**kwargs), path)


# --------------------------------------------------------------------------- runs verified in a real queue

VERIFIED_FILES = {
    "image_001.tif": b"A" * 3000,
    "image_002.tif": b"B" * 2000,
    "sub/deeper/stack.raw": b"C" * 5000,
    "sub/notes.txt": b"acquired ok\n",
}


@contextlib.contextmanager
def deletion_killed_after_two(monkeypatch: Any) -> Iterator[None]:
    """Inside: the reaper's deletion unlinks two planned files, then the process "dies" (an exception)."""
    from exlab_wizard.sync.reaper import deletion

    real = deletion.delete_batch

    def two_then_crash(run_path: Path, batch: Any) -> Any:
        real(run_path, batch[:2])
        raise RuntimeError("killed")

    monkeypatch.setattr(deletion, "delete_batch", two_then_crash)
    try:
        yield
    finally:
        monkeypatch.undo()


def settled_since() -> dt.datetime:
    """A time for the hashing to have begun at that makes every file written so far trusted.

    Later than now by the kernel's writeback window (a store through a mapping may stamp no
    time within it: :func:`~exlab_wizard.sync.reaper.local_check.writeback_window_ns`) and 3 s.
    """
    from exlab_wizard.sync.reaper import local_check

    window_ns = getattr(local_check, "writeback_window_ns", lambda: 0)() or 0
    window = dt.timedelta(microseconds=window_ns // 1000)
    return dt.datetime.now(dt.UTC) + window + dt.timedelta(seconds=3)


@dataclasses.dataclass
class VerifiedLab:
    """One equipment (``CONF_01``) whose runs are copied and verified, as the client leaves them.

    ``make_run`` writes the files three days ago, copies them byte for byte
    to the NAS folder with the verified manifest, and records the job in
    the queue: transfer 26 h ago, first verification ``verified_hours_ago``.
    The reaper's remote access is the real mount listing plus switches a test
    flips (``reachable``, ``push_ok``).
    """

    folders: Lab
    config: Config
    queue: JobQueue
    writer: CreationWriter
    now: dt.datetime
    reachable: bool = True
    push_ok: bool = True
    pushes: list = dataclasses.field(default_factory=list)

    EQ = "CONF_01"

    @classmethod
    def build(cls, root: Path) -> VerifiedLab:
        folders = Lab.build(root, equipment=(cls.EQ,), nas_per_equipment=False, project="PROJ")
        config = Config.model_validate(
            folders.config_data(
                nas_cleanup={"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": True},
            )
        )
        queue = JobQueue(folders.state / "queue.db")
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        return cls(folders, config, queue, CreationWriter(), now)

    @property
    def tmp(self) -> Path:
        return self.folders.root

    @property
    def local_root(self) -> Path:
        return self.folders.local_root

    @property
    def nas(self) -> Path:
        return self.folders.nas

    def nas_copy(self, run: Path) -> Path:
        return self.folders.nas_copy(run, self.EQ)

    def cleanup(self, **changes) -> None:
        self.config = self.config.model_copy(update={"nas_cleanup": self.config.nas_cleanup.model_copy(update=changes)})

    def log_for(self, equipment_id: str) -> EquipmentLog:
        return EquipmentLog(self.config.equipment_by_id(equipment_id))

    def log_text(self) -> str:
        path = self.log_for(self.EQ).path
        return path.read_text() if path.exists() else ""

    async def _remote_stat(self, job: SyncJobRow) -> bool:
        return self.reachable

    async def _remote_listing(self, job: SyncJobRow) -> dict[str, RemoteFile]:
        """The real mount transport's listing of the "NAS" folder (sizes and mtimes, as the client's)."""
        return await make_transport(self.config.equipment_by_id(self.EQ)).remote_stats(Path(job.run_path))

    async def _push_metadata(self, job: SyncJobRow) -> bool:
        run = Path(job.run_path)
        self.pushes.append(
            {
                "creation": self.writer.read(run).raw.get("local_cleaned"),
                "data_left": sorted(p for p in VERIFIED_FILES if (run / p).exists()),
            }
        )
        if self.push_ok:
            shutil.copytree(run / METADATA, self.nas_copy(run) / METADATA, dirs_exist_ok=True)
        return self.push_ok

    def reaper(self, **kw) -> Reaper:
        kw.setdefault("remote_stat", self._remote_stat)
        kw.setdefault("push_metadata", self._push_metadata)
        kw.setdefault("remote_listing", self._remote_listing)
        reaper = Reaper(self.queue, self.config, writer=self.writer, log_for=self.log_for, now=lambda: self.now, **kw)
        return reaper

    def run_pass(self, **kw):
        reaper = self.reaper(**kw)
        reaper.config = self.config
        return asyncio.run(reaper.run_pass())

    def job(self, job_id: str) -> SyncJobRow:
        return self.queue.get(job_id)

    def refusals(self, job_id: str) -> list[str]:
        return [e.detail for e in self.queue.events(job_id) if e.kind == "cleanup_refused"]

    def make_run(
        self,
        name: str = "Run_1",
        files: dict[str, bytes] | None = None,
        *,
        passes: int = 2,
        verified_hours_ago: float = 25,
        overrides: tuple[str, ...] = (),
        override_entries: list[dict] | None = None,
        eligible: bool = False,
    ) -> tuple[Path, str]:
        files = VERIFIED_FILES if files is None else files
        run = self.folders.run_path(name, equipment=self.EQ)
        run.mkdir(parents=True)
        write_files(run, files, mtime=(self.now - 72 * HOUR).timestamp())
        self.writer.ensure_minimal(run, local_path=str(run), nas_path=str(self.nas_copy(run)))
        if override_entries is not None:
            self.writer.update(run, lambda raw: raw.__setitem__("validation_overrides", override_entries))
        hashes = {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}
        (run / METADATA / "checksums.sha256").write_bytes(format_manifest(hashes))
        shutil.copytree(run, self.nas_copy(run), symlinks=True)
        verified_at = self.now - verified_hours_ago * HOUR
        job, _ = self.queue.get_or_create(str(run), self.EQ, str(self.nas_copy(run)), now=verified_at - 2 * HOUR)
        self.queue.transition(job.id, S.QUEUED, S.RUNNING, now=verified_at - HOUR, overrides_relied_on=overrides)
        self.queue.transition(job.id, S.RUNNING, S.AWAITING_VERIFY, now=verified_at - 0.5 * HOUR)
        pass_times = tuple(verified_at + 6 * i * HOUR for i in range(passes))
        self.queue.transition(
            job.id,
            S.AWAITING_VERIFY,
            S.VERIFIED,
            now=verified_at,
            verify_passes=passes,
            verified_at=verified_at,
            pass_times=pass_times,
            last_verify_at=pass_times[-1] if passes else None,
            manifest_digest=manifest_digest(hashes),
        )
        # The files were last changed (ctime: just now, by utime) before the hashing began, by more than
        # the kernel's writeback window (a store through a mapping may stamp no time within it).
        record_verified_stat(self.queue, job.id, run, hashes, verified_at, hashed_since=settled_since())
        if eligible:
            self.queue.transition(job.id, S.VERIFIED, S.CLEANUP_ELIGIBLE, now=verified_at + HOUR)
        return run, job.id

    def manifest_files_intact(self, run: Path, files: dict[str, bytes] | None = None) -> bool:
        files = VERIFIED_FILES if files is None else files
        return all((run / rel).read_bytes() == data for rel, data in files.items())


# --------------------------------------------------------------------------- one run and the mount transport


class MountLab:
    """One equipment with a local run and a mounted 'NAS' folder, all under tmp_path."""

    def __init__(self, tmp_path: Path, *, bandwidth: dict | None = None, now=None):
        folders = Lab.build(
            tmp_path, equipment=(EQ,), local="local", nas_per_equipment=False, project="PROJ-0042", marker="marker\n"
        )
        self.tmp = tmp_path
        self.nas = folders.nas
        transport = folders.transport_data()
        if bandwidth is not None:
            transport["bandwidth"] = bandwidth
        self.equipment = EquipmentConfig(id=EQ, local_root=folders.local_root, transport=transport)
        self.run = folders.run_path("Run_2024-01-08")
        self.remote = folders.nas_copy(self.run)
        self.log = EquipmentLog(self.equipment)
        kwargs = {"log": self.log}
        if now is not None:
            kwargs["now"] = now
        self.transport = MountTransport(self.equipment, **kwargs)

    def write(self, rel: str, data: bytes, *, mtime_ns: int | None = None) -> Path:
        path = self.run / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if mtime_ns is not None:
            os.utime(path, ns=(mtime_ns, mtime_ns))
        return path

    def push(self, **kwargs):
        kwargs.setdefault("bwlimit_kibps", None)
        return asyncio.run(self.transport.push(self.run, **kwargs))

    def log_text(self) -> str:
        return self.log.path.read_text() if self.log.path.exists() else ""


# --------------------------------------------------------------------------- the run the transport tests send

RUN_REL = Path("PROJ-0042") / "Runs" / "Run_2024-05-01"

#: names that break naive shell quoting or line-based parsing
HOSTILE: dict[str, bytes] = {
    "plain.txt": b"plain\n",
    "with space.dat": os.urandom(3000),
    "quote'single.txt": b"'",
    'quote"double.txt': b'"',
    "$(touch PWNED_SUB).txt": b"dollar",
    "`touch PWNED_TICK`": b"tick",
    "x'; touch PWNED; '": b"injection",
    "-leading-dash.txt": b"dash",
    "--rsync-path=evil": b"option-like",
    "données µm 測定.csv": "unicode ✓".encode(),
    "new\nline.txt": b"newline",
    "back\\slash.txt": b"backslash",
    "star*and?[x].raw": b"glob",
    "#comment-like.txt": b"rsync's --files-from reads a line starting with # as a comment",
    ";semicolon-first.txt": b"and one starting with ;",
    "empty.bin": b"",
    "sub dir/nested $(x)/deep file.bin": os.urandom(70000),
    ".exlab-wizard/creation.json": b'{"schema_version": "1.0", "level": "run"}\n',
}


def make_hostile_run(
    local_root: Path, files: dict[str, bytes] = HOSTILE, rel: Path = RUN_REL, symlink: bool = True
) -> Path:
    """A run of ``CONFOCAL_01`` holding ``files`` and, with ``symlink``, two symbolic links."""
    run = local_root / EQ / rel
    run.mkdir(parents=True)
    write_files(run, files)
    if symlink:
        (run / "link-to-plain").symlink_to("plain.txt")
        (run / "link-outside").symlink_to("/etc/passwd")
    return run


def rsync_equipment(
    tmp_path: Path,
    server: SshServer,
    remote_root: Path | str,
    *,
    user: str = RW_USER,
    key: Path | None = None,
    known_hosts: Path | None = None,
    bandwidth: dict | None = None,
    remote_marker: str | None = None,
) -> EquipmentConfig:
    """``CONFOCAL_01`` (local root ``tmp_path/lab``) on rsync_ssh to the loopback sshd."""
    transport = {
        "type": "rsync_ssh",
        "ssh_target": f"{user}@127.0.0.1",
        "ssh_key_path": str(key or server.env.client_key),
        "ssh_port": server.port,
        "remote_path": str(remote_root),
        "ssh_known_hosts": str(known_hosts or server.known_hosts),
    }
    if bandwidth is not None:
        transport["bandwidth"] = bandwidth
    if remote_marker is not None:
        transport["remote_marker"] = remote_marker
    return EquipmentConfig.model_validate({"id": EQ, "local_root": str(tmp_path / "lab"), "transport": transport})


# --------------------------------------------------------------------------- a real client over a lab

#: the files of a run in the client's cleanup tests
FILES = {
    "image_001.tif": b"A" * 3000,
    "sub/stack.raw": b"B" * 5000,
    "notes.txt": b"acquired ok\n",
}
#: a second instrument's run of the same names and sizes as FILES, other bytes (two runs, one NAS folder)
TWIN_FILES = {rel: bytes(255 - b for b in data) for rel, data in FILES.items()}


def everything_under(folder: Path) -> list[bytes]:
    """The bytes of every file below ``folder`` (``previous/`` included): is a copy anywhere there?"""
    return [p.read_bytes() for p in folder.rglob("*") if p.is_file()]


def metadata_push_down(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Every mount metadata push fails (the NAS busy) while the list returned is not empty."""
    from exlab_wizard.sync.transports.base import TransportError, TransportErrorKind

    real = MountTransport.push_metadata
    down = [True]

    async def metadata_push_fails(self: MountTransport, run_path: Path, **kwargs: Any) -> Any:
        if down:
            raise TransportError(TransportErrorKind.NETWORK, "the NAS is busy")
        return await real(self, run_path, **kwargs)

    monkeypatch.setattr(MountTransport, "push_metadata", metadata_push_fails)
    return down


def make_client(config: Config, **kwargs: Any) -> NASSyncClient:
    return NASSyncClient(
        config=config,
        queue_db=config.queue_db,
        validator=Validator(config.validator),
        cache_creation=CreationWriter(),
        **kwargs,
    )


def cleanup_config(lab: Lab, *, loops: bool = False, **cleanup: Any) -> Config:
    """The lab's config with cleanup on (two passes, 24 h); the loops run only with ``loops``."""
    cfg = lab.config(audit_interval_s=6 * 3600, scan_interval_s=0.05 if loops else 3600)
    opts = {"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": True, **cleanup}
    return cfg.model_copy(update={"nas_cleanup": cfg.nas_cleanup.model_copy(update=opts)})


def rclone_s3_equipment(lab: Lab, s3_server: Any, s3_rclone_config: Any, prefix: str) -> list[dict[str, Any]]:
    """The lab's equipment list: its one equipment on the ``rclone serve s3`` fixture, under ``prefix`` in its bucket."""
    return [
        {
            "id": EQ,
            "local_root": str(lab.local_root),
            "transport": {
                "type": "rclone",
                "rclone_remote": "labs3",
                "rclone_remote_path": f"{s3_server.bucket}/{prefix}",
                "rclone_config": str(s3_rclone_config()),
            },
        }
    ]


def rclone_cleanup_config(lab: Lab, conf: Path) -> Config:
    """The lab's first equipment on the rclone remote ``labnas`` of the config file ``conf``, cleanup on
    (two passes, 24 h); the loops run only when asked."""
    data = lab.config_data(sync={"backoff_s": [0.01, 0.01], "scan_interval_s": 3600, "audit_interval_s": 6 * 3600})
    data["equipment"][0]["transport"] = {"type": "rclone", "rclone_remote": "labnas", "rclone_config": str(conf)}
    data["nas_cleanup"] = {"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": True}
    return parse_config(data)


@contextlib.asynccontextmanager
async def running(cfg: Config, clock: Callable[[], dt.datetime], **kwargs: Any) -> AsyncIterator[NASSyncClient]:
    client = make_client(cfg, **kwargs)
    client.clock = clock
    await client.init()
    try:
        yield client
    finally:
        await client.close()


async def synced(client: NASSyncClient, run: Path) -> Any:
    handle = await client.enqueue(run)
    assert handle.state == SyncHandleState.QUEUED, handle.blocking_findings
    await client.wait_idle(timeout=60)
    job = await client.job(run)
    assert job.state == S.VERIFIED, job.last_error
    return job


async def retry_now(client: NASSyncClient, clock: Clock, run: Path) -> Any:
    """The run's job tried again now: its queued retry made due, or (out of attempts) the operator's retry; idle after."""
    job = await client.job(run)
    if job.state == S.FAILED:
        await client.retry(job.id)
    else:
        client._ctx.require_queue().update(job.id, S.QUEUED, now=clock(), next_attempt_at=clock())
        client._ctx.kick()
    await client.wait_idle(timeout=60)
    return await client.job(run)


async def ready(client: NASSyncClient, clock: Clock, run: Path) -> Any:
    """Synced, audited once 6 h later, and 25 h old: every interlock holds."""
    job = await synced(client, run)
    clock.advance(6)
    await client.audit_once()
    clock.advance(19)
    job = await client.job(run)
    assert job.verify_passes == 2
    return job


@contextlib.asynccontextmanager
async def ready_run(
    lab: Lab, cfg: Config | None = None, *, files: Mapping[str, bytes] = FILES, name: str = "Run_2026-01-01"
) -> AsyncIterator[tuple[NASSyncClient, Clock, Path]]:
    """A client over ``lab`` (``cfg``, else :func:`cleanup_config`) and its one run of ``files``, :func:`ready`."""
    run = lab.make_run(name, files=files)
    async with ready_client(lab, run, cfg) as (client, clock):
        yield client, clock, run


@contextlib.asynccontextmanager
async def ready_client(lab: Lab, run: Path, cfg: Config | None = None) -> AsyncIterator[tuple[NASSyncClient, Clock]]:
    """A client over ``lab`` (``cfg``, else :func:`cleanup_config`) with ``run``, already made, :func:`ready`."""
    clock = Clock()
    async with running(cfg or cleanup_config(lab), clock) as client:
        await ready(client, clock, run)
        yield client, clock


def acts(outcomes: list[Any]) -> list[Any]:
    """A pass's outcomes without the promotions to CLEANUP_ELIGIBLE."""
    return [o for o in outcomes if o.action != "promoted"]


def events(job: Any, kind: str | None = None) -> list[Any]:
    return [e for e in job.events if kind is None or e.kind == kind]


def data_intact(run: Path, files: dict[str, bytes] = FILES) -> bool:
    return all((run / rel).is_file() and (run / rel).read_bytes() == data for rel, data in files.items())


def nothing_deleted(run: Path, outcomes: list[Any], *context: Any) -> None:
    """Rule 1 held in a cleanup pass: every file of ``run`` is there with its bytes, no outcome deleted."""
    assert data_intact(run), (outcomes, *context)
    assert all(o.action != "deleted" for o in outcomes), outcomes


def held_files(folder: Path, files: Mapping[str, bytes] = FILES) -> dict[str, bytes]:
    """The bytes of those of ``files`` that ``folder`` holds (a NAS copy as the server's disk has it)."""
    return {rel: (folder / rel).read_bytes() for rel in files if (folder / rel).is_file()}


def flip_before_read_back(monkeypatch: pytest.MonkeyPatch, nas: Path, rel: str = "sub/stack.raw") -> list[int]:
    """A byte of ``rel`` flipped in ``nas`` (a NAS copy as the server's disk holds it), size and mtime kept,
    right before the mount transport reads it back; the list returned holds one item once it was."""
    return act_once_in(
        monkeypatch,
        MountTransport,
        "_read_back",
        lambda _self, _job, name, *a, **k: name == rel,
        lambda: rewrite_in_place(nas / rel, b"Z", at=100),
    )


def rewrite_in_place(path: Path, data: bytes, *, at: int = 0) -> None:
    """``data`` written over ``path`` at offset ``at``, its times put back: an edit the stat does not show
    (``exiftool -overwrite_original_in_place -P``, ``touch -r``, bytes changed on a server)."""
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(at)
        fh.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
