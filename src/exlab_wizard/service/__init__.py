"""The long-running service: ``exlab-sync serve`` (workers, watcher, HTTP API, metrics)."""
