"""Pydantic models for ``config.yaml``.

Attributes mirror the YAML keys, except a bandwidth window's ``from``/``to``,
which are ``start``/``end`` in code (``from`` is a Python keyword).

Every model forbids unknown keys: a typo in a lab's config must be an error
that names the key, not a silently ignored setting. Every number must be
finite (no ``.inf`` / ``.nan``) and inside a sane range (durations at most
one year), so that a value that loads never overflows at run time.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from exlab_wizard.fileio import real_path_by_links

__all__ = [
    "DAYS",
    "MAX_CONTENT_SCAN_MIB",
    "MAX_PARALLEL_JOBS",
    "MAX_UPLOAD_MBPS",
    "MAX_VERIFY_PASSES",
    "MAX_VERIFY_STREAM_BYTES",
    "MIN_INTERVAL_S",
    "YEAR_S",
    "BandwidthConfig",
    "BandwidthWindow",
    "CleanupConfig",
    "Config",
    "EquipmentConfig",
    "MountTransportConfig",
    "RcloneTransportConfig",
    "RsyncSshTransportConfig",
    "RunOutsideRoots",
    "SyncConfig",
    "TransportConfig",
    "ValidatorConfig",
    "expand_path",
]

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
EQUIPMENT_ID_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")
_HHMM_RE = re.compile(r"^([01]?[0-9]|2[0-3]):([0-5][0-9])$")  # H:MM or HH:MM

# The sane ranges of the numbers (docs/config.md says why each).
YEAR_S = 365 * 24 * 3600  # the longest duration: one year, in seconds
MIN_INTERVAL_S = 0.01  # a shorter scan or audit interval only burns the CPU
MAX_UPLOAD_MBPS = 1_000_000  # 1 Tbit/s: far above any instrument PC's link
MAX_PARALLEL_JOBS = 256
MAX_VERIFY_PASSES = 1000
MAX_VERIFY_STREAM_BYTES = 1 << 50  # 1 PiB
MAX_CONTENT_SCAN_MIB = 1024  # files read whole into memory for the content scan


def _show(value: float) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return text if len(text) <= 24 else text[:12] + "..."


def _at_most(value: float, limit: float, what: str) -> float:
    if value > limit:
        raise ValueError(f"{_show(value)} is too large: at most {what}")
    return value


def expand_path(value: object) -> object:
    """A path on this PC from the config: ``~`` expanded, then absolute or refused; anything else left alone.

    A relative path would be read against the current folder of each process
    (``/`` under systemd, wherever an operator types a command): another run
    folder, NAS folder or queue per process, silently. It is refused rather
    than resolved against the config file's folder, so that the path written
    is the path used.
    """
    if isinstance(value, (str, Path)):
        text = str(value)
        if not text.strip():
            raise ValueError("must not be empty")
        path = Path(os.path.expanduser(text))
        if not path.is_absolute():
            if text.startswith("~"):
                raise ValueError(
                    f"{text!r}: {text.split('/')[0]} is no user's home folder here; write an absolute path"
                )
            raise ValueError(f"{text!r} is relative: write an absolute path (or one starting with ~)")
        return path
    return value


class _Model(BaseModel):
    # allow_inf_nan=False: .inf and .nan load as floats in YAML and would
    # overflow timers and rate computations at run time.
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)


class BandwidthWindow(_Model):
    """A weekly window in the workstation's local time.

    ``end`` earlier than ``start`` means the window runs past midnight into the
    next day. ``00:00`` to ``00:00`` is the whole day; any other ``start ==
    end`` is refused (an empty window, or 24 hours from an odd time? most
    likely a typo).
    """

    days: tuple[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"], ...]
    start: dt.time = Field(alias="from")
    end: dt.time = Field(alias="to")

    @field_validator("days", mode="before")
    @classmethod
    def _lower_days(cls, value: object) -> object:
        if isinstance(value, (list, tuple)):
            return tuple(v.lower() if isinstance(v, str) else v for v in value)
        return value

    @field_validator("days")
    @classmethod
    def _at_least_one_day(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # Not Field(min_length=1): pydantic counts only the items that
        # validated, so one bad day name also reported a bogus "empty" error.
        if not value:
            raise ValueError("must list at least one day (mon ... sun)")
        return value

    @field_validator("start", "end", mode="before")
    @classmethod
    def _parse_hhmm(cls, value: object) -> object:
        if isinstance(value, dt.time):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            # YAML 1.1 reads an unquoted 08:00 as a sexagesimal integer (480).
            if 0 <= value < 24 * 60:
                return dt.time(value // 60, value % 60)
            raise ValueError(f'{value!r} is not a time of day; quote it as "HH:MM"')
        if not isinstance(value, str) or not _HHMM_RE.match(value.strip()):
            raise ValueError(f'{value!r} is not a time of day "HH:MM" (00:00-23:59)')
        hour, minute = value.strip().split(":")
        return dt.time(int(hour), int(minute))

    @field_validator("end")
    @classmethod
    def _not_equal_to_start(cls, value: dt.time, info: ValidationInfo) -> dt.time:
        if info.data.get("start") == value and value != dt.time(0, 0):
            raise ValueError(
                f"equal to from ({value:%H:%M}): a window from a time to the same time is ambiguous; "
                'for whole days write from "00:00" to "00:00", for a limit at all hours leave out schedule'
            )
        return value


class BandwidthConfig(_Model):
    """Upload limit; with no ``schedule`` it applies at all times."""

    upload_mbps: float | None = None
    schedule: tuple[BandwidthWindow, ...] = ()

    @field_validator("upload_mbps")
    @classmethod
    def _positive(cls, value: float | None) -> float | None:
        if value is not None and not value > 0:
            raise ValueError("must be null (unlimited) or above 0")
        if value is not None:
            _at_most(value, MAX_UPLOAD_MBPS, f"{MAX_UPLOAD_MBPS} Mbps (null = unlimited)")
        return value

    @field_validator("schedule", mode="before")
    @classmethod
    def _null_schedule(cls, value: object) -> object:
        return () if value is None else value


def _marker_name(value: str, inside: str) -> str:
    if not value or "/" in value or value in (".", ".."):
        raise ValueError(f"must be a plain file name inside {inside}")
    return value


class _TransportBase(_Model):
    bandwidth: BandwidthConfig = BandwidthConfig()

    @model_validator(mode="before")
    @classmethod
    def _no_secrets(cls, data: object) -> object:
        if isinstance(data, dict):
            _refuse_password(data, ())
        return data


def _refuse_password(data: object, trail: tuple[str | int, ...]) -> None:
    if isinstance(data, dict):
        for key, value in data.items():
            if str(key).lower() == "password":
                where = "".join(f"[{t}]" if isinstance(t, int) else f".{t}" for t in trail)
                raise ValueError(
                    f"'password'{' under ' + where.lstrip('.') if where else ''} is not allowed: "
                    "no secrets in the config file; use key authentication "
                    "(ssh_key_path) or an rclone config file"
                )
            _refuse_password(value, (*trail, str(key)))
    elif isinstance(data, (list, tuple)):
        for index, value in enumerate(data):
            _refuse_password(value, (*trail, index))


class MountTransportConfig(_TransportBase):
    """A mounted share (SMB/NFS/local disk)."""

    type: Literal["mount"]
    mount_path: Path
    mount_marker: str = ".exlab-nas"

    _expand = field_validator("mount_path", mode="before")(expand_path)

    @field_validator("mount_marker")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        return _marker_name(value, "mount_path")

    @property
    def remote_root(self) -> str:
        return str(self.mount_path)


class RsyncSshTransportConfig(_TransportBase):
    """rsync over ssh with key authentication."""

    type: Literal["rsync_ssh"]
    ssh_target: str
    ssh_key_path: Path
    ssh_port: int = Field(default=22, ge=1, le=65535)
    remote_path: str
    ssh_known_hosts: Path | None = None
    #: optional: a file that must exist in ``remote_path`` (proves the NAS volume is mounted),
    #: as ``mount_marker``; None: only a missing ``remote_path`` reads as unreachable
    remote_marker: str | None = None

    _expand = field_validator("ssh_key_path", "ssh_known_hosts", mode="before")(expand_path)

    @field_validator("ssh_target")
    @classmethod
    def _user_at_host(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._][A-Za-z0-9._-]*@[A-Za-z0-9.:\[\]_-]+", value):
            raise ValueError(f"{value!r} is not user@host")
        return value

    @field_validator("remote_marker")
    @classmethod
    def _marker(cls, value: str | None) -> str | None:
        return None if value is None else _marker_name(value, "remote_path")

    @field_validator("remote_path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"{value!r} must be an absolute path on the remote host")
        return value.rstrip("/") or "/"

    @property
    def remote_root(self) -> str:
        return self.remote_path


class RcloneTransportConfig(_TransportBase):
    """Any backend rclone speaks (sftp, S3, SMB, WebDAV, ...)."""

    type: Literal["rclone"]
    rclone_remote: str
    rclone_remote_path: str = ""
    rclone_config: Path | None = None
    #: optional, as rsync_ssh's ``remote_marker``: a file that must exist in ``rclone_remote_path``
    remote_marker: str | None = None

    _expand = field_validator("rclone_config", mode="before")(expand_path)

    @field_validator("remote_marker")
    @classmethod
    def _marker(cls, value: str | None) -> str | None:
        return None if value is None else _marker_name(value, "rclone_remote_path")

    @field_validator("rclone_remote")
    @classmethod
    def _remote_name(cls, value: str) -> str:
        value = value.rstrip(":")
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_. -]*", value):
            raise ValueError(f"{value!r} is not an rclone remote name")
        return value

    @property
    def remote_root(self) -> str:
        return f"{self.rclone_remote}:{self.rclone_remote_path}"


TransportConfig = Annotated[
    MountTransportConfig | RsyncSshTransportConfig | RcloneTransportConfig,
    Field(discriminator="type"),
]


class EquipmentConfig(_Model):
    """One instrument: where its runs live and how they reach the NAS."""

    id: str
    label: str = ""
    local_root: Path
    nas_root: str = ""
    completeness_signal: Literal["sentinel_file", "manifest", "none"] = "sentinel_file"
    sentinel_filename: str = "acquisition_complete.flag"
    manifest_filename: str = "run_manifest.json"
    transport: TransportConfig

    _expand = field_validator("local_root", mode="before")(expand_path)

    @field_validator("id")
    @classmethod
    def _id_shape(cls, value: str) -> str:
        if not EQUIPMENT_ID_RE.match(value):
            raise ValueError(f"{value!r} must match ^[A-Z][A-Z0-9_]*$ (e.g. CONFOCAL_01)")
        return value

    @field_validator("sentinel_filename", "manifest_filename")
    @classmethod
    def _file_name(cls, value: str) -> str:
        if not value or "/" in value or value in (".", ".."):
            raise ValueError("must be a plain file name")
        return value

    @property
    def equipment_root(self) -> Path:
        """``<local_root>/<id>``: the folder holding this instrument's projects."""
        return self.local_root / self.id


