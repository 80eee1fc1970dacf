"""Rich progress bars fed by the client's progress events."""

from __future__ import annotations

from typing import Any

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

__all__ = ["JobProgress", "byte_progress"]


def byte_progress(console: Any = None) -> Progress:
    """A progress display showing bytes, rate and time left."""
    return Progress(
        TextColumn("[bold]{task.description}", justify="left"),
        BarColumn(bar_width=30),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


class JobProgress:
    """One bar per job; call with each client event (``client.add_listener(jp)``)."""

    def __init__(self, progress: Progress, labels: dict[str, str] | None = None):
        self.progress = progress
        self.labels = labels or {}
        self.tasks: dict[str, TaskID] = {}

    def _label(self, event: dict[str, Any]) -> str:
        path = str(event.get("run_path", ""))
        return self.labels.get(path) or "/".join(path.rstrip("/").split("/")[-3:])

    def __call__(self, event: dict[str, Any]) -> None:
        job_id = event.get("job_id")
        if job_id is None:
            return
        if event["type"] == "progress" and event.get("phase") == "transfer":
            task = self.tasks.get(job_id)
            if task is None:
                task = self.tasks[job_id] = self.progress.add_task(self._label(event), total=event.get("total") or None)
            self.progress.update(
                task, completed=event["bytes"], total=max(event.get("total") or 0, event["bytes"]) or None
            )
        elif event["type"] == "state":
            task = self.tasks.get(job_id)
            state = event.get("state")
            if task is None and state in ("running",):
                task = self.tasks[job_id] = self.progress.add_task(self._label(event), total=None)
            if task is not None:
                label = self._label(event)
                self.progress.update(task, description=f"{label} [dim]{state}[/]")
                if state in ("verified", "failed"):
                    current = self.progress.tasks[[t.id for t in self.progress.tasks].index(task)]
                    self.progress.update(task, total=current.completed or 1, completed=current.completed or 1)
