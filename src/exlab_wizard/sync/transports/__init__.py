"""Transports: how a run reaches the NAS (mount, rsync over ssh, rclone).

``make_transport(equipment)`` builds the one the equipment's config names.
"""

from __future__ import annotations

from exlab_wizard.config.models import EquipmentConfig
from exlab_wizard.sync.equipment_log import EquipmentLog
from exlab_wizard.sync.transports.base import (
    RemoteManifest,
    Transport,
    TransportCapabilities,
    TransportError,
    TransportErrorKind,
    TransportResult,
    remote_relpath,
)

__all__ = [
    "RemoteManifest",
    "Transport",
    "TransportCapabilities",
    "TransportError",
    "TransportErrorKind",
    "TransportResult",
    "make_transport",
    "remote_relpath",
]


def make_transport(
    equipment: EquipmentConfig,
    *,
    log: EquipmentLog | None = None,
    verify_max_stream_bytes: int = 1 << 30,
) -> Transport:
    """The transport named by ``equipment.transport.type``, bound to that equipment."""
    kind = equipment.transport.type
    if kind == "mount":
        from exlab_wizard.sync.transports.mount import MountTransport

        return MountTransport(equipment, log=log)
    if kind == "rsync_ssh":
        from exlab_wizard.sync.transports.rsync_ssh import RsyncSshTransport

        return RsyncSshTransport(equipment, log=log, verify_max_stream_bytes=verify_max_stream_bytes)
    if kind == "rclone":
        from exlab_wizard.sync.transports.rclone import RcloneTransport

        return RcloneTransport(equipment, log=log)
    raise ValueError(f"unknown transport type {kind!r}")
