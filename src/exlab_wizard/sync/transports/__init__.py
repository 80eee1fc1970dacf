"""Transports: how a run reaches the NAS (mount, rsync over ssh, rclone).

``make_transport(equipment)`` builds the one the equipment's config names,
with one clock (``now``) that every transport reads to follow the bandwidth
schedule.
"""

from __future__ import annotations

from exlab_wizard.config.models import EquipmentConfig
from exlab_wizard.sync.equipment_log import EquipmentLog
from exlab_wizard.sync.transports.base import (
    Clock,
    NasNotAnswering,
    RemoteFile,
    RemoteManifest,
    Transport,
    TransportCapabilities,
    TransportError,
    TransportErrorKind,
    TransportResult,
    local_now,
    remote_relpath,
)

__all__ = [
    "Clock",
    "NasNotAnswering",
    "RemoteFile",
    "RemoteManifest",
    "Transport",
    "TransportCapabilities",
    "TransportError",
    "TransportErrorKind",
    "TransportResult",
    "local_now",
    "make_transport",
    "remote_relpath",
]


def make_transport(
    equipment: EquipmentConfig,
    *,
    log: EquipmentLog | None = None,
    verify_max_stream_bytes: int = 1 << 30,
    now: Clock = local_now,
) -> Transport:
    """The transport named by ``equipment.transport.type``, bound to that equipment.

    ``now``: the clock the transport reads to follow the bandwidth schedule
    mid-transfer (an aware datetime; default this workstation's local time).
    Tests and the client pass their own.
    """
    kind = equipment.transport.type
    if kind == "mount":
        from exlab_wizard.sync.transports.mount import MountTransport

        return MountTransport(equipment, log=log, now=now)
    if kind == "rsync_ssh":
        from exlab_wizard.sync.transports.rsync_ssh import RsyncSshTransport

        return RsyncSshTransport(equipment, log=log, now=now, verify_max_stream_bytes=verify_max_stream_bytes)
    if kind == "rclone":
        from exlab_wizard.sync.transports.rclone import RcloneTransport

        return RcloneTransport(equipment, log=log, now=now, verify_max_stream_bytes=verify_max_stream_bytes)
    raise ValueError(f"unknown transport type {kind!r}")
