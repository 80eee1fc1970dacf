"""The run's metadata cache: ``<run>/.exlab-wizard/creation.json``.

:class:`CreationWriter` reads and changes the file (locked, atomic, keeping
every key it does not mean to change); :class:`CreationJson` is the typed view;
:class:`CacheError` (with :class:`CacheErrorKind`) is the one error it raises.
"""

from __future__ import annotations

from exlab_wizard.cache.atomic import FileLock, atomic_write_bytes
from exlab_wizard.cache.creation import (
    CREATION_NAME,
    SYNC_STATUSES,
    CacheError,
    CacheErrorKind,
    CreationJson,
    CreationWriter,
    LockTimeout,
    creation_lock_path,
    creation_path,
)

__all__ = [
    "CREATION_NAME",
    "SYNC_STATUSES",
    "CacheError",
    "CacheErrorKind",
    "CreationJson",
    "CreationWriter",
    "FileLock",
    "LockTimeout",
    "atomic_write_bytes",
    "creation_lock_path",
    "creation_path",
]
