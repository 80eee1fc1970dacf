"""The equipment log: one append-only text file per equipment and host.

``<local_root>/<id>/.exlab-wizard/wizard.<hostname>.log``, one line per event:
``<UTC ISO time> <LEVEL> <run path> <event> key=value ...``. Values holding
spaces, quotes or newlines are JSON-quoted so every event stays one line.

The log is a human-readable trail on the instrument's own disk; the durable
records are the queue's. A line that cannot be written (a full, read-only or
failing disk) is dropped, never raised: the engine's work, above all the
cleanup that frees that very disk, goes on, and the central log says so.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from exlab_wizard.config.models import EquipmentConfig
from exlab_wizard.fileio import METADATA_DIR, make_dirs_durable

__all__ = ["UNWRITABLE_REPORT_INTERVAL_S", "EquipmentLog", "format_log_line", "log_path_for"]

logger = logging.getLogger(__name__)

#: The central log says an equipment log cannot be written at most once in this many seconds
#: per log file (and again when the reason changes, and once when it can be written again).
UNWRITABLE_REPORT_INTERVAL_S = 3600.0

_LOCK = threading.Lock()
_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-/:+@,=")


def log_path_for(equipment: EquipmentConfig) -> Path:
    return equipment.equipment_root / METADATA_DIR / f"wizard.{socket.gethostname()}.log"


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if text and all(ch in _SAFE for ch in text):
        return text
    return json.dumps(text, ensure_ascii=False)


def format_log_line(
    level: str, run_path: object, event: str, fields: dict[str, object], now: dt.datetime | None = None
) -> str:
    stamp = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).isoformat(timespec="milliseconds")
    stamp = stamp.replace("+00:00", "Z")
    parts = [stamp, level.upper(), _value(run_path if run_path is not None else "-"), event]
    parts.extend(f"{key}={_value(val)}" for key, val in fields.items())
    return " ".join(parts) + "\n"


@dataclass
class _Unwritable:
    """One log file that cannot be written now: why, since when, and what the central log was told."""

    reason: str
    errno: int | None
    reported_at: float
    lost: int = 0  # lines dropped that no report counted yet
    partial: bool = False  # the last line was cut short: the next one starts on a new line


#: Log files whose last write failed, by path (shared by every EquipmentLog of one file). Under _LOCK.
_UNWRITABLE: dict[Path, _Unwritable] = {}


class EquipmentLog:
    """Append events for one equipment. Thread-safe; each line is one ``write``.

    A write never raises: a line that cannot be written (``OSError``: no
    space, read-only, I/O error, permission) is dropped and reported through
    the central log (:data:`UNWRITABLE_REPORT_INTERVAL_S`). ``write`` returns
    whether the line was written; :attr:`last_error` holds why the last one
    was not (None after a line written).
    """

    def __init__(self, equipment: EquipmentConfig):
        self.equipment = equipment
        self.path = log_path_for(equipment)
        self.last_error: str | None = None

    def write(self, level: str, run_path: object, event: str, **fields: object) -> bool:
        # A file name byte that is not UTF-8 (a lone surrogate) can only sit in a
        # JSON-quoted value: written as the JSON escape \udcXX, the line stays
        # UTF-8 and json.loads gives the name back.
        line = format_log_line(level, run_path, event, fields).encode("utf-8", "backslashreplace")
        with _LOCK:
            trouble = _UNWRITABLE.get(self.path)
            if trouble is not None and trouble.partial:
                line = b"\n" + line
            written = 0
            try:
                make_dirs_durable(self.path.parent)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    while written < len(line):  # a nearly full disk may take part of it
                        taken = os.write(fd, line[written:])
                        if taken <= 0:
                            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                        written += taken
                finally:
                    os.close(fd)
            except OSError as exc:
                cut = 0 < written < len(line) or (not written and trouble is not None and trouble.partial)
                self._failed(exc, partial=cut)
                return False
            self.last_error = None
            if trouble is not None:
                del _UNWRITABLE[self.path]
                logger.info(
                    "equipment log %s written again (%d more lines were dropped after the last report)",
                    self.path,
                    trouble.lost,
                )
            return True

    def _failed(self, exc: OSError, *, partial: bool) -> None:
        """Under _LOCK: remember why, and tell the central log unless it was told lately."""
        reason = exc.strerror or str(exc)
        self.last_error = reason
        now = time.monotonic()
        trouble = _UNWRITABLE.get(self.path)
        if trouble is None:
            _UNWRITABLE[self.path] = _Unwritable(reason, exc.errno, now, partial=partial)
            logger.warning(
                "equipment log %s unwritable: %s (its lines are dropped until it can be written again; "
                "the queue keeps the records)",
                self.path,
                reason,
            )
            return
        trouble.partial = partial
        if exc.errno == trouble.errno and now - trouble.reported_at < UNWRITABLE_REPORT_INTERVAL_S:
            trouble.lost += 1
            return
        logger.warning(
            "equipment log %s still unwritable: %s (%d lines dropped since the last report)",
            self.path,
            reason,
            trouble.lost + 1,
        )
        trouble.reason, trouble.errno, trouble.reported_at, trouble.lost = reason, exc.errno, now, 0

    def info(self, run_path: object, event: str, **fields: object) -> bool:
        return self.write("INFO", run_path, event, **fields)

    def warning(self, run_path: object, event: str, **fields: object) -> bool:
        return self.write("WARNING", run_path, event, **fields)

    def error(self, run_path: object, event: str, **fields: object) -> bool:
        return self.write("ERROR", run_path, event, **fields)
