"""The service's read paths with a large queue: ``/api/jobs`` and ``/metrics`` latency, event stream rate.

    .venv/bin/python bench/service.py [--jobs 100000] [--repeat 50] [--events 20000]

Builds a queue of ``--jobs`` rows over 3 equipment (states mixed) in a
temporary folder, serves the real app with ``run_service`` on 127.0.0.1 (sync
disabled, so the rows stay as written), and times over HTTP with httpx:
one page of ``/api/jobs`` (first page, a state-filtered page, a page deep in
the list through ``after``) and a ``/metrics`` scrape; median and p95 of
``--repeat`` calls. Then writes ``--events`` rows into the events table from
another connection (as another process would) and measures how many per
second ``/api/events`` delivers to a reader. Targets: under 50 ms median.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from exlab_wizard.config import parse_config
from exlab_wizard.service.server import ServiceInfo, run_service
from exlab_wizard.sync.queue import JobQueue

STATES = ["queued", "running", "awaiting_verify", "verified", "cleanup_eligible", "cleaned", "failed"]
WEIGHTS = [5, 1, 1, 30, 10, 50, 3]
EQUIPMENT = ["CONFOCAL_01", "FACS_02", "PLATE_03"]


def build(base: Path, jobs: int) -> tuple[object, list[str]]:
    local, nas = base / "lab", base / "nas"
    equipment = []
    for eq in EQUIPMENT:
        (nas / eq).mkdir(parents=True)
        (nas / eq / ".exlab-nas").write_text("mounted\n")
        equipment.append(
            {"id": eq, "local_root": str(local), "transport": {"type": "mount", "mount_path": str(nas / eq)}}
        )
    config = parse_config({"equipment": equipment, "sync": {"enabled": False}, "state_dir": str(base / "state")})
    JobQueue(config.queue_db).close()
    rng = random.Random(7)
    rows, ids = [], []
    for i in range(jobs):
        state = rng.choices(STATES, WEIGHTS)[0]
        eq = EQUIPMENT[i % 3]
        job_id = uuid.uuid4().hex
        ids.append(job_id)
        stamp = f"2026-01-{1 + i % 28:02d}T{i % 24:02d}:00:00+00:00"
        verified = stamp if state in ("verified", "cleanup_eligible", "cleaned") else None
        rows.append(
            (job_id, f"{local}/{eq}/P/Runs/Run_{i}", eq, f"{nas}/{eq}/P/Runs/Run_{i}", state, stamp, stamp, verified)
        )
    conn = sqlite3.connect(config.queue_db)
    conn.executemany(
        "INSERT INTO jobs (id, run_path, equipment_id, remote_path, state, created_at, updated_at,"
        " verified_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    conn.commit()
    conn.execute("ANALYZE")
    conn.close()
    return config, ids


async def timed(http: httpx.AsyncClient, url: str, repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        reply = await http.get(url)
        reply.raise_for_status()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95) - 1]


async def event_rate(http: httpx.AsyncClient, db: Path, job_id: str, count: int) -> float:
    got = 0
    ready = asyncio.Event()

    async def read() -> None:
        nonlocal got
        async with http.stream("GET", "/api/events") as stream:
            ready.set()
            async for line in stream.aiter_lines():
                if line.startswith("data:"):
                    got += 1
                    if got >= count:
                        return

    reader = asyncio.create_task(read())
    await ready.wait()
    await asyncio.sleep(0.3)
    start = time.perf_counter()
    conn = sqlite3.connect(db)
    conn.executemany(
        "INSERT INTO events (job_id, at, kind, detail) VALUES (?, ?, 'note', ?)",
        [(job_id, "2026-01-01T00:00:00+00:00", f"bench {i}") for i in range(count)],
    )
    conn.commit()
    conn.close()
    await asyncio.wait_for(reader, 120)
    return count / (time.perf_counter() - start)


async def measure(args: argparse.Namespace) -> tuple[dict[str, tuple[float, float]], float]:
    """``({call: (median ms, p95 ms)}, events/s)``; used by ``bench/run_all.py`` too."""
    with tempfile.TemporaryDirectory(prefix="exlab-bench-service-") as tmp:
        started = time.perf_counter()
        config, ids = build(Path(tmp), args.jobs)
        say = (lambda *_a: None) if getattr(args, "quiet", False) else print
        say(f"queue: {args.jobs} jobs over {len(EQUIPMENT)} equipment, built in {time.perf_counter() - started:.1f} s")
        stop = asyncio.Event()
        ready: asyncio.Future[ServiceInfo] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            run_service(config, port=0, stop=stop, install_signals=False, on_ready=ready.set_result)
        )
        info = await asyncio.wait_for(ready, 30)
        results = {}
        async with httpx.AsyncClient(base_url=info.base_url, timeout=60) as http:
            await http.get("/metrics")  # warm the connection and the page cache
            cases = {
                "/api/jobs (first page, 100)": "/api/jobs?limit=100",
                "/api/jobs?state=failed (100)": "/api/jobs?state=failed&limit=100",
                "/api/jobs?equipment_id&state (100)": "/api/jobs?equipment_id=PLATE_03&state=queued&limit=100",
                "/api/jobs after row 90,000 (100)": f"/api/jobs?limit=100&after={ids[int(len(ids) * 0.9)]}",
                "/metrics": "/metrics",
            }
            for name, url in cases.items():
                results[name] = await timed(http, url, args.repeat)
            rate = await event_rate(http, config.queue_db, ids[0], args.events)
        stop.set()
        await task
    return results, rate


async def main(args: argparse.Namespace) -> None:
    results, rate = await measure(args)
    print(f"{'call':<40} {'median ms':>10} {'p95 ms':>8}")
    for name, (median, p95) in results.items():
        print(f"{name:<40} {median:>10.1f} {p95:>8.1f}")
    print(f"/api/events: {rate:,.0f} events/s delivered to one reader ({args.events} events)")
    print(json.dumps({k: round(v[0], 2) for k, v in results.items()} | {"events_per_s": round(rate)}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--events", type=int, default=20_000)
    asyncio.run(main(parser.parse_args()))
