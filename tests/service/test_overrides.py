"""Overrides through the API: written to creation.json exactly as the on-disk format says."""

from __future__ import annotations

import datetime as dt
import json
import uuid

from tests.service.conftest import Service

RULE = "leftover_jinja_marker"


def creation(run) -> dict:
    return json.loads((run / ".exlab-wizard" / "creation.json").read_text())


async def test_an_override_lets_a_blocked_run_sync_and_a_revocation_is_a_tombstone(service: Service) -> None:
    run = service.lab.make_run("Run_{{sample}}")
    problems = (await service.http.get("/api/problems", params={"run_path": str(run)})).json()
    assert problems["eligible"] is False
    assert [f["rule"] for f in problems["blocking"]] == [RULE]
    blocked = (await service.post("/api/enqueue", {"run_path": str(run)})).json()
    assert blocked["state"] == "blocked" and blocked["job_id"] is None
    assert blocked["blocking_findings"][0]["rule"] == RULE

    expires = (dt.datetime.now(dt.UTC) + dt.timedelta(days=2)).isoformat()
    reply = await service.post(
        "/api/overrides",
        {
            "run_path": str(run),
            "rule": RULE,
            "reason": "the instrument writes {{sample}} literally",
            "path": run.name,
            "expires_at": expires,
            "operator": "asmith",
        },
    )
    assert reply.status_code == 201, reply.text
    entry = reply.json()["override"]
    stored = creation(run)
    assert stored["lab_note"] == {"keep": ["me"]}  # unknown keys kept
    assert stored["validation_overrides"] == [entry]
    assert set(entry) == {"id", "problem_class", "operator", "recorded_at", "expires_at", "reason", "revoked", "path"}
    assert uuid.UUID(entry["id"]).version == 4
    assert entry["problem_class"] == RULE and entry["revoked"] is False and entry["operator"] == "asmith"
    assert entry["recorded_at"].endswith("Z") and entry["expires_at"].endswith("Z")
    assert not list((run / ".exlab-wizard").glob("*.tmp*"))

    listed = (await service.http.get("/api/overrides", params={"run_path": str(run)})).json()["overrides"]
    assert [(o["id"], o["status"]) for o in listed] == [(entry["id"], "active")]
    queued = (await service.post("/api/enqueue", {"run_path": str(run)})).json()
    assert queued["state"] == "queued"
    row = await service.wait_state(queued["job_id"], "verified")
    assert row["overrides_relied_on"] == [entry["id"]]

    revoke = await service.post(f"/api/overrides/{entry['id']}/revoke", {"run_path": str(run), "reason": "renamed"})
    assert revoke.status_code == 200, revoke.text
    tomb = revoke.json()["tombstone"]
    entries = creation(run)["validation_overrides"]
    assert entries[0] == entry  # never deleted
    assert entries[1] == tomb and tomb["revokes"] == entry["id"] and tomb["revoked"] is True
    assert set(tomb) == {"id", "revokes", "operator", "recorded_at", "reason", "revoked"}
    listed = (await service.http.get("/api/overrides", params={"run_path": str(run)})).json()["overrides"]
    assert [(o["status"], o["revoked_by"]) for o in listed] == [("revoked", tomb["id"]), ("tombstone", None)]
    again = await service.post(f"/api/overrides/{entry['id']}/revoke", {"run_path": str(run), "reason": "twice"})
    assert again.status_code == 409 and again.json()["kind"] == "already_revoked"
    unknown = await service.post(f"/api/overrides/{uuid.uuid4()}/revoke", {"run_path": str(run), "reason": "x"})
    assert unknown.status_code == 404 and unknown.json()["kind"] == "not_found"
    assert len(creation(run)["validation_overrides"]) == 2


async def test_refused_overrides_write_nothing(service: Service) -> None:
    run = service.lab.make_run("Run_{{sample}}")
    before = (run / ".exlab-wizard" / "creation.json").read_bytes()
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat()
    cases = [
        ({"rule": "no_such_rule", "reason": "r"}, "unknown_rule"),
        ({"rule": "orphan", "reason": "r"}, "soft_rule"),
        ({"rule": RULE, "reason": "r", "expires_at": past}, "bad_value"),
        ({"rule": RULE, "reason": "r", "expires_at": "2099-01-01T00:00:00"}, "bad_value"),  # no time zone
        ({"rule": RULE, "reason": "r", "expires_at": "next week"}, "bad_value"),
        ({"rule": RULE, "reason": "   "}, "bad_value"),
        ({"rule": RULE}, "invalid_request"),
    ]
    for extra, kind in cases:
        reply = await service.post("/api/overrides", {"run_path": str(run), **extra})
        assert reply.status_code == 422, (extra, reply.text)
        assert reply.json()["kind"] == kind, reply.json()
        assert reply.json()["detail"]
    assert (run / ".exlab-wizard" / "creation.json").read_bytes() == before


async def test_override_needs_the_token(service: Service) -> None:
    run = service.lab.make_run("Run_{{sample}}")
    reply = await service.http.post("/api/overrides", json={"run_path": str(run), "rule": RULE, "reason": "r"})
    assert reply.status_code == 401
    assert creation(run)["validation_overrides"] == []
