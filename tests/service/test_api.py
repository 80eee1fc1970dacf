"""The HTTP API against the real app served by uvicorn on loopback: every status code it promises."""

from __future__ import annotations

import asyncio
import json
import os

from exlab_wizard.sync.queue import JobQueue
from tests.service.conftest import Service

BIG = 64 * 1024


async def test_reads_answer_without_a_token(service: Service) -> None:
    assert (await service.http.get("/healthz")).json() == {"ok": True, "runs_workers": True, "watcher": True}
    assert (await service.http.get("/api/jobs")).json() == {"jobs": [], "next_after": None}
    assert (await service.http.get("/docs")).status_code == 200
    schema = (await service.http.get("/openapi.json")).json()
    assert {"/api/jobs", "/api/enqueue", "/api/overrides", "/api/events", "/metrics"} <= set(schema["paths"])


async def test_mutations_need_the_token(service: Service) -> None:
    run = service.lab.make_run()
    body = {"run_path": str(run)}
    missing = await service.http.post("/api/enqueue", json=body)
    assert missing.status_code == 401 and missing.json()["kind"] == "unauthenticated"
    assert missing.headers["www-authenticate"] == "Bearer"
    not_bearer = await service.http.post("/api/enqueue", json=body, headers={"Authorization": f"Basic {service.token}"})
    assert not_bearer.status_code == 401
    wrong = await service.http.post("/api/enqueue", json=body, headers={"Authorization": "Bearer " + "x" * 43})
    assert wrong.status_code == 403 and wrong.json()["kind"] == "forbidden"
    assert JobQueue(service.config.queue_db).list_jobs() == []  # nothing happened
    ok = await service.post("/api/enqueue", body)
    assert ok.status_code == 200, ok.text
    assert ok.json()["state"] == "queued" and ok.json()["job"]["run_path"] == str(run)


async def test_token_file_is_private(service: Service) -> None:
    path = service.config.state_dir / "api-token"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert len(service.token) >= 40


async def test_unknown_job_is_404(service: Service) -> None:
    assert (await service.http.get("/api/jobs/0123456789abcdef")).status_code == 404
    reply = await service.post("/api/jobs/0123456789abcdef/retry")
    assert reply.status_code == 404 and reply.json()["kind"] == "no_job"


async def test_bad_bodies_are_422_with_a_readable_message(service: Service) -> None:
    reply = await service.post("/api/enqueue", {})
    assert reply.status_code == 422
    assert reply.json()["detail"] == "run_path: Field required"
    extra = await service.post("/api/enqueue", {"run_path": "/x", "force": True})
    assert extra.status_code == 422 and "force" in extra.json()["detail"]
    garbage = await service.http.post(
        "/api/enqueue", content=b"{not json", headers={**service.auth, "content-type": "application/json"}
    )
    assert garbage.status_code == 422 and "JSON" in garbage.json()["detail"]
    retry = await service.http.post("/api/jobs/abc/retry", content=b'{"accept_local": "maybe"}', headers=service.auth)
    assert retry.status_code == 422 and "accept_local" in retry.json()["detail"]
    state = await service.http.get("/api/jobs", params={"state": "sleeping"})
    assert state.status_code == 422 and "state must be one of" in state.json()["detail"]


