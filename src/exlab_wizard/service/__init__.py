"""The long-running service: ``exlab-sync serve`` (workers, watcher, HTTP API, metrics, dashboard).

:class:`CompletionWatcher` enqueues each finished run once, by itself
(:mod:`exlab_wizard.service.watcher`).
"""

from __future__ import annotations

from exlab_wizard.service.watcher import (
    BlockedRun,
    CompletionWatcher,
    IncompleteRun,
    ScanReport,
)

__all__ = ["BlockedRun", "CompletionWatcher", "IncompleteRun", "ScanReport"]
