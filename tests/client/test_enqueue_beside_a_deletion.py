"""`exlab-sync enqueue` (its own process) beside `serve`, whose reaper is deleting the run, strands nothing.

The audit's send-back of a verified run (``_act_unlocked``, also what a
manual ``enqueue`` runs) asked ``cleanup_planned`` in one SQLite statement
and moved CLEANUP_ELIGIBLE -> QUEUED in another; its only shield against the
reaper was a :class:`JobLocks` of one process. A CLI ``enqueue`` beside
``serve`` holds no lock the serve's reaper knows of: between the CLI's look
(no plan yet) and its move (whose from-state, CLEANUP_ELIGIBLE, holds all
through a deletion) the serve's reaper wrote its plan and unlinked a batch.
The job went to QUEUED with verified files deleted locally, the CLI printed
``queued``, the reaper dropped its plan, and the transfer and every retry
ended FAILED ``remote_conflict`` on the run's own verified NAS copies: the
job never finished (docs/cleanup.md says a send-back never lands while the
reaper has a deletion plan).

Now the move is refused in its own UPDATE while a plan exists, so the reaper
(or the next audit) settles the job, and ``enqueue`` says it left the job as
it is, and why, instead of ``queued``.

Here the CLI is a real ``exlab-sync enqueue`` process; the serve is the test's
client, which holds the runner lease and runs the reaper. The only thing
placed is the moment: the CLI waits right after its second
``cleanup_planned`` until the reaper has deleted its batch, and the reaper's
batch waits for the CLI to end.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from exlab_wizard.config import parse_config
from exlab_wizard.sync import audit
from exlab_wizard.sync.reaper import deletion
from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock, flip_byte_keep_stat
from tests.lab import FILES, Lab, acts, cleanup_config, ready, running, write_files

S = SyncJobState
LATE = {"late/frame_0099.tif": b"L" * 4096}

CLI = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from exlab_wizard.sync import audit

    real = audit.cleanup_planned
    calls = []

    def placed(queue, job_id):
        answer = real(queue, job_id)
        calls.append(answer)
        if len(calls) == 2:  # _act_unlocked's check, right before its transition
            Path(sys.argv[3]).write_text("checked")
            deadline = time.time() + 30
            while not Path(sys.argv[4]).exists() and time.time() < deadline:
                time.sleep(0.01)
        return answer

    audit.cleanup_planned = placed
    from exlab_wizard.cli import main
    main(["enqueue", "--config", sys.argv[1], sys.argv[2]], prog_name="exlab-sync")
    """
)


async def test_cli_enqueue_beside_the_serve_reaper_does_not_strand_the_job(lab: Lab, monkeypatch: Any) -> None:
    data = lab.config_data(
        sync={"backoff_s": [0.01, 0.01], "scan_interval_s": 3600, "audit_interval_s": 6 * 3600},
        nas_cleanup={"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": True},
    )
    cfg_file = lab.write_config(data)
    cfg = parse_config(data)
    clock = Clock()
    run = lab.make_run(files=FILES)
    checked, go = lab.root / "cli-checked", lab.root / "reaper-deleted"
    async with running(cfg, clock) as serve:
        await ready(serve, clock, run)
        reaper = serve._current_reaper()
        real_listing = reaper.remote_listing
        real_batch = deletion.delete_batch
        cli: list[subprocess.Popen[str]] = []

        async def listing_while_a_frame_lands(job: Any) -> Any:
            # The reaper's local check is done (clean); it lists the NAS (seconds over ssh). Meanwhile a
            # late frame lands and the operator (or a script) runs `exlab-sync enqueue RUN`.
            if not cli:
                write_files(run, LATE, mtime=time.time() + 2)
                cli.append(
                    subprocess.Popen(
                        [sys.executable, "-c", CLI, str(cfg_file), str(run), str(checked), str(go)],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                )
                deadline = time.monotonic() + 30
                while not checked.exists():
                    assert cli[0].poll() is None, cli[0].communicate()
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
            return await real_listing(job)

        def batch_while_cli_acts(run_path: Path, batch: Any, *a: Any, **k: Any) -> Any:
            result = real_batch(run_path, batch, *a, **k)
            go.write_text("go")  # the CLI makes its transition now, the batch deleted
            cli[0].wait(timeout=30)
            return result

        reaper.remote_listing = listing_while_a_frame_lands
        monkeypatch.setattr(deletion, "delete_batch", batch_while_cli_acts)
        try:
            first = await serve.cleanup_once()
        finally:
            reaper.remote_listing = real_listing
            monkeypatch.setattr(deletion, "delete_batch", real_batch)
            for proc in cli:
                if proc.poll() is None:
                    proc.kill()
        out, err = cli[0].communicate()
        assert cli[0].returncode == 0, (out, err, first)

        # The serve carries on: the transfer, a cleanup pass, the operator's retry, again.
        for _ in range(2):
            await serve.wait_idle(timeout=60)
            await serve.cleanup_once()
            await serve.wait_idle(timeout=60)
            job = await serve.job(run)
            if job.state == S.FAILED:
                await serve.retry(job.id)
        await serve.wait_idle(timeout=60)
        job = await serve.job(run)
        gone = [rel for rel in FILES if not (run / rel).exists()]
        assert job.state != S.FAILED, (
            f"stranded: job {job.state.value} {job.error_kind}: {job.last_error}; locally deleted: {gone}; events: "
            + " | ".join(f"{e.kind}:{e.detail}" for e in job.events[-10:])
        )
        # enqueue said what it did: nothing was queued, the deletion was under way.
        assert not out.lstrip().startswith("queued"), (out, err)
        assert "left as it is" in out and "planned or under way" in out, (out, err)


async def test_local_damage_found_as_a_plan_lands_is_left_to_the_reaper(lab: Lab, monkeypatch: Any) -> None:
    """The failure path of the same check: FAILED ``local_damage`` does not land over a deletion plan either.

    The plan is real (a pass cut off after one unlink); the audit's own look
    is made to miss it, as a look made just before another process's reaper
    wrote it does.
    """
    clock = Clock()
    run = lab.make_run(files=FILES)
    async with running(cleanup_config(lab), clock) as client:
        await ready(client, clock, run)
        real = deletion.delete_batch

        def power_cut(run_path: Path, batch: Any, *a: Any, **k: Any) -> Any:
            real(run_path, batch[:1], *a, **k)
            raise RuntimeError("power cut")

        monkeypatch.setattr(deletion, "delete_batch", power_cut)
        assert [o.action for o in acts(await client.cleanup_once())] == ["error"]
        monkeypatch.setattr(deletion, "delete_batch", real)
        kept = next(rel for rel in FILES if (run / rel).exists())
        flip_byte_keep_stat(run / kept, 1)
        monkeypatch.setattr(audit, "cleanup_planned", lambda queue, job_id: False)  # the look before the plan

        handle = await client.enqueue(run)
        job = await client.job(run)
        assert job.state == S.CLEANUP_ELIGIBLE, (job.state, job.error_kind, job.last_error)
        assert "planned or under way" in handle.note, handle
