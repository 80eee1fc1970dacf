"""Run paths inside the roots that the file system will not look at, and runs with a broken metadata folder.

docs/service.md: every error is ``{"detail", "kind"}``. A path segment longer
than NAME_MAX (255 bytes) passed the path check (``realpath`` does not stat)
and every route that then looked at it answered 500 with a traceback; a run
whose ``.exlab-wizard`` is a regular file did the same to ``POST /api/verify``.
An ``OSError`` that no route expects is answered as JSON too, never a traceback.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from exlab_wizard.service import app as app_module
from exlab_wizard.service.runpaths import OutsideRoots, resolve_run_path
from exlab_wizard.sync import verifier as verifier_module
from exlab_wizard.sync.transports import TransportError, TransportErrorKind
from tests.lab import Lab
from tests.service.conftest import Service

RULE = "unresolved_placeholder_token"
TRACEBACK_MARKERS = ("Traceback (most recent call last)", 'File "/', "Internal Server Error")


def _long_run(lab: Lab) -> str:
    return str(lab.local_root / "CONFOCAL_01" / "PROJ-1" / "Runs" / ("Run_" + "x" * 300))


def _no_traceback(reply: object) -> None:
    text = reply.text  # type: ignore[attr-defined]
    assert not any(marker in text for marker in TRACEBACK_MARKERS), text[:500]


async def test_a_path_segment_over_name_max_is_refused_by_every_run_path_route(service: Service) -> None:
    lab = service.lab
    lab.make_run("Run_A")  # a real run beside it, so the roots exist
    long_run = _long_run(lab)
    answers = {
        "POST /api/enqueue": await service.post("/api/enqueue", {"run_path": long_run}),
        "POST /api/verify": await service.post("/api/verify", {"run_path": long_run}),
        "GET /api/problems": await service.http.get("/api/problems", params={"run_path": long_run}),
        "GET /api/overrides": await service.http.get("/api/overrides", params={"run_path": long_run}),
        "POST /api/overrides": await service.post(
            "/api/overrides", {"run_path": long_run, "rule": RULE, "reason": "r"}
        ),
        "POST /api/overrides/{id}/revoke": await service.post(
            "/api/overrides/abcdefgh/revoke", {"run_path": long_run, "reason": "r"}
        ),
    }
    for route, reply in answers.items():
        assert reply.status_code == 400, (route, reply.status_code, reply.text[:300])
        assert reply.json()["kind"] == "outside_roots", (route, reply.text[:300])
        assert "File name too long" in reply.json()["detail"], (route, reply.text[:300])
        _no_traceback(reply)


def test_resolve_run_path_refuses_what_it_cannot_look_at_and_lets_an_absent_run_through(tmp_path: Path) -> None:
    lab = Lab.build(tmp_path)
    run = lab.make_run("Run_A")
    config = lab.config()
    with pytest.raises(OutsideRoots, match="File name too long"):
        resolve_run_path(config, _long_run(lab))
    # absent, or under a file: not refused here (the routes answer 422 not_a_run)
    absent = run.parent / "Run_not_yet"
    assert resolve_run_path(config, str(absent))[0] == absent
    under_a_file = run / "data.bin" / "sub"
    assert resolve_run_path(config, str(under_a_file))[0] == under_a_file
    # a long segment under a folder that does not exist is only absent
    assert resolve_run_path(config, str(absent / ("x" * 300)))[0] == absent / ("x" * 300)


async def test_a_long_segment_under_a_missing_folder_is_not_a_run(service: Service) -> None:
    service.lab.make_run("Run_A")
    path = str(service.lab.local_root / "CONFOCAL_01" / "PROJ-1" / "Runs" / "Run_gone" / ("x" * 300))
    reply = await service.post("/api/enqueue", {"run_path": path})
    assert reply.status_code == 422 and reply.json()["kind"] == "not_a_run", reply.text


async def test_verify_of_a_run_whose_metadata_folder_is_a_file_is_409_bad_manifest(service: Service) -> None:
    run = service.lab.make_run("Run_B", creation=False)
    (run / ".exlab-wizard").write_text("not a folder")
    reply = await service.post("/api/verify", {"run_path": str(run)})
    assert reply.status_code == 409, reply.text[:300]
    assert reply.json()["kind"] == "bad_manifest"
    assert "checksums.sha256 cannot be read: Not a directory" in reply.json()["detail"]
    _no_traceback(reply)


async def test_verify_of_a_run_whose_manifest_is_a_folder_is_409_bad_manifest(service: Service) -> None:
    run = service.lab.make_run("Run_C")
    (run / ".exlab-wizard" / "checksums.sha256").mkdir()
    reply = await service.post("/api/verify", {"run_path": str(run)})
    assert reply.status_code == 409 and reply.json()["kind"] == "bad_manifest", reply.text[:300]


@pytest.mark.parametrize(
    ("code", "kind"), [(errno.EACCES, "unknown"), (errno.EIO, "unknown"), (errno.ELOOP, "local_file_vanished")]
)
async def test_an_os_error_no_route_expects_is_json_not_a_traceback(
    service: Service, monkeypatch: pytest.MonkeyPatch, code: int, kind: str
) -> None:
    run = service.lab.make_run("Run_D")

    def refused(*_args: object, **_kwargs: object) -> None:
        raise OSError(code, "refused by the test", str(run / "data.bin"))

    monkeypatch.setattr(app_module, "evaluate_run", refused)
    reply = await service.http.get("/api/problems", params={"run_path": str(run)})
    assert reply.status_code == 409, reply.text[:300]
    assert reply.json() == {"detail": f"{run / 'data.bin'}: refused by the test", "kind": kind}
    _no_traceback(reply)


async def test_verify_of_a_run_whose_file_vanishes_while_hashed_is_409(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = service.lab.make_run("Run_E")

    def vanished(*_args: object, **_kwargs: object) -> None:
        raise TransportError(TransportErrorKind.LOCAL_FILE_VANISHED, f"data.bin: vanished from {run} while hashing")

    monkeypatch.setattr(verifier_module, "hash_tree", vanished)
    reply = await service.post("/api/verify", {"run_path": str(run)})
    assert reply.status_code == 409, reply.text[:300]
    assert reply.json() == {"detail": f"data.bin: vanished from {run} while hashing", "kind": "local_file_vanished"}
