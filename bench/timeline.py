"""Where one engine run's time went, read from its equipment log.

The engine logs every tool it runs (``tool_start``/``tool_exit`` with its
seconds) and its steps (``transfer_start``, ``remote_manifest``, ``verified``,
...) in ``<local_root>/<id>/.exlab-wizard/wizard.<host>.log``. A benchmark
notes the log's size before a run (:func:`offsets`) and keeps what the run
appended (:func:`appended`); :func:`rows` turns that into a timeline from the
``enqueued`` line to the ``verified`` one, and :func:`table` into Markdown.
py-spy shows a network transport's process mostly waiting for its tools; this
shows for which ones, and for how long.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Row", "appended", "offsets", "rows", "table"]

#: the engine's own steps shown in the timeline (every tool_exit is shown too)
STEPS = ("enqueued", "transfer_start", "push_done", "transfer_done", "remote_manifest", "verified")
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


@dataclass(frozen=True)
class Row:
    """One line of the timeline: ``start``/``end`` in seconds after ``enqueued`` (equal for a step)."""

    start: float
    end: float
    what: str


def offsets(folder: Path) -> dict[Path, int]:
    """The size of every equipment log in ``folder`` now."""
    return {log: log.stat().st_size for log in folder.glob("wizard.*.log")}


def appended(folder: Path, before: dict[Path, int]) -> str:
    """What the equipment logs in ``folder`` gained since ``before``."""
    text = []
    for log in sorted(folder.glob("wizard.*.log")):
        with log.open("rb") as handle:
            handle.seek(before.get(log, 0))
            text.append(handle.read().decode("utf-8", "replace"))
    return "".join(text)


def _parse(line: str) -> tuple[dt.datetime, str, dict[str, str]] | None:
    """(time, event, fields) of one log line; the run path (JSON-quoted when it holds a space) is skipped."""
    stamp, _sp, rest = line.partition(" ")
    _level, _sp, rest = rest.partition(" ")
    try:
        when = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        if rest.startswith('"'):
            _path, end = json.JSONDecoder().raw_decode(rest)
            rest = rest[end:].lstrip(" ")
        else:
            rest = rest.partition(" ")[2]
    except ValueError:
        return None
    event, _sp, fields = rest.partition(" ")
    return (when, event, dict(_FIELD.findall(fields))) if event else None


def rows(log: str) -> list[Row]:
    """The run's timeline, from its first ``enqueued`` line to its first ``verified`` one ([] without them)."""
    parsed = [p for p in map(_parse, log.splitlines()) if p is not None]
    start = next((when for when, event, _f in parsed if event == "enqueued"), None)
    if start is None:
        return []
    out: list[Row] = []
    for when, event, fields in parsed:
        at = (when - start).total_seconds()
        if at < 0:
            continue
        if event == "tool_exit":
            seconds = float(fields.get("seconds", "0"))
            out.append(Row(max(0.0, at - seconds), at, f"{fields.get('tool', '?')} {fields.get('step', '')}".strip()))
        elif event in STEPS:
            out.append(Row(at, at, event))
        if event == "verified":
            return sorted(out, key=lambda row: (row.start, row.end))
    return []


def table(timeline: list[Row]) -> list[str]:
    """Markdown: each tool run and step, with the time before it in which no tool ran (the engine's
    own work, or a tool it runs unlogged: the NAS listing before the claim)."""
    lines = ["| from | to | seconds | tool run or step | untimed before it |", "|---|---|---|---|---|"]
    busy_until = 0.0
    for row in timeline:
        gap = row.start - busy_until
        seconds = f"{row.end - row.start:.2f}" if row.end > row.start else ""
        lines.append(
            f"| {row.start:.2f} | {row.end:.2f} | {seconds} | {row.what} | {f'{gap:.2f} s' if gap >= 0.02 else ''} |"
        )
        busy_until = max(busy_until, row.end)
    return lines
