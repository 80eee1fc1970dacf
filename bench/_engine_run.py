"""Child process of the sync benchmarks: one run through NASSyncClient, enqueue to VERIFIED.

Run in its own process so its peak RSS (``wait4``) is the engine's alone.

    python bench/_engine_run.py --run RUN --local-root ROOT --mount MOUNT --state DIR [--equipment EQ]

The run must lie at ``<ROOT>/<EQ>/...`` and hold ``.exlab-wizard/creation.json``;
``MOUNT`` must hold the mount marker ``.exlab-nas``. Prints one JSON line:
``{"init_s", "verified_s" (enqueue to VERIFIED), "idle_s" (enqueue to no
work left, i.e. after the refreshed .exlab-wizard/ was pushed), "state"}``.
Exit 1 when the job did not reach VERIFIED.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from exlab_wizard.cache import CreationWriter
from exlab_wizard.config import parse_config
from exlab_wizard.sync.nas_client import NASSyncClient
from exlab_wizard.validator import Validator


async def _main(args: argparse.Namespace) -> dict:
    config = parse_config(
        {
            "equipment": [
                {
                    "id": args.equipment,
                    "local_root": str(args.local_root),
                    "transport": {"type": "mount", "mount_path": str(args.mount)},
                }
            ],
            "state_dir": str(args.state),
        }
    )
    client = NASSyncClient(
        config=config,
        queue_db=config.queue_db,
        validator=Validator(config.validator),
        cache_creation=CreationWriter(),
    )
    done = asyncio.Event()
    final: dict[str, str] = {}

    def on_event(event: dict) -> None:
        if event.get("type") == "state" and event.get("state") in ("verified", "failed"):
            final["state"] = event["state"]
            done.set()

    client.add_listener(on_event)
    start = time.perf_counter()
    await client.init()
    init_s = time.perf_counter() - start
    try:
        start = time.perf_counter()
        handle = await client.enqueue(args.run)
        if not handle.job_id:
            return {"state": "blocked", "blocking": [str(f) for f in handle.blocking][:5]}
        await asyncio.wait_for(done.wait(), args.timeout)
        verified_s = time.perf_counter() - start
        await client.wait_idle(args.timeout)
        idle_s = time.perf_counter() - start
        job = await client.job(args.run)
        state = job.state.value if job is not None else "none"
        return {
            "init_s": init_s,
            "verified_s": verified_s,
            "idle_s": idle_s,
            "state": state,
            "last_error": getattr(job, "last_error", None),
        }
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--local-root", type=Path, required=True)
    parser.add_argument("--mount", type=Path, required=True)
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--equipment", default="BENCH_01")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args(argv)
    result = asyncio.run(_main(args))
    print(json.dumps(result))
    return 0 if result.get("state") in ("verified",) else 1


if __name__ == "__main__":
    sys.exit(main())
