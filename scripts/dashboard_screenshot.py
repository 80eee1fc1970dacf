#!/usr/bin/env python3
"""Take docs/dashboard.png: the dashboard of a small lab in a realistic state, in Debian's headless chromium.

Usage: .venv/bin/python scripts/dashboard_screenshot.py [--out docs/dashboard.png] [--keep DIR]

It builds a lab in a temporary folder (three instruments on mount-transport
"NAS" folders, one of them unmounted), starts the real service on a free
loopback port, and through the API with its token: syncs a handful of runs,
starts a large bandwidth-limited transfer, lets one run fail (the NAS folder
already holds a foreign file), and leaves one run for the completion watcher
to block (a leftover template marker in its name). Then it logs a browser in
through the one-time address and saves a full-page screenshot while the
transfer is still running.

Staged for the picture, and only here: the verification times of the synced
runs are moved back over the last day (one SQL update on the lab's own queue)
so the hourly chart shows a day's shape rather than a single bar.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sqlite3
import sys
import tempfile
from pathlib import Path

import httpx
from playwright.async_api import async_playwright

from exlab_wizard.config import parse_config
from exlab_wizard.service.server import ServiceInfo, run_service

CHROMIUM = os.environ.get("EXLAB_CHROMIUM", "/usr/bin/chromium")
MIB = 1 << 20


def make_run(local: Path, equipment: str, project: str, name: str, files: dict[str, int]) -> Path:
    run = local / equipment / project / "Runs" / name
    (run / ".exlab-wizard").mkdir(parents=True)
    (run / ".exlab-wizard" / "creation.json").write_text(
        json.dumps(
            {
                "schema_version": "1.0",
                "level": "run",
                "run_kind": "experimental",
                "paths": {"local": str(run), "nas": None},
                "sync_status": "pending",
                "validation_overrides": [],
            }
        )
    )
    for rel, size in files.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(os.urandom(min(size, MIB)) * (size // MIB) + os.urandom(size % MIB))
    return run


def lab_config(base: Path) -> dict:
    local, nas = base / "lab", base / "nas"
    for eq in ("CONFOCAL_01", "FACS_02"):
        (nas / eq).mkdir(parents=True)
        (nas / eq / ".exlab-nas").write_text("mounted\n")
    (nas / "WIDEFIELD_03").mkdir(parents=True)  # no marker: the share is not mounted
    now = dt.datetime.now().astimezone()
    window = {
        "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
        "start": (now - dt.timedelta(hours=2)).strftime("%H:00"),
        "end": (now + dt.timedelta(hours=3)).strftime("%H:00"),
    }
    return {
        "equipment": [
            {
                "id": "CONFOCAL_01",
                "label": "Zeiss LSM 980",
                "local_root": str(local),
                "transport": {
                    "type": "mount",
                    "mount_path": str(nas / "CONFOCAL_01"),
                    "bandwidth": {"upload_mbps": 40, "schedule": [window]},
                },
            },
            {
                "id": "FACS_02",
                "label": "BD FACSymphony A5",
                "local_root": str(local),
                "transport": {"type": "mount", "mount_path": str(nas / "FACS_02")},
            },
            {
                "id": "WIDEFIELD_03",
                "label": "Nikon Ti2",
                "local_root": str(local),
                "transport": {"type": "mount", "mount_path": str(nas / "WIDEFIELD_03")},
            },
        ],
        "sync": {"scan_interval_s": 1, "max_parallel_jobs": 2, "backoff_s": [300, 900]},
        "state_dir": str(base / "state"),
    }


async def until(predicate, timeout: float = 60.0) -> None:
    async def poll() -> None:
        while not await predicate():
            await asyncio.sleep(0.1)

    await asyncio.wait_for(poll(), timeout)


async def stage(base: Path, out: Path) -> None:
    data = lab_config(base)
    config = parse_config(data)
    local, nas = base / "lab", base / "nas"
    ready: asyncio.Future[ServiceInfo] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_service(
            config,
            host="127.0.0.1",
            port=0,
            stop=stop,
            install_signals=False,
            on_ready=ready.set_result,
            facts_interval_s=0.5,
        )
    )
    info = await asyncio.wait_for(ready, 30)
    token = (config.state_dir / "api-token").read_text().strip()
    auth = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=info.base_url, headers=auth, timeout=30) as http:

        async def enqueue(run: Path) -> str:
            reply = await http.post("/api/enqueue", json={"run_path": str(run)})
            reply.raise_for_status()
            return reply.json()["job_id"]

        async def state(job_id: str) -> str:
            return (await http.get(f"/api/jobs/{job_id}")).json()["state"]

        synced = []
        for i, (eq, size) in enumerate(
            [
                ("CONFOCAL_01", 24),
                ("FACS_02", 6),
                ("CONFOCAL_01", 40),
                ("FACS_02", 9),
                ("CONFOCAL_01", 18),
                ("FACS_02", 4),
                ("CONFOCAL_01", 30),
                ("FACS_02", 7),
            ]
        ):
            project = "PROJ-0142" if eq == "CONFOCAL_01" else "PROJ-0150"
            run = make_run(
                local,
                eq,
                project,
                f"Run_2026-12-0{1 + i // 3}_{i:02d}",
                {"images/stack.czi": size * MIB // 4, "acquisition.json": 2048},
            )
            synced.append(await enqueue(run))
        for job_id in synced:
            await until(lambda j=job_id: _in(state(j), {"verified"}), 120)
        with sqlite3.connect(config.queue_db) as db:  # staged: spread the verifications over the last day
            for i, job_id in enumerate(synced):
                at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=(i * 7 + 3) % 22 + 1, minutes=17 * i % 60)
                db.execute(
                    "UPDATE jobs SET verified_at = ? WHERE id = ?", (at.isoformat(timespec="microseconds"), job_id)
                )

        conflict = make_run(local, "FACS_02", "PROJ-0150", "Run_2026-12-04_plate3", {"plate.fcs": 3 * MIB})
        remote = nas / "FACS_02" / "PROJ-0150" / "Runs" / conflict.name
        remote.mkdir(parents=True)
        (remote / "plate.fcs.bak").write_bytes(b"an older export left on the share")
        failed = await enqueue(conflict)
        for name in ("Run_2026-12-05_a", "Run_2026-12-05_b"):
            await enqueue(make_run(local, "WIDEFIELD_03", "PROJ-0163", name, {"tile_0001.nd2": 12 * MIB}))
        blocked = make_run(local, "FACS_02", "PROJ-0150", "Run_{{sample_id}}_2026-12-05", {"tube1.fcs": 2 * MIB})
        (blocked / "acquisition_complete.flag").write_text("")
        await until(lambda: _in(state(failed), {"failed"}))

        big = make_run(
            local,
            "CONFOCAL_01",
            "PROJ-0142",
            "Run_2026-12-05_timelapse",
            {"timelapse.czi": 300 * MIB, "acquisition.json": 2048},
        )
        running = await enqueue(big)
        await until(lambda: _in(state(running), {"running"}))

        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = await browser.new_page(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
            await page.goto(info.login_url)
            await page.wait_for_selector('#live-status[data-state="up"]', timeout=20000)
            if info.ctx.watcher is not None:
                await page.wait_for_selector("#part-blocked article", timeout=20000)
            await page.wait_for_function(
                "() => { const b = document.querySelector('#part-running progress'); return b && b.value > 0; }",
                timeout=20000,
            )
            await asyncio.sleep(3)  # a few progress messages: a steady rate and time left
            out.parent.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(out), full_page=True)
            await browser.close()
    stop.set()
    await asyncio.wait_for(task, 30)


async def _in(value, states: set[str]) -> bool:
    return (await value) in states


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "dashboard.png")
    parser.add_argument("--keep", type=Path, help="build the lab in this (new) folder and keep it")
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True)
        asyncio.run(stage(args.keep.resolve(), args.out))
    else:
        with tempfile.TemporaryDirectory(prefix="exlab-screenshot-") as tmp:
            asyncio.run(stage(Path(tmp), args.out))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