class CleanupConfig(_Model):
    enabled: bool = False
    min_verify_passes: int = Field(default=2, ge=1)
    min_age_hours: float = Field(default=24, ge=0)
    retain_cache: bool = True

    @field_validator("min_verify_passes")
    @classmethod
    def _passes_bound(cls, value: int) -> int:
        return int(_at_most(value, MAX_VERIFY_PASSES, str(MAX_VERIFY_PASSES)))

    @field_validator("min_age_hours")
    @classmethod
    def _age_bound(cls, value: float) -> float:
        return _at_most(value, YEAR_S / 3600, f"one year ({YEAR_S // 3600} hours)")


class SyncConfig(_Model):
    enabled: bool = True
    max_parallel_jobs: int = Field(default=2, ge=1)
    backoff_s: tuple[float, ...] = (30, 120, 480, 1800, 7200)
    audit_interval_s: float = Field(default=86400, gt=0)
    scan_interval_s: float = Field(default=30, gt=0)
    verify_max_stream_bytes: int = Field(default=1073741824, ge=0)

    @field_validator("backoff_s")
    @classmethod
    def _non_negative(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        for index, delay in enumerate(value):
            if delay < 0:
                raise ValueError(f"backoff_s[{index}] = {delay} must not be negative")
            if delay > YEAR_S:
                raise ValueError(f"backoff_s[{index}] = {_show(delay)} is too large: at most one year ({YEAR_S} s)")
        return value

    @field_validator("audit_interval_s", "scan_interval_s")
    @classmethod
    def _interval_range(cls, value: float) -> float:
        if value < MIN_INTERVAL_S:
            raise ValueError(f"{_show(value)} is too small: at least {MIN_INTERVAL_S:g} s")
        return _at_most(value, YEAR_S, f"one year ({YEAR_S} s)")

    @field_validator("max_parallel_jobs")
    @classmethod
    def _jobs_bound(cls, value: int) -> int:
        return int(_at_most(value, MAX_PARALLEL_JOBS, str(MAX_PARALLEL_JOBS)))

    @field_validator("verify_max_stream_bytes")
    @classmethod
    def _stream_bound(cls, value: int) -> int:
        return int(_at_most(value, MAX_VERIFY_STREAM_BYTES, f"{MAX_VERIFY_STREAM_BYTES} (1 PiB)"))


class ValidatorConfig(_Model):
    content_scan_max_mib: float = Field(default=5, ge=0)
    content_scan_extensions: tuple[str, ...] = (
        ".txt",
        ".md",
        ".csv",
        ".tsv",
        ".json",
        ".yaml",
        ".yml",
        ".toml",
        ".ini",
        ".cfg",
        ".conf",
        ".sh",
        ".py",
    )

    @field_validator("content_scan_extensions")
    @classmethod
    def _dotted_lower(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for ext in value:
            ext = ext.strip().lower()
            if not ext:
                raise ValueError("an extension must not be empty")
            out.append(ext if ext.startswith(".") else "." + ext)
        return tuple(out)

    @field_validator("content_scan_max_mib")
    @classmethod
    def _scan_bound(cls, value: float) -> float:
        return _at_most(value, MAX_CONTENT_SCAN_MIB, f"{MAX_CONTENT_SCAN_MIB} MiB")


def _spellings(path: Path) -> tuple[str, str]:
    """(absolute path, resolved path): the resolved one as far as the file system answers.

    Resolved with readlink alone (:func:`~exlab_wizard.fileio.real_path_by_links`): realpath's lstat
    of a share's mount point blocks for ever when the share does not answer (serve, doctor at start).
    """
    absolute = os.path.abspath(path)
    try:
        return absolute, real_path_by_links(absolute)
    except (OSError, ValueError):  # a NUL in the name, a symlink loop under strict rules
        return absolute, absolute


def _inside(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def _overlap(one: tuple[str, str], other: tuple[str, str]) -> str | None:
    """How folder ``one`` sits against ``other`` (``"is"``, ``"is inside"``, ``"holds"``); None when apart."""
    for mine, theirs in zip(one, other, strict=True):
        if mine == theirs:
            return "is"
        if _inside(mine, theirs):
            return "is inside"
        if _inside(theirs, mine):
            return "holds"
    return None


class RunOutsideRoots(ValueError):
    """A run path not inside one equipment's ``<local_root>/<id>`` both as written and with its links resolved.

    ``kind``: ``"outside_roots"`` (as written, under no equipment's folder) or
    ``"linked_away"`` (under one equipment's folder as written, but a symbolic
    link in it leads into another equipment's folder or out of every one).
    """

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def _strictly_inside(inner: str, outer: str) -> bool:
    return inner != outer and _inside(inner, outer)


def _default_state_dir() -> Path:
    return Path(os.path.expanduser("~/.local/state/exlab-wizard"))


class Config(_Model):
    equipment: tuple[EquipmentConfig, ...] = ()
    nas_cleanup: CleanupConfig = CleanupConfig()
    sync: SyncConfig = SyncConfig()
    validator: ValidatorConfig = ValidatorConfig()
    state_dir: Path = Field(default_factory=_default_state_dir)

    _expand = field_validator("state_dir", mode="before")(expand_path)

    @field_validator("state_dir")
    @classmethod
    def _folder_or_creatable(cls, value: Path) -> Path:
        # It need not exist yet, but a file in its place (or in place of a
        # parent) would fail later without naming the key.
        probe = value
        try:
            while not probe.exists() and not probe.is_symlink() and probe.parent != probe:
                probe = probe.parent
            exists = probe.exists()
        except OSError as exc:  # a name too long for the file system, a folder we may not search
            raise ValueError(f"{value} cannot be used: {exc.strerror or exc}") from None
        if exists and not probe.is_dir():
            if probe == value:
                raise ValueError(f"{value} exists and is not a folder")
            raise ValueError(f"{probe} is not a folder, so {value} cannot be created")
        return value

    @field_validator("equipment", mode="before")
    @classmethod
    def _null_equipment(cls, value: object) -> object:
        return () if value is None else value

    @model_validator(mode="after")
    def _unique_ids(self) -> Config:
        seen: dict[str, int] = {}
        for index, equipment in enumerate(self.equipment):
            if equipment.id in seen:
                raise ValueError(
                    f"equipment[{index}].id: {equipment.id!r} is already used by equipment[{seen[equipment.id]}]"
                )
            seen[equipment.id] = index
        return self

    @model_validator(mode="after")
    def _separate_folders(self) -> Config:
        """Every equipment's ``<local_root>/<id>`` apart from the others' and from every NAS place.

        A run under two equipment roots goes to whichever entry comes first
        (:meth:`equipment_for_run`), with that one's transport. A mount at or
        inside an equipment's folder (or holding it) makes the NAS copy the
        local data itself: verified against itself, then deleted by cleanup.
        Paths compared as written (absolute) and resolved (symlinks).
        """
        roots = [_spellings(eq.equipment_root) for eq in self.equipment]
        for j, later in enumerate(roots):
            for i in range(j):
                relation = _overlap(later, roots[i])
                if relation is not None:
                    raise ValueError(
                        f"equipment[{j}].local_root: {self.equipment[j].id}'s folder {later[0]} {relation}"
                        f" equipment[{i}]'s folder {roots[i][0]}; each equipment needs a <local_root>/<id>"
                        " of its own, apart from the others'"
                    )
        for j, equipment in enumerate(self.equipment):
            if equipment.transport.type != "mount":
                continue
            mount = _spellings(equipment.transport.mount_path)
            for i, root in enumerate(roots):
                relation = _overlap(mount, root)
                if relation is not None:
                    raise ValueError(
                        f"equipment[{j}].transport.mount_path: {mount[0]} {relation} equipment[{i}]'s local"
                        f" folder {root[0]}: the NAS copy would be the local data itself, and cleanup would"
                        " delete the only copy; mount the share apart from the local data"
                    )
        return self

    def equipment_by_id(self, equipment_id: str) -> EquipmentConfig:
        for equipment in self.equipment:
            if equipment.id == equipment_id:
                return equipment
        raise KeyError(equipment_id)

    def equipment_for_run(self, run_path: Path) -> EquipmentConfig | None:
        """The equipment whose ``<local_root>/<id>`` contains ``run_path``."""
        run = Path(os.path.abspath(run_path))
        for equipment in self.equipment:
            root = Path(os.path.abspath(equipment.equipment_root))
            if run != root and run.is_relative_to(root):
                return equipment
        return None

    def equipment_holding(self, run_path: Path | str, *, strict: bool = False) -> tuple[Path, EquipmentConfig]:
        """The run (absolute, as written) and the equipment whose ``<local_root>/<id>`` holds it, links resolved too.

        The one check of the CLI, the API, the watcher and the workers: a path
        under one equipment's folder as written whose symbolic links lead into
        another equipment's folder is that one's (``linked_away``: sent or
        deleted as the first's, its data would never reach its own NAS
        folder). A link at the equipment folder itself is followed on both
        sides (a data disk linked in as ``<local_root>/<id>`` is fine); a link
        out of every equipment's folder (a project moved to another disk, a
        link left behind) is the run's own place, except with ``strict`` (the
        HTTP API: no link leads a web request out of the equipment folders).
        Raises :class:`RunOutsideRoots` otherwise, naming both places.
        """
        written = os.path.abspath(run_path)
        equipment = self.equipment_for_run(Path(written))
        if equipment is None:
            raise RunOutsideRoots(
                f"{written} is not under any configured equipment's <local_root>/<id>", "outside_roots"
            )
        try:
            real = os.path.realpath(written)
        except (OSError, ValueError):
            real = None
        if real is not None and _strictly_inside(real, _spellings(equipment.equipment_root)[1]):
            return Path(written), equipment
        other = next(
            (
                eq
                for eq in self.equipment
                if real is not None and _strictly_inside(real, _spellings(eq.equipment_root)[1])
            ),
            None,
        )
        if other is None and real is not None and not strict:
            return Path(written), equipment
        where = (
            f"inside {other.id}'s folder {other.equipment_root}: it is {other.id}'s, enqueue it as {real}"
            if other is not None
            else "outside every equipment's folder"
        )
        raise RunOutsideRoots(
            f"{written} is under {equipment.id}'s folder {equipment.equipment_root} as written, but a symbolic"
            f" link on the way leads to {real or '(a path that cannot be resolved)'}, {where}",
            "linked_away",
        )

    @property
    def queue_db(self) -> Path:
        return self.state_dir / "queue.db"
