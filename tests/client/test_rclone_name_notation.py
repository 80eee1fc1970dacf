"""rclone: names with ``／`` (U+FF0F) or ``␀`` (U+2400) are sent and verified; ``‛`` names are refused.

The push wrote its ``--files-from0`` list in a notation of its own, not the
one rclone uses for local files: rclone writes a real ``／`` and a real ``␀``
as they are (they are its local backend's stand-ins for ``/`` and NUL), where
the list quoted them (``‛／``, ``‛␀``). rclone looked for another name, found
none and skipped the file without an error: the push "succeeded", the NAS
never held the file, verification found it missing, the rewrite's ``copyto``
then failed ("directory not found", ``unknown``) and the job ended FAILED after
every retry. ``試料Ａ／Ｂ.csv`` is an ordinary name in a CJK lab; a run *folder*
so named was not found at all. A ``‛`` (U+201B) before an ordinary character
is a name rclone cannot find whatever it is told (it lists ``‛`` and ``‛‛``
alike): such a run is refused before anything is written, naming the file.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from exlab_wizard.config import parse_config
from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock
from tests.lab import EQ, Lab, rclone_s3_equipment, running

pytestmark = pytest.mark.network
S = SyncJobState


def _s3_lab(tmp_path: Path, s3_server, s3_rclone_config) -> tuple[Lab, object, Path]:
    """(lab, config, the folder on the store's disk where its runs land)."""
    lab = Lab.build(tmp_path)
    data = lab.config_data(sync={"backoff_s": [0.01, 0.01], "scan_interval_s": 0.05})
    prefix = f"names-{uuid.uuid4().hex[:10]}"
    data["equipment"] = rclone_s3_equipment(lab, s3_server, s3_rclone_config, prefix)
    return lab, parse_config(data), s3_server.data_dir / s3_server.bucket / prefix


async def _sync(cfg, run: Path):
    async with running(cfg, Clock()) as client:
        await client.enqueue(run)
        await client.wait_idle(timeout=60)
        return await client.job(run)


def _files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("name", ["試料Ａ／Ｂ.csv", "x␀y.dat"], ids=["fullwidth_solidus", "nul_picture"])
async def test_a_run_with_such_a_name_is_verified(tmp_path: Path, s3_server, s3_rclone_config, name) -> None:
    lab, cfg, nas = _s3_lab(tmp_path, s3_server, s3_rclone_config)
    run = lab.make_run("Run_2026-01-01", files={name: b"measured\n", "ok.txt": b"ok\n"})
    job = await _sync(cfg, run)
    assert job.state == S.VERIFIED, f"{job.state.value} {job.error_kind}: {job.last_error}; NAS: {_files_under(nas)}"
    assert [p for p in _files_under(nas) if p.endswith(name)], _files_under(nas)


async def test_a_run_folder_with_such_a_name_is_verified(tmp_path: Path, s3_server, s3_rclone_config) -> None:
    lab, cfg, nas = _s3_lab(tmp_path, s3_server, s3_rclone_config)
    run = lab.make_run("Run_試料Ａ／Ｂ", files={"ok.txt": b"ok\n"})
    job = await _sync(cfg, run)
    assert job.state == S.VERIFIED, f"{job.state.value} {job.error_kind}: {job.last_error}; NAS: {_files_under(nas)}"
    assert all("/Run_試料Ａ／Ｂ/" in p for p in _files_under(nas)), _files_under(nas)  # the claim too


async def test_the_same_on_rclone_sftp(tmp_path: Path, sshd, remote_dir, rclone_sftp_config) -> None:
    """Not S3-only: the local side of rclone reads the same notation on every backend."""
    lab = Lab.build(tmp_path)
    data = lab.config_data(sync={"backoff_s": [0.01, 0.01], "scan_interval_s": 0.05})
    data["equipment"] = [
        {
            "id": EQ,
            "local_root": str(lab.local_root),
            "transport": {
                "type": "rclone",
                "rclone_remote": "labsftp",
                "rclone_remote_path": str(remote_dir),
                "rclone_config": str(rclone_sftp_config(sshd)),
            },
        }
    ]
    run = lab.make_run("Run_2026-01-01", files={"試料Ａ／Ｂ.csv": b"measured\n", "ok.txt": b"ok\n"})
    job = await _sync(parse_config(data), run)
    on_nas = _files_under(remote_dir)
    assert job.state == S.VERIFIED, f"{job.state.value} {job.error_kind}: {job.last_error}; NAS: {on_nas}"
    assert [p for p in on_nas if p.endswith("/試料Ａ／Ｂ.csv")], on_nas


async def test_a_name_rclone_cannot_find_is_refused_before_any_write(
    tmp_path: Path, s3_server, s3_rclone_config
) -> None:
    lab, cfg, nas = _s3_lab(tmp_path, s3_server, s3_rclone_config)
    files = {"it‛s.txt": b"measured\n", "ok.txt": b"ok\n"}
    run = lab.make_run("Run_2026-01-01", files=files)
    job = await _sync(cfg, run)
    assert (job.state, job.error_kind) == (S.FAILED, "remote_write_refused"), job.last_error
    assert "file name with ‛ (U+201B): rclone cannot find it by its name: it‛s.txt" in job.last_error
    assert not nas.exists()  # nothing written, not even a claim
    assert all((run / name).read_bytes() == body for name, body in files.items())
