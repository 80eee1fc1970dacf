"""End to end on the real filesystem with the real mount transport and verifier."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from exlab_wizard.sync.nas_client import SyncHandleState
from exlab_wizard.sync.states import SyncJobState
from tests.helpers import require_tool
from tests.lab import Lab, make_client

HOSTILE = {
    "plain.txt": b"hello\n",
    "nested/deeper/still/file.dat": os.urandom(4096),
    "empty.bin": b"",
    "big/multi.bin": os.urandom(5 * 1024 * 1024 + 17),
    "with space.txt": b"space",
    'quote\'s "double".txt': b"quotes",
    "$(touch PWNED).txt": b"subshell",
    "-leading-dash.txt": b"dash",
    "unicodé/Ünïcødé 数据.csv": b"a,b\n1,2\n",
}
OVERRIDE = {
    "id": "0b6f9c1e-2c7a-4a64-9a57-6d0f2e6f1a01",
    "problem_class": "illegal_filesystem_character",
    "operator": "asmith",
    "recorded_at": "2026-01-01T00:00:00Z",
    "expires_at": None,
    "reason": "instrument writes these names",
    "revoked": False,
}


def _tree(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = path.read_bytes()
    return out


async def test_hostile_names_arrive_byte_identical_and_sha256sum_passes(lab: Lab) -> None:
    files = dict(HOSTILE)
    files["new\nline.txt"] = b"newline in the name"
    files["back\\slash.txt"] = b"backslash in the name"
    run = lab.make_run(files=files, overrides=[OVERRIDE])
    client = make_client(lab.config())
    await client.init()
    try:
        handle = await client.enqueue(run)
        assert handle.state == SyncHandleState.QUEUED, handle.blocking_findings
        await client.wait_idle(timeout=60)
        row = await client.job(run)
        assert row.state == SyncJobState.VERIFIED, row.last_error
        assert row.verify_passes == 1 and row.verified_at is not None
    finally:
        await client.close()
    nas = lab.nas_copy(run)
    local_tree = {k: v for k, v in _tree(run).items() if not k.startswith(".exlab-wizard")}
    nas_tree = {k: v for k, v in _tree(nas).items() if not k.startswith(".exlab-wizard")}
    assert nas_tree == local_tree
    assert not (lab.root / "PWNED").exists() and not Path("PWNED").exists()
    sha256sum = require_tool("sha256sum")
    for copy in (run, nas):
        check = subprocess.run(
            [sha256sum, "-c", "--quiet", ".exlab-wizard/checksums.sha256"], cwd=copy, capture_output=True
        )
        assert check.returncode == 0, check.stdout + check.stderr
    # the refreshed metadata reached the NAS: creation.json there says synced, unknown keys kept
    creation = json.loads((nas / ".exlab-wizard" / "creation.json").read_text())
    assert creation["sync_status"] == "synced"
    assert creation["lab_note"] == {"keep": ["me"]}
    assert creation["paths"]["nas"] == str(nas)
    # mtimes kept
    assert os.stat(nas / "plain.txt").st_mtime_ns == os.stat(run / "plain.txt").st_mtime_ns
    # no temporary files left on the NAS
    assert not [p for p in _tree(nas) if "exlab-tmp" in p]


async def test_blocked_run_gets_blocked_handle_and_status(lab: Lab) -> None:
    run = lab.make_run(files={"<sample_id>.tif": b"data"})
    client = make_client(lab.config())
    await client.init()
    try:
        handle = await client.enqueue(run)
        assert handle.state == SyncHandleState.BLOCKED and handle.job_id == ""
        assert "unresolved_placeholder_token" in {f.rule for f in handle.blocking_findings}
        assert await client.status(run) == "none"
        creation = json.loads((run / ".exlab-wizard" / "creation.json").read_text())
        assert creation["sync_status"] == "blocked_by_validation"
        assert not lab.nas_copy(run).exists()
    finally:
        await client.close()


async def test_one_job_per_run_for_life_and_orphan_gets_minimal_creation(lab: Lab) -> None:
    run = lab.make_run(creation=False, files={"a.dat": b"a" * 10})
    client = make_client(lab.config())
    await client.init()
    try:
        first = await client.enqueue(run)
        await client.wait_idle(timeout=30)
        second = await client.enqueue(run)
        assert first.job_id == second.job_id
        assert await client.status(run) == "verified"
        creation = json.loads((run / ".exlab-wizard" / "creation.json").read_text())
        assert creation["created_by"] == "exlab-sync" and creation["sync_status"] == "synced"
        assert creation["level"] == "run" and creation["schema_version"].startswith("1.")
        rows = await client.jobs()
        assert len(rows) == 1
        job = await client.job(run)
        assert [e.to_state for e in job.events if e.kind == "transition"][:4] == [
            "queued",
            "running",
            "awaiting_verify",
            "verified",
        ]
    finally:
        await client.close()


async def test_queued_job_whose_run_became_blocked_waits(lab: Lab) -> None:
    run = lab.make_run(files={"ok.dat": b"1"})
    config = lab.config()
    client = make_client(config)
    await client.init(run_workers=False)  # enqueue only: nobody transfers yet
    handle = await client.enqueue(run)
    await client.close()
    (run / "{{ leftover }}.txt").write_text("x")
    worker = make_client(config)
    await worker.init()
    try:
        import asyncio

        for _ in range(100):
            job = await worker.job(run)
            if any(e.kind == "gate_hold" for e in job.events):
                break
            await asyncio.sleep(0.02)
        job = await worker.job(run)
        assert job.state == SyncJobState.QUEUED and job.id == handle.job_id
        assert any(e.kind == "gate_hold" and "leftover_jinja_marker" in e.detail for e in job.events)
        assert not lab.nas_copy(run).exists()
    finally:
        await worker.close()


async def test_parallel_equipment_and_force_verify_detects_bit_rot(lab: Lab) -> None:
    runs = [lab.make_run(f"Run_{i}", {"d.bin": os.urandom(300_000)}) for i in range(3)]
    runs.append(lab.make_run("Run_F", {"f.fcs": os.urandom(200_000)}, equipment="FACS_02"))
    client = make_client(lab.config())
    await client.init()
    try:
        for run in runs:
            await client.enqueue(run)
        await client.wait_idle(timeout=60)
        assert [await client.status(r) for r in runs] == ["verified"] * 4
        good = await client.force_verify(runs[0])
        assert good.ok
        data = bytearray((runs[0] / "d.bin").read_bytes())
        data[1000] ^= 0x01
        stat = os.stat(runs[0] / "d.bin")
        (runs[0] / "d.bin").write_bytes(bytes(data))
        os.utime(runs[0] / "d.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns))
        bad = await client.force_verify(runs[0])
        assert not bad.ok and bad.different == ("d.bin",)
        assert await client.status(runs[0]) == "verified"  # force_verify changes no state
    finally:
        await client.close()


async def test_unmounted_share_is_never_treated_as_empty(lab: Lab) -> None:
    run = lab.make_run(files={"a.dat": b"a"})
    (lab.nas / "CONFOCAL_01" / ".exlab-nas").unlink()
    client = make_client(lab.config(backoff_s=[0.01]))
    await client.init()
    try:
        await client.enqueue(run)
        await client.wait_idle(timeout=30)
        import asyncio

        for _ in range(200):
            if await client.status(run) == "failed":
                break
            await asyncio.sleep(0.02)
        row = await client.job(run)
        assert row.state == SyncJobState.FAILED and row.error_kind == "network"
        assert row.attempts == 2
        assert "not mounted" in row.last_error or "unreachable" in row.last_error
        assert not lab.nas_copy(run).exists()
    finally:
        await client.close()


async def test_transfer_progress_reports_bytes_against_the_run_size(lab: Lab) -> None:
    files = {f"frames/f{i}.raw": os.urandom(2 * 1024 * 1024) for i in range(8)}
    run = lab.make_run(files=files)
    size = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    events: list[dict] = []
    client = make_client(lab.config())
    client.add_listener(lambda event: events.append(event) if event.get("type") == "progress" else None)
    await client.init()
    try:
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        assert (await client.job(run)).state == SyncJobState.VERIFIED
    finally:
        await client.close()
    transfer = [e for e in events if e["phase"] == "transfer"]
    assert sum(e["delta"] for e in transfer) == transfer[-1]["bytes"] == size
    assert transfer[-1]["total"] == size  # counted while the copy started
