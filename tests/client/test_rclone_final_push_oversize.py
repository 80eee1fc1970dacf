"""A cleanup with ``retain_cache: false`` on rclone S3 whose checksums.sha256 is too large to stream ends CLEANED.

On S3 the rclone transport hashes the NAS copy by downloading it, and a file larger than
``verify_max_stream_bytes`` comes back ``unverifiable`` (verify_skipped_oversize), never hashed.
The final metadata push's proof (``metadata_push.final_push``) reads the remote manifest back:
as soon as it lists any ``.exlab-wizard/`` file (the claim file, creation.json), every local
``.exlab-wizard/`` file must be among its *hashes*; an oversize ``checksums.sha256`` never is, so
every pass answered "final metadata push not verified: missing or different on the NAS:
.exlab-wizard/checksums.sha256". The local data were deleted already (the plan ran): the job
waited in CLEANUP_ELIGIBLE for ever (review of rclone through cleanup). Such a file is now read
back whole and hashed.

Second, smaller: ``make_transport`` never passed ``verify_max_stream_bytes`` to the rclone
transport (rsync_ssh got it): on rclone the configured limit was ignored, the built-in 1 GiB
always applied.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from exlab_wizard.config import parse_config
from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports.rclone import RcloneTransport
from tests.fixtures.rclone_serve import S3Server, find_rclone
from tests.helpers import Clock
from tests.lab import EQ, Lab, acts, ready, running

S = SyncJobState
pytestmark = pytest.mark.network

#: many small frames: each well under the limit, their checksums.sha256 (about 5 KB) over it
MANY = {f"frames/frame_{i:04d}.dat": b"%05d" % i for i in range(60)}
LIMIT = 3000


@pytest.fixture
def own_s3(tmp_path: Path):
    server = S3Server(find_rclone(), tmp_path / "s3").start()
    yield server
    server.stop()


def _config(lab: Lab, server: S3Server, tmp_path: Path):
    conf = tmp_path / "rclone.conf"
    conf.write_text(server.config_text("labnas"))
    data = lab.config_data(
        sync={
            "backoff_s": [0.01, 0.01],
            "scan_interval_s": 3600,
            "audit_interval_s": 6 * 3600,
            "verify_max_stream_bytes": LIMIT,
        }
    )
    data["equipment"][0]["transport"] = {
        "type": "rclone",
        "rclone_remote": "labnas",
        "rclone_remote_path": f"{server.bucket}/nas",
        "rclone_config": str(conf),
    }
    data["nas_cleanup"] = {"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": False}
    return parse_config(data)


async def test_the_configured_stream_limit_reaches_the_rclone_transport(lab: Lab, tmp_path: Path, own_s3) -> None:
    cfg = _config(lab, own_s3, tmp_path)
    clock = Clock()
    async with running(cfg, clock) as client:
        transport = client._ctx.remotes.transport(cfg.equipment_by_id(EQ))
        assert isinstance(transport, RcloneTransport)
        assert transport.verify_max_stream_bytes == LIMIT  # 1 GiB whatever the config says


async def test_final_push_with_an_oversize_manifest_is_not_stuck_for_ever(lab: Lab, tmp_path: Path, own_s3) -> None:
    cfg = _config(lab, own_s3, tmp_path)
    clock = Clock()
    run = lab.make_run(files=MANY)
    async with running(cfg, clock) as client:
        await ready(client, clock, run)  # every data file verified twice (each under the limit)
        assert (run / ".exlab-wizard" / "checksums.sha256").stat().st_size > LIMIT
        outcomes = []
        for _ in range(5):  # five passes, a day apart
            clock.advance(24)
            outcomes += acts(await client.cleanup_once())
        job = await client.job(run)
    assert not any((run / rel).exists() for rel in MANY)  # the local data are gone already
    assert job.state == S.CLEANED, (job.state.value, outcomes[-1].reason)
