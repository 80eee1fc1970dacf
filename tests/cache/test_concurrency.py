"""Concurrent writers of one creation.json lose no update (processes and threads)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from exlab_wizard.cache import CreationWriter, creation_path

PROCESSES = 4
THREADS_PER_PROCESS = 2
UPDATES_PER_PROCESS = 26  # split across the process's threads
IN_PARENT_THREADS = 4
UPDATES_PER_PARENT_THREAD = 10

WORKER = textwrap.dedent(
    """
    import os, sys, threading, time
    from pathlib import Path
    from exlab_wizard.cache import CreationWriter

    run, go, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    threads, updates = int(sys.argv[4]), int(sys.argv[5])
    writer = CreationWriter(lock_timeout_seconds=30)
    print("ready", flush=True)
    while not go.exists():  # start all processes at once
        time.sleep(0.005)

    def work(t):
        for i in range(t, updates, threads):
            writer.update(run, lambda raw, item=f"{name}-{i}": raw.setdefault("items", []).append(item))

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    """
)


def test_no_lost_update_across_processes_and_threads(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    writer = CreationWriter(lock_timeout_seconds=30)
    writer.ensure_minimal(run, local_path=str(run), nas_path=None)
    writer.record(run, "unknown_key", {"nested": [1, 2, 3]})
    go = tmp_path / "go"

    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                str(run),
                str(go),
                f"p{n}",
                str(THREADS_PER_PROCESS),
                str(UPDATES_PER_PROCESS),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(PROCESSES)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"

        def parent_work(t: int) -> None:
            for i in range(UPDATES_PER_PARENT_THREAD):
                writer.update(run, lambda raw, item=f"parent-{t}-{i}": raw.setdefault("items", []).append(item))

        threads = [threading.Thread(target=parent_work, args=(t,)) for t in range(IN_PARENT_THREADS)]
        go.touch()
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for child in children:
            assert child.wait(timeout=60) == 0
        assert time.monotonic() - started < 30
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()

    data = json.loads(creation_path(run).read_text(encoding="utf-8"))
    expected = {f"p{n}-{i}" for n in range(PROCESSES) for i in range(UPDATES_PER_PROCESS)}
    expected |= {f"parent-{t}-{i}" for t in range(IN_PARENT_THREADS) for i in range(UPDATES_PER_PARENT_THREAD)}
    assert len(data["items"]) == len(expected)  # no lost update, no duplicate
    assert set(data["items"]) == expected
    # each writer's own items stay in the order it wrote them
    for n in range(PROCESSES):
        for t in range(THREADS_PER_PROCESS):
            mine = [
                x for x in data["items"] if x.startswith(f"p{n}-") and int(x.split("-")[1]) % THREADS_PER_PROCESS == t
            ]
            assert mine == sorted(mine, key=lambda x: int(x.split("-")[1]))
    assert data["unknown_key"] == {"nested": [1, 2, 3]}
    assert data["created_by"] == "exlab-sync"
    assert [p.name for p in (run / ".exlab-wizard").iterdir() if p.name.endswith(".tmp")] == []