async def test_paths_outside_every_equipment_root_are_400(service: Service, tmp_path) -> None:
    lab = service.lab
    outside = tmp_path / "elsewhere" / "CONFOCAL_01" / "P" / "Runs" / "Run_x"
    outside.mkdir(parents=True)
    link = lab.local_root / "CONFOCAL_01" / "P" / "Runs" / "Run_link"
    link.parent.mkdir(parents=True)
    os.symlink(outside, link)
    run = lab.make_run("Run_ok")
    for path in (
        "/etc",
        str(outside),
        str(lab.local_root / "CONFOCAL_01" / ".." / ".." / "elsewhere" / "CONFOCAL_01" / "P" / "Runs" / "Run_x"),
        str(run / ".." / ".." / "Runs" / "Run_ok"),  # a '..' even when it lands inside
        str(link),  # a link that resolves outside
        str(link / "sub"),
        "relative/CONFOCAL_01/P/Runs/Run_ok",
        str(lab.local_root / "CONFOCAL_01"),  # the equipment root itself is not a run
    ):
        for call in (
            service.post("/api/enqueue", {"run_path": path}),
            service.post("/api/verify", {"run_path": path}),
            service.http.get("/api/problems", params={"run_path": path}),
            service.http.get("/api/overrides", params={"run_path": path}),
            service.post("/api/overrides", {"run_path": path, "rule": "leftover_jinja_marker", "reason": "r"}),
        ):
            reply = await call
            assert reply.status_code == 400, (path, reply.text)
            assert reply.json()["kind"] == "outside_roots"
    assert not (outside / ".exlab-wizard").exists()  # nothing written through the link


async def test_bodies_over_64_kib_are_413(service: Service) -> None:
    padded = json.dumps({"run_path": "/x" + "a" * BIG}).encode()
    by_length = await service.http.post("/api/enqueue", content=padded, headers=service.auth)
    assert by_length.status_code == 413 and by_length.json()["kind"] == "body_too_large"

    async def chunks():
        for _ in range(20):
            yield b" " * 8192  # no Content-Length: chunked, counted as it streams

    streamed = await service.http.post("/api/enqueue", content=chunks(), headers=service.auth)
    assert streamed.status_code == 413
    # without a token too: the size is checked before anything else reads the body
    assert (await service.http.post("/api/enqueue", content=padded)).status_code == 413
    just_under = json.dumps({"run_path": "/x" + "a" * 4000}).encode()
    assert (await service.http.post("/api/enqueue", content=just_under, headers=service.auth)).status_code == 422


async def test_enqueue_sync_and_job_detail(service: Service) -> None:
    run = service.lab.make_run(files={"a.bin": b"a" * 5000, "b/c.txt": b"hello"})
    job_id = (await service.post("/api/enqueue", {"run_path": str(run)})).json()["job_id"]
    row = await service.wait_state(job_id, "verified")
    kinds = [(e["from_state"], e["to_state"]) for e in row["events"] if e["kind"] == "transition"]
    assert kinds[:4] == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "awaiting_verify"),
        ("awaiting_verify", "verified"),
    ]
    assert row["verify_passes"] == 1 and "progress" in row
    again = (await service.post("/api/enqueue", {"run_path": str(run)})).json()
    assert again["job_id"] == job_id  # one job for life
    verify = (await service.post("/api/verify", {"run_path": str(run)})).json()
    assert verify["ok"] is True and verify["checked"] == 2
    (run / "a.bin").write_bytes(b"b" * 5000)
    verify = (await service.post("/api/verify", {"run_path": str(run)})).json()
    assert verify["ok"] is False and verify["different"] == ["a.bin"]
    not_failed = await service.post(f"/api/jobs/{job_id}/retry")
    assert not_failed.status_code == 409 and not_failed.json()["kind"] == "not_failed"


async def test_jobs_are_paged_and_filtered(service: Service) -> None:
    lab = service.lab
    ids = []
    for i in range(5):
        run = lab.make_run(f"Run_{i}", equipment="CONFOCAL_01" if i % 2 else "FACS_02")
        ids.append((await service.post("/api/enqueue", {"run_path": str(run)})).json()["job_id"])
    seen, after = [], None
    while True:
        page = (await service.http.get("/api/jobs", params={"limit": 2, **({"after": after} if after else {})})).json()
        assert len(page["jobs"]) <= 2
        seen += [j["id"] for j in page["jobs"]]
        after = page["next_after"]
        if after is None:
            break
    assert seen == ids
    facs = (await service.http.get("/api/jobs", params={"equipment_id": "FACS_02"})).json()["jobs"]
    assert [j["id"] for j in facs] == ids[0::2]
    assert set(facs[0]) >= {
        "id",
        "run_path",
        "equipment_id",
        "remote_path",
        "state",
        "attempts",
        "next_attempt_at",
        "error_kind",
        "last_error",
        "verify_passes",
        "verified_at",
        "created_at",
        "updated_at",
    }
    assert (await service.http.get("/api/jobs", params={"after": "nope"})).status_code == 422
    assert (await service.http.get("/api/jobs", params={"limit": 0})).status_code == 422


