"""The dashboard's pure parts: every failure kind has plain words, and figures read as people read them."""

from __future__ import annotations

import pytest

from exlab_wizard.service.dashboard import (
    FAILURE_SENTENCES,
    _nice_ceiling,
    failure_sentence,
    human_bytes,
    human_duration,
)
from exlab_wizard.sync.transports.base import TransportErrorKind


@pytest.mark.parametrize(
    "kind",
    [k.value for k in TransportErrorKind]
    + ["remote_changed_during_cleanup", "local_changed_during_cleanup", "run_folder_missing"],
)
def test_every_failure_kind_has_its_own_sentence(kind: str) -> None:
    assert kind in FAILURE_SENTENCES
    assert failure_sentence(kind) == FAILURE_SENTENCES[kind]


def test_an_unknown_or_missing_kind_is_named_not_guessed() -> None:
    assert failure_sentence("disk_on_fire") == "The job failed (disk_on_fire)."
    assert failure_sentence(None) == "The job failed without a recorded kind."


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "–"),
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (5 * 1024**3, "5.0 GiB"),
        (3 * 1024**5, "3072.0 TiB"),
    ],
)
def test_human_bytes(value: int | None, text: str) -> None:
    assert human_bytes(value) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "–"),
        (-1, "–"),
        (42, "42 s"),
        (125, "2 min 5 s"),
        (900, "15 min"),
        (3725, "1 h 2 min"),
        (3 * 86400, "3 days"),
    ],
)
def test_human_duration(seconds: float | None, text: str) -> None:
    assert human_duration(seconds) == text


@pytest.mark.parametrize(("peak", "axis"), [(0, 0), (1, 1), (700, 1000), (1025, 2048), (3 * 1024**2 + 1, 5 * 1024**2)])
def test_the_chart_axis_is_a_round_number_at_or_above_the_peak(peak: int, axis: int) -> None:
    assert _nice_ceiling(peak) == axis
