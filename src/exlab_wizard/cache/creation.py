"""``<run>/.exlab-wizard/creation.json``: the run's provenance and sync record.

:class:`CreationJson` is a typed, read-only view of the file that keeps every
key, known or not (``raw``). :class:`CreationWriter` changes the file: each
change is a read-modify-write of the whole object under the sidecar lock file
``creation.json.lock`` (shared with any other tool that writes the file),
written atomically, so two writers never lose each other's update and a crash
leaves the old file or the new one. Writers change only the keys they mean to
change; every other key, its value and the key order survive.

Example::

    writer = CreationWriter()
    writer.set_sync_status(run, "synced")
    entry = writer.append_override(run, problem_class="reserved_filesystem_name",
                                   operator="asmith", reason="instrument names it AUX")
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from exlab_wizard.cache.atomic import (
    CacheError,
    CacheErrorKind,
    FileLock,
    LockTimeout,
    atomic_write_bytes,
    read_regular_file,
)
from exlab_wizard.fileio import METADATA_DIR, make_dirs_durable, remove_stale_temps

__all__ = [
    "CREATION_MAX_BYTES",
    "CREATION_NAME",
    "LOCK_SUFFIX",
    "METADATA_DIR",
    "SUPPORTED_MAJOR",
    "SYNC_STATUSES",
    "CacheError",
    "CacheErrorKind",
    "CreationJson",
    "CreationWriter",
    "LockTimeout",
    "creation_lock_path",
    "creation_path",
    "encode_creation",
]

CREATION_NAME = "creation.json"
LOCK_SUFFIX = ".lock"
SUPPORTED_MAJOR = 1
SYNC_STATUSES = ("pending", "synced", "failed", "blocked_by_validation")
_SCHEMA_RE = re.compile(r"^([0-9]+)\.([0-9]+)$")
_BOM = b"\xef\xbb\xbf"
# A real creation.json is a few KiB, even with a long override history; a
# bigger file is not one the engine will load into memory.
CREATION_MAX_BYTES = 16 * 1024 * 1024


def creation_path(run_path: Path) -> Path:
    """``<run>/.exlab-wizard/creation.json``."""
    return Path(run_path) / METADATA_DIR / CREATION_NAME


def creation_lock_path(run_path: Path) -> Path:
    """The sidecar lock file ``<run>/.exlab-wizard/creation.json.lock``."""
    return Path(run_path) / METADATA_DIR / (CREATION_NAME + LOCK_SUFFIX)


class _KnownFields(msgspec.Struct, forbid_unknown_fields=False):
    # The fields the engine reads, type-checked; everything else stays in ``raw``.
    level: str | None = None
    run_kind: str | None = None
    paths: dict[str, Any] | None = None
    sync_status: str | None = None
    validation_overrides: list[dict[str, Any]] | None = None
    rendered_files: list[str] | None = None


def encode_creation(raw: dict[str, Any]) -> bytes:
    """The bytes a writer stores: indented JSON, UTF-8, key order kept, final newline.

    Raises ``ValueError`` / ``TypeError`` for a value JSON cannot hold.
    """
    return (json.dumps(raw, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


class CreationJson(msgspec.Struct, frozen=True):
    """A decoded creation.json.

    Typed fields for what the engine reads; ``raw`` is the whole decoded object
    (unknown keys and key order included). ``paths`` is ``{}`` and
    ``validation_overrides`` is ``[]`` when the file lacks them (or holds
    ``null``); ``rendered_files`` stays ``None`` when absent, because "absent"
    and "empty" mean different things to the content scan. Treat the view as
    read-only: change the file through :class:`CreationWriter`.
    """

    schema_version: str
    level: str | None
    run_kind: str | None
    paths: dict[str, Any]
    sync_status: str | None
    validation_overrides: list[dict[str, Any]]
    rendered_files: list[str] | None
    raw: dict[str, Any]

    @classmethod
    def from_bytes(cls, data: bytes, source: Path | str | None = None) -> CreationJson:
        """Decode and validate the bytes of a creation.json.

        ``source`` names the file in error messages. A leading UTF-8 BOM is
        tolerated. Raises :class:`CacheError` with kind ``malformed`` (not
        JSON, nested too deeply, not an object, a known field of the wrong
        type) or
        ``unsupported_schema`` (``schema_version`` missing, not "MAJOR.MINOR",
        or a major other than 1).
        """
        name = str(source) if source is not None else CREATION_NAME
        data = bytes(data)
        if data.startswith(_BOM):
            data = data[len(_BOM) :]
        try:
            raw = msgspec.json.decode(data)
        except msgspec.MsgspecError as exc:
            raise CacheError(CacheErrorKind.MALFORMED, f"{name} is not valid JSON: {exc}", source) from exc
        except RecursionError as exc:
            raise _too_deep(name, source) from exc
        if not isinstance(raw, dict):
            raise CacheError(
                CacheErrorKind.MALFORMED,
                f"{name} must hold a JSON object, not {type(raw).__name__}",
                source,
            )
        return cls.from_raw(raw, source)

    @classmethod
    def from_raw(cls, raw: dict[str, Any], source: Path | str | None = None) -> CreationJson:
        """Validate an already decoded object; same errors as :meth:`from_bytes`."""
        name = str(source) if source is not None else CREATION_NAME
        version = _check_schema_version(raw, name, source)
        try:
            known = msgspec.convert(raw, _KnownFields)
        except msgspec.ValidationError as exc:
            raise CacheError(CacheErrorKind.MALFORMED, f"{name} is malformed: {exc}", source) from exc
        except RecursionError as exc:
            raise _too_deep(name, source) from exc
        return cls(
            schema_version=version,
            level=known.level,
            run_kind=known.run_kind,
            paths=known.paths if known.paths is not None else {},
            sync_status=known.sync_status,
            validation_overrides=known.validation_overrides if known.validation_overrides is not None else [],
            rendered_files=known.rendered_files,
            raw=raw,
        )

    def get(self, key: str, default: Any = None) -> Any:
        """A top-level key of the file, known or not."""
        return self.raw.get(key, default)


def _too_deep(name: str, source: Path | str | None) -> CacheError:
    return CacheError(CacheErrorKind.MALFORMED, f"{name} is not usable JSON: nested too deeply", source)


def _check_schema_version(raw: dict[str, Any], name: str, source: Path | str | None) -> str:
    if "schema_version" not in raw:
        raise CacheError(CacheErrorKind.UNSUPPORTED_SCHEMA, f"{name} has no schema_version", source)
    version = raw["schema_version"]
    if not isinstance(version, str) or not _SCHEMA_RE.match(version):
        raise CacheError(
            CacheErrorKind.UNSUPPORTED_SCHEMA,
            f'{name}: schema_version {json.dumps(version, ensure_ascii=False)} is not "MAJOR.MINOR"',
            source,
        )
    major = int(_SCHEMA_RE.match(version).group(1))  # type: ignore[union-attr]
    if major != SUPPORTED_MAJOR:
        raise CacheError(
            CacheErrorKind.UNSUPPORTED_SCHEMA,
            f"{name}: schema_version {version} is not supported (major must be {SUPPORTED_MAJOR})",
            source,
        )
    return version


def _utc_iso(moment: dt.datetime) -> str:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"timestamp {moment.isoformat()} has no time zone; pass an aware datetime")
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _require_text(name: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, not {value!r}")
    return value


class CreationWriter:
    """Reads and changes creation.json files; thread- and process-safe.

    Every change goes through :meth:`update`: take the lock
    (``lock_timeout_seconds``), re-read the file, apply the change to the raw
    object, validate, write atomically. All methods are synchronous (call them
    through ``asyncio.to_thread`` from async code) and raise
    :class:`CacheError`: ``malformed`` / ``unsupported_schema`` /
    ``not_regular_file`` / ``too_large`` when the file on disk cannot be used
    (it is then never overwritten), ``lock_timeout``, or ``io``. Invalid
    arguments raise ``ValueError``.

    A run folder that does not exist is an ``io`` error; its ``.exlab-wizard``
    folder is created when missing.
    """

    def __init__(self, lock_timeout_seconds: float = 10.0):
        self.lock_timeout_seconds = float(lock_timeout_seconds)

    # -- reading -----------------------------------------------------------

    def read(self, run_path: Path) -> CreationJson | None:
        """The run's creation.json, or ``None`` when it has none. Takes no lock:
        writes are atomic renames, so a reader sees a whole file.

        Only a regular file of at most :data:`CREATION_MAX_BYTES` is read; a
        symbolic link is never followed. Anything else raises
        :class:`CacheError` (``not_regular_file``, ``too_large``, ``io``,
        ``malformed``, ``unsupported_schema``).
        """
        path = creation_path(run_path)
        data = self._read_bytes(path)
        return None if data is None else CreationJson.from_bytes(data, path)

    @staticmethod
    def _read_bytes(path: Path) -> bytes | None:
        return read_regular_file(path, CREATION_MAX_BYTES)

    # -- the primitive -----------------------------------------------------

    def update(self, run_path: Path, mutate: Callable[[dict[str, Any]], None]) -> CreationJson:
        """Apply ``mutate`` to the file's raw object and store the result.

        Under the lock: decode the current file (``{}`` when absent), call
        ``mutate(raw)`` which changes the dict in place, then validate and
        write it atomically. A file this call creates gets
        ``schema_version: "1.0"`` first when ``mutate`` did not set one. When
        the change leaves the object as it was, nothing is written. If
        ``mutate`` raises, its exception propagates and the file is untouched;
        the same holds when the result is not a valid creation.json.

        Returns the view of what is now on disk.
        """
        run_path = Path(run_path)
        path = creation_path(run_path)
        self._ensure_metadata_dir(run_path)
        with FileLock(creation_lock_path(run_path), self.lock_timeout_seconds):
            data = self._read_bytes(path)
            existed = data is not None
            if existed:
                before = CreationJson.from_bytes(data, path)  # type: ignore[arg-type]
                raw = before.raw
                unchanged = _encode_checked(raw, path)
            else:
                raw, unchanged = {}, None
            mutate(raw)
            if not isinstance(raw, dict):
                raise TypeError("mutate must change the dict in place")
            if not existed and "schema_version" not in raw:
                raw = {"schema_version": f"{SUPPORTED_MAJOR}.0", **raw}
            new = _encode_checked(raw, path)
            view = CreationJson.from_bytes(new, path)
            # Under the lock every other temp of this file is a killed writer's leftover: never kept, never pushed.
            remove_stale_temps(path)
            if new == unchanged:
                return view
            try:
                atomic_write_bytes(path, new)
            except OSError as exc:
                raise CacheError(CacheErrorKind.IO, f"{path}: cannot write: {exc.strerror or exc}", path) from exc
            return view

    @staticmethod
    def _ensure_metadata_dir(run_path: Path) -> None:
        if not run_path.is_dir():
            raise CacheError(CacheErrorKind.IO, f"{run_path}: run folder does not exist", run_path)
        folder = run_path / METADATA_DIR
        try:
            make_dirs_durable(folder)  # its entry in the run folder survives a power cut
        except OSError as exc:
            raise CacheError(CacheErrorKind.IO, f"{folder}: cannot create: {exc.strerror or exc}", folder) from exc

    # -- the changes the engine makes --------------------------------------

    def set_sync_status(self, run_path: Path, status: str) -> CreationJson:
        """Set ``sync_status`` (one of ``SYNC_STATUSES``, else ``ValueError``)."""
        if status not in SYNC_STATUSES:
            raise ValueError(f"sync_status must be one of {', '.join(SYNC_STATUSES)}, not {status!r}")

        def mutate(raw: dict[str, Any]) -> None:
            raw["sync_status"] = str(status)

        return self.update(run_path, mutate)

    def append_override(
        self,
        run_path: Path,
        *,
        problem_class: str,
        operator: str,
        reason: str,
        expires_at: dt.datetime | None = None,
        path: str | None = None,
    ) -> dict[str, Any]:
        """Append an override of the hard rule ``problem_class`` and return the entry.

        ``{"id": <uuid4>, "problem_class", "operator", "recorded_at": <UTC ISO>,
        "expires_at": <UTC ISO> | null, "reason", "revoked": false}``, plus
        ``"path"`` when given (the finding's path that prompted it: a note for
        people; the override still covers the rule for the whole run).
        ``expires_at`` must be time-zone aware (``ValueError`` otherwise).
        """
        _require_text("problem_class", problem_class)
        _require_text("operator", operator)
        if not isinstance(reason, str):
            raise ValueError(f"reason must be a string, not {reason!r}")
        entry: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "problem_class": problem_class,
            "operator": operator,
            "recorded_at": _utc_iso(dt.datetime.now(dt.UTC)),
            "expires_at": _utc_iso(expires_at) if expires_at is not None else None,
            "reason": reason,
            "revoked": False,
        }
        if path is not None:
            entry["path"] = _require_text("path", path)
        self.update(run_path, lambda raw: _overrides_list(raw, run_path).append(dict(entry)))
        return entry

    def append_tombstone(self, run_path: Path, *, revokes: str, operator: str, reason: str) -> dict[str, Any]:
        """Append a tombstone revoking the override ``revokes`` and return it.

        ``{"id": <uuid4>, "revokes", "operator", "recorded_at", "reason",
        "revoked": true}``. Raises ``ValueError`` (writing nothing) when no
        override in the file has that id, so a mistyped id is never recorded
        as a revocation that revokes nothing.
        """
        _require_text("revokes", revokes)
        _require_text("operator", operator)
        if not isinstance(reason, str):
            raise ValueError(f"reason must be a string, not {reason!r}")
        entry: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "revokes": revokes,
            "operator": operator,
            "recorded_at": _utc_iso(dt.datetime.now(dt.UTC)),
            "reason": reason,
            "revoked": True,
        }

        def mutate(raw: dict[str, Any]) -> None:
            entries = _overrides_list(raw, run_path)
            known = {
                e.get("id")
                for e in entries
                if isinstance(e, dict) and "revokes" not in e and e.get("revoked") is not True
            }
            if revokes not in known:
                raise ValueError(f"{creation_path(run_path)}: no override with id {revokes!r} to revoke")
            entries.append(dict(entry))

        self.update(run_path, mutate)
        return entry

    def ensure_minimal(self, run_path: Path, *, local_path: str, nas_path: str | None) -> CreationJson:
        """Give a run with no creation.json the minimal one; leave an existing file as it is.

        The minimal file: ``schema_version "1.0"``, ``level "run"``,
        ``paths {local, nas}``, ``sync_status "pending"``, ``created_by
        "exlab-sync"``. Returns the file now on disk.
        """

        def mutate(raw: dict[str, Any]) -> None:
            if raw:
                return
            raw.update(
                {
                    "schema_version": f"{SUPPORTED_MAJOR}.0",
                    "level": "run",
                    "paths": {"local": str(local_path), "nas": None if nas_path is None else str(nas_path)},
                    "sync_status": "pending",
                    "created_by": "exlab-sync",
                }
            )

        return self.update(run_path, mutate)

    def record(self, run_path: Path, key: str, value: Any) -> CreationJson:
        """Set one top-level key to a JSON value (e.g. ``local_cleaned``)."""
        _require_text("key", key)

        def mutate(raw: dict[str, Any]) -> None:
            raw[key] = value

        return self.update(run_path, mutate)


def _encode_checked(raw: dict[str, Any], path: Path) -> bytes:
    try:
        return encode_creation(raw)
    except (TypeError, ValueError) as exc:
        raise CacheError(
            CacheErrorKind.MALFORMED, f"{path}: the change holds a value JSON cannot store: {exc}", path
        ) from exc
    except RecursionError as exc:
        raise _too_deep(str(path), path) from exc


def _overrides_list(raw: dict[str, Any], run_path: Path) -> list[Any]:
    entries = raw.get("validation_overrides")
    if entries is None:
        entries = raw["validation_overrides"] = []
    if not isinstance(entries, list):  # from_bytes already refused this; kept for from_raw callers
        raise CacheError(
            CacheErrorKind.MALFORMED,
            f"{creation_path(run_path)}: validation_overrides is not a list",
            creation_path(run_path),
        )
    return entries
