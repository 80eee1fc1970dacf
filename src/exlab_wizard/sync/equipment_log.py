"""The equipment log: one append-only text file per equipment and host.

``<local_root>/<id>/.exlab-wizard/wizard.<hostname>.log``, one line per event:
``<UTC ISO time> <LEVEL> <run path> <event> key=value ...``. Values holding
spaces, quotes or newlines are JSON-quoted so every event stays one line.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
from pathlib import Path

from exlab_wizard.config.models import EquipmentConfig
from exlab_wizard.fileio import METADATA_DIR, make_dirs_durable

__all__ = ["EquipmentLog", "format_log_line", "log_path_for"]

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


class EquipmentLog:
    """Append events for one equipment. Thread-safe; each line is one ``write``."""

    def __init__(self, equipment: EquipmentConfig):
        self.equipment = equipment
        self.path = log_path_for(equipment)

    def write(self, level: str, run_path: object, event: str, **fields: object) -> None:
        # A file name byte that is not UTF-8 (a lone surrogate) can only sit in a
        # JSON-quoted value: written as the JSON escape \udcXX, the line stays
        # UTF-8 and json.loads gives the name back.
        line = format_log_line(level, run_path, event, fields).encode("utf-8", "backslashreplace")
        with _LOCK:
            make_dirs_durable(self.path.parent)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

    def info(self, run_path: object, event: str, **fields: object) -> None:
        self.write("INFO", run_path, event, **fields)

    def warning(self, run_path: object, event: str, **fields: object) -> None:
        self.write("WARNING", run_path, event, **fields)

    def error(self, run_path: object, event: str, **fields: object) -> None:
        self.write("ERROR", run_path, event, **fields)
