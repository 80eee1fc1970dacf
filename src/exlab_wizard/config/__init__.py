"""Configuration: ``load_config(path) -> Config`` and the models behind it."""

from exlab_wizard.config.loader import ConfigError, load_config, parse_config
from exlab_wizard.config.models import (
    BandwidthConfig,
    BandwidthWindow,
    CleanupConfig,
    Config,
    EquipmentConfig,
    MountTransportConfig,
    RcloneTransportConfig,
    RsyncSshTransportConfig,
    SyncConfig,
    TransportConfig,
    ValidatorConfig,
)

__all__ = [
    "BandwidthConfig",
    "BandwidthWindow",
    "CleanupConfig",
    "Config",
    "ConfigError",
    "EquipmentConfig",
    "MountTransportConfig",
    "RcloneTransportConfig",
    "RsyncSshTransportConfig",
    "SyncConfig",
    "TransportConfig",
    "ValidatorConfig",
    "load_config",
    "parse_config",
]
