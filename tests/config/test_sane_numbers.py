"""Every number in the config is finite and in a sane range, checked at load.

A value that loads must never overflow at run time: the largest accepted
values are fed to the code that uses them (timers, the retry policy, the
bandwidth computation) and must work there.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from exlab_wizard.config import ConfigError, load_config, parse_config
from exlab_wizard.config.models import (
    MAX_CONTENT_SCAN_MIB,
    MAX_PARALLEL_JOBS,
    MAX_UPLOAD_MBPS,
    MAX_VERIFY_PASSES,
    MAX_VERIFY_STREAM_BYTES,
    YEAR_S,
)
from exlab_wizard.sync.policy import bandwidth, retry


def config(*, bw: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    transport = {"type": "mount", "mount_path": "/mnt/nas", "bandwidth": bw or {}}
    return {"equipment": [{"id": "CONFOCAL_01", "local_root": "/data/lab", "transport": transport}], **top}


BW = "equipment[0].transport.bandwidth"
REFUSED = [
    (config(bw={"upload_mbps": float("inf")}), f"{BW}.upload_mbps"),
    (config(bw={"upload_mbps": MAX_UPLOAD_MBPS * 2}), f"{BW}.upload_mbps"),
    (config(sync={"backoff_s": [1e300]}), "sync.backoff_s"),
    (config(sync={"backoff_s": [YEAR_S + 1]}), "sync.backoff_s"),
    (config(sync={"backoff_s": [1, float("nan")]}), "sync.backoff_s[1]"),
    (config(sync={"scan_interval_s": 1e300}), "sync.scan_interval_s"),
    (config(sync={"scan_interval_s": 1e-300}), "sync.scan_interval_s"),
    (config(sync={"audit_interval_s": float("inf")}), "sync.audit_interval_s"),
    (config(sync={"audit_interval_s": YEAR_S * 2}), "sync.audit_interval_s"),
    (config(sync={"max_parallel_jobs": 10**40}), "sync.max_parallel_jobs"),
    (config(sync={"verify_max_stream_bytes": MAX_VERIFY_STREAM_BYTES + 1}), "sync.verify_max_stream_bytes"),
    (config(nas_cleanup={"min_age_hours": float("inf")}), "nas_cleanup.min_age_hours"),
    (config(nas_cleanup={"min_age_hours": 1e300}), "nas_cleanup.min_age_hours"),
    (config(nas_cleanup={"min_verify_passes": MAX_VERIFY_PASSES + 1}), "nas_cleanup.min_verify_passes"),
    (config(validator={"content_scan_max_mib": float("inf")}), "validator.content_scan_max_mib"),
    (config(validator={"content_scan_max_mib": 1e300}), "validator.content_scan_max_mib"),
]


@pytest.mark.parametrize(("data", "key"), REFUSED, ids=[key + f"#{i}" for i, (_, key) in enumerate(REFUSED)])
def test_out_of_range_numbers_are_refused_naming_the_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert any(problem.startswith(key + ": ") for problem in caught.value.problems), caught.value.problems


def test_the_largest_accepted_values_work_where_they_are_used() -> None:
    loaded = parse_config(
        config(
            bw={"upload_mbps": MAX_UPLOAD_MBPS},
            sync={
                "backoff_s": [YEAR_S],
                "scan_interval_s": YEAR_S,
                "audit_interval_s": YEAR_S,
                "max_parallel_jobs": MAX_PARALLEL_JOBS,
                "verify_max_stream_bytes": MAX_VERIFY_STREAM_BYTES,
            },
            nas_cleanup={"min_age_hours": YEAR_S / 3600, "min_verify_passes": MAX_VERIFY_PASSES},
            validator={"content_scan_max_mib": MAX_CONTENT_SCAN_MIB},
        )
    )
    now = dt.datetime.now(dt.UTC)
    # The timers and deadlines the engine computes from them do not overflow.
    assert now + dt.timedelta(seconds=loaded.sync.scan_interval_s) > now
    assert now + dt.timedelta(seconds=loaded.sync.audit_interval_s) > now
    assert now + dt.timedelta(hours=loaded.nas_cleanup.min_age_hours) > now
    decision = retry.decide("network", attempts=1, mismatch_count=0, backoff_s=loaded.sync.backoff_s, now=now)
    assert decision.next_attempt_at is not None and decision.next_attempt_at > now
    assert bandwidth.limit_kibps(loaded.equipment[0].transport.bandwidth, now) == MAX_UPLOAD_MBPS * 10**6 // 8 // 1024


def test_a_whole_day_window_is_midnight_to_midnight_and_other_equal_times_are_refused() -> None:
    whole = parse_config(config(bw={"upload_mbps": 5, "schedule": [{"days": ["sat"], "from": "00:00", "to": "00:00"}]}))
    window = whole.equipment[0].transport.bandwidth.schedule[0]
    assert window.start == window.end == dt.time(0, 0)
    with pytest.raises(ConfigError) as caught:
        parse_config(config(bw={"upload_mbps": 5, "schedule": [{"days": ["sat"], "from": "8:00", "to": "08:00"}]}))
    [problem] = caught.value.problems
    assert problem.startswith(f"{BW}.schedule[0].to: equal to from (08:00)")
    assert "leave out schedule" in problem


@pytest.mark.parametrize(
    "text",
    [
        "equipment: [{id: A, local_root: /d, transport: {type: mount, mount_path: /m}}]\n"
        "sync: {max_parallel_jobs: " + "9" * 5000 + "}\n",
        "x: " + "[" * 20000 + "]" * 20000 + "\n",
    ],
    ids=["5000-digit integer", "deeply nested"],
)
def test_yaml_that_python_cannot_hold_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems[0].startswith("<yaml>: invalid YAML")
