"""One clock, passed by make_transport to every transport, is the one the bandwidth schedule reads."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from exlab_wizard.config.models import EquipmentConfig
from exlab_wizard.sync.transports import local_now, make_transport

TRANSPORTS = {
    "mount": {"type": "mount", "mount_path": "/nas"},
    "rsync_ssh": {"type": "rsync_ssh", "ssh_target": "lab@nas", "ssh_key_path": "/k", "remote_path": "/runs"},
    "rclone": {"type": "rclone", "rclone_remote": "labnas"},
}


def _equipment(tmp_path: Path, transport: dict) -> EquipmentConfig:
    return EquipmentConfig.model_validate({"id": "EQ_1", "local_root": str(tmp_path), "transport": transport})


@pytest.mark.parametrize("kind", sorted(TRANSPORTS))
def test_make_transport_hands_every_transport_the_given_clock(tmp_path: Path, kind: str) -> None:
    def saturday() -> dt.datetime:
        return dt.datetime(2024, 1, 6, 10, 0, tzinfo=dt.UTC)

    transport = make_transport(_equipment(tmp_path, TRANSPORTS[kind]), now=saturday)
    assert transport.now is saturday
    assert make_transport(_equipment(tmp_path, TRANSPORTS[kind])).now is local_now


def test_the_default_clock_is_aware_local_time() -> None:
    now = local_now()
    assert now.tzinfo is not None and now.utcoffset() == dt.datetime.now().astimezone().utcoffset()