async def test_retry_rearms_a_failed_job(service: Service) -> None:
    lab = service.lab
    run = lab.make_run()
    foreign = lab.nas_copy(run)
    foreign.mkdir(parents=True)
    (foreign / "someone_else.dat").write_bytes(b"not ours")  # remote_conflict: FAILED at once
    job_id = (await service.post("/api/enqueue", {"run_path": str(run)})).json()["job_id"]
    failed = await service.wait_state(job_id, "failed")
    assert failed["error_kind"] == "remote_conflict"
    (foreign / "someone_else.dat").unlink()
    reply = await service.post(f"/api/jobs/{job_id}/retry", {"accept_local": False})
    assert reply.status_code == 200 and reply.json()["state"] == "queued"
    await service.wait_state(job_id, "verified")


async def test_events_stream_a_run_from_queued_to_verified(service: Service) -> None:
    run = service.lab.make_run(files={"big.bin": os.urandom(3 * 1024 * 1024)})
    seen: list[tuple[str, dict]] = []

    async def listen() -> None:
        async with service.http.stream("GET", "/api/events") as stream:
            event = None
            async for line in stream.aiter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event:
                    data = json.loads(line.split(":", 1)[1])
                    seen.append((event, data))
                    if event == "transition" and data["to_state"] == "verified":
                        return

    listener = asyncio.create_task(listen())
    await asyncio.sleep(0.3)  # subscribed
    job_id = (await service.post("/api/enqueue", {"run_path": str(run)})).json()["job_id"]
    await asyncio.wait_for(listener, 20)
    moves = [(d["from_state"], d["to_state"]) for e, d in seen if e == "transition" and d["job_id"] == job_id]
    assert moves == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "awaiting_verify"),
        ("awaiting_verify", "verified"),
    ]
    progress = [d for e, d in seen if e == "progress" and d["job_id"] == job_id]
    assert progress, "no progress event"
    assert all(set(d) >= {"bytes_done", "bytes_total", "rate_bps", "phase"} for d in progress)
    sent = [d for d in progress if d["phase"] == "transfer"]
    assert sent and sent[-1]["bytes_done"] == sent[-1]["bytes_total"] >= 3 * 1024 * 1024
    ids = [int(d["id"]) for e, d in seen if e == "transition"]
    assert ids == sorted(ids)


async def test_events_resume_after_last_event_id(service: Service) -> None:
    run = service.lab.make_run()
    job_id = (await service.post("/api/enqueue", {"run_path": str(run)})).json()["job_id"]
    row = await service.wait_state(job_id, "verified")
    await asyncio.sleep(0.5)  # the tail has read the table
    first = row["events"][0]["id"]
    got = []
    async with service.http.stream("GET", "/api/events", headers={"Last-Event-ID": str(first)}) as stream:
        async for line in stream.aiter_lines():
            if line.startswith("data:"):
                data = json.loads(line.split(":", 1)[1])
                got.append(data)
                if data.get("to_state") == "verified":
                    break
    assert got[0]["id"] == first + 1
    assert [d["to_state"] for d in got if d["kind"] == "transition"] == ["running", "awaiting_verify", "verified"]


async def test_sessionless_page_never_shows_the_token(service: Service) -> None:
    page = await service.http.get("/")
    assert page.status_code == 200 and "CONFOCAL_01" in page.text
    assert service.token not in page.text


async def test_requests_for_a_foreign_host_name_are_refused(service: Service) -> None:
    # A site that points its own name at 127.0.0.1 (DNS rebinding) cannot read the queue.
    reply = await service.http.get("/api/jobs", headers={"Host": "evil.example:80"})
    assert reply.status_code == 400
    assert (await service.http.get("/api/jobs", headers={"Host": "localhost"})).status_code == 200
