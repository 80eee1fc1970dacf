"""``/metrics`` in Prometheus text format, parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3

from prometheus_client.parser import text_string_to_metric_families

from exlab_wizard.sync.queue import JobQueue
from exlab_wizard.sync.queue_stats import QueueStats
from tests.service.conftest import Service, serving


async def scrape(service: Service) -> dict[tuple[str, tuple], float]:
    reply = await service.http.get("/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def get(samples, name, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_metrics_follow_a_sync_per_equipment(service: Service) -> None:
    lab = service.lab
    before = await scrape(service)
    for state in ("queued", "running", "verified", "failed", "cleaned"):
        assert get(before, "exlab_jobs", equipment="FACS_02", state=state) == 0
    assert get(before, "exlab_last_verified_sync_timestamp_seconds", equipment="CONFOCAL_01") == 0
    run = lab.make_run(files={"a.bin": b"a" * 70_000, "b.bin": b"b" * 30_000})
    job_id = (await service.post("/api/enqueue", {"run_path": str(run)})).json()["job_id"]
    await service.wait_state(job_id, "verified")
    await asyncio.sleep(0.6)  # the event tail and the background facts refresh have run
    after = await scrape(service)
    assert get(after, "exlab_jobs", equipment="CONFOCAL_01", state="verified") == 1
    assert get(after, "exlab_jobs", equipment="FACS_02", state="verified") == 0
    assert get(after, "exlab_transferred_bytes_total", equipment="CONFOCAL_01") >= 100_000
    assert get(after, "exlab_transferred_bytes_total", equipment="FACS_02") == 0
    assert get(after, "exlab_verifications_total", equipment="CONFOCAL_01", outcome="pass") == 1
    assert get(after, "exlab_verifications_total", equipment="CONFOCAL_01", outcome="fail") == 0
    assert get(after, "exlab_transfer_duration_seconds_count", equipment="CONFOCAL_01") == 1
    assert get(after, "exlab_last_verified_sync_timestamp_seconds", equipment="CONFOCAL_01") > 1.7e9
    assert get(after, "exlab_nas_reachable", equipment="CONFOCAL_01") == 1
    assert get(after, "exlab_reclaimable_bytes", equipment="CONFOCAL_01") == 100_000
    assert get(after, "exlab_reclaimable_bytes", equipment="FACS_02") == 0


async def test_nas_reachable_comes_from_the_background_probe(service: Service) -> None:
    (service.lab.nas / "FACS_02" / ".exlab-nas").unlink()  # the share is "unmounted"
    await asyncio.sleep(0.5)
    samples = await scrape(service)
    assert get(samples, "exlab_nas_reachable", equipment="FACS_02") == 0
    assert get(samples, "exlab_nas_reachable", equipment="CONFOCAL_01") == 1
    assert get(samples, "exlab_nas_probe_timestamp_seconds", equipment="FACS_02") > 1.7e9


async def test_oldest_queued_job_age(lab) -> None:
    old = dt.datetime.now(dt.UTC) - dt.timedelta(hours=3)
    config = lab.config(enabled=False)  # no workers: the jobs stay QUEUED
    queue = JobQueue(config.queue_db)
    queue.get_or_create(str(lab.make_run("Run_old", equipment="FACS_02")), "FACS_02", "/nowhere", now=old)
    queue.get_or_create(
        str(lab.make_run("Run_new", equipment="FACS_02")), "FACS_02", "/nowhere", now=old + dt.timedelta(hours=2)
    )
    queue.close()
    async with serving(config, lab) as service:
        samples = await scrape(service)
    age = get(samples, "exlab_oldest_queued_job_age_seconds", equipment="FACS_02")
    assert 3 * 3600 - 5 < age < 3 * 3600 + 300
    assert get(samples, "exlab_oldest_queued_job_age_seconds", equipment="CONFOCAL_01") == 0
    assert get(samples, "exlab_jobs", equipment="FACS_02", state="queued") == 2


def test_a_scrape_reads_jobs_through_a_covering_index(tmp_path) -> None:
    """The scrape's queries read indexes only: a covering GROUP BY and one seek per equipment."""
    JobQueue(tmp_path / "q.db").close()
    QueueStats(tmp_path / "q.db").by_equipment_state()
    conn = sqlite3.connect(tmp_path / "q.db")
    plan = conn.execute(
        "EXPLAIN QUERY PLAN SELECT equipment_id, state, COUNT(*) FROM jobs GROUP BY equipment_id, state"
    ).fetchall()
    assert "COVERING INDEX" in " ".join(str(row[-1]) for row in plan), plan
    for sql in (
        "SELECT MIN(created_at) FROM jobs WHERE equipment_id = 'A' AND state = 'queued'",
        "SELECT MAX(verified_at) FROM jobs WHERE equipment_id = 'A'",
    ):
        plan = " ".join(str(row[-1]) for row in conn.execute("EXPLAIN QUERY PLAN " + sql).fetchall())
        assert plan.startswith("SEARCH") and "INDEX" in plan, (sql, plan)
    filtered = conn.execute(
        "EXPLAIN QUERY PLAN SELECT * FROM jobs WHERE state = 'failed' ORDER BY rowid LIMIT 51"
    ).fetchall()
    assert "TEMP B-TREE" not in " ".join(str(row[-1]) for row in filtered), filtered
