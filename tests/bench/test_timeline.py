"""``bench/timeline.py``: an engine run's tool timeline, read from equipment log lines as the engine writes them."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import pytest

from exlab_wizard.sync.equipment_log import format_log_line

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import timeline

T0 = dt.datetime(2026, 12, 6, 13, 44, 17, 807000, tzinfo=dt.UTC)
RUN = "/lab/EQ_01/PROJ-0001/Runs/Run 1 (a space)"  # written JSON-quoted


def _line(at: float, event: str, **fields: object) -> str:
    return format_log_line("info", RUN, event, fields, now=T0 + dt.timedelta(seconds=at))


def _log() -> str:
    return "".join(
        [
            _line(-5.0, "verified", job="older"),  # an earlier run's lines before this one's enqueue
            _line(0.0, "enqueued", job="j"),
            _line(0.02, "transfer_start", job="j", attempt=1),
            _line(0.33, "tool_exit", tool="rsync", step="claim", rc=0, seconds=0.06),
            _line(1.34, "tool_exit", tool="rsync", step="push", rc=0, seconds=1.01),
            _line(1.34, "transfer_done", job="j", files=3),
            _line(1.92, "tool_exit", tool="ssh", step="remote_hash:python3-openssl", rc=0, seconds=0.56),
            _line(2.0, "verified", job="j"),
            _line(2.3, "tool_exit", tool="rsync", step="push_metadata", rc=0, seconds=0.06),  # after: not shown
        ]
    )


def test_rows_from_enqueue_to_verified() -> None:
    rows = timeline.rows(_log())
    assert [row.what for row in rows] == [
        "enqueued",
        "transfer_start",
        "rsync claim",
        "rsync push",
        "transfer_done",
        "ssh remote_hash:python3-openssl",
        "verified",
    ]
    claim = rows[2]
    assert claim.start == pytest.approx(0.27) and claim.end == pytest.approx(0.33)
    assert rows[-1].start == pytest.approx(2.0)


def test_table_shows_the_untimed_gaps() -> None:
    lines = timeline.table(timeline.rows(_log()))
    claim = next(line for line in lines if "rsync claim" in line)
    assert claim.split("|")[3].strip() == "0.06" and claim.split("|")[5].strip() == "0.25 s"  # 0.02 -> 0.27
    push = next(line for line in lines if "rsync push" in line)
    assert push.split("|")[5].strip() == ""  # it began as the claim ended


def test_a_run_that_never_verified_has_no_timeline() -> None:
    assert timeline.rows(_log().replace(" verified job=j", " failed job=j")) == []
    assert timeline.rows("garbage\n\n") == []


def test_appended_reads_only_what_the_run_wrote(tmp_path: Path) -> None:
    log = tmp_path / "wizard.host.log"
    log.write_text(_line(-5.0, "enqueued", job="older"))
    before = timeline.offsets(tmp_path)
    with log.open("a") as handle:
        handle.write(_log())
    assert timeline.appended(tmp_path, before) == _log()
