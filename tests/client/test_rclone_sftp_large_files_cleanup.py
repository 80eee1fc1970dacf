"""Large files over rclone sftp, hashed on the NAS by openssl: the three rules hold through the reaper.

The verification and the audit of a run holding files of 1 MiB or more hash
those files with ``FAST_SHA256_COMMAND`` (``openssl dgst`` on the server,
docs/transports.md). Through the real NASSyncClient, rclone and the loopback
sshd, cleanup on (two passes, 24 h): a NAS byte flipped after the
verification (size and mtime kept) must be found by the audit's hashing,
never counted as a pass, no local byte deleted; the re-send puts the run's
bytes back, and only then, verified and audited again, is the local copy
deleted, the NAS copy byte-identical to what was written.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from exlab_wizard.config import parse_config
from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports.rclone import FAST_SHA256_MIN_BYTES
from tests.fixtures.sshd import write_rclone_sftp_config
from tests.helpers import Clock, flip_byte_keep_stat, regular_tree
from tests.lab import EQ, Lab, acts, data_intact, events, running, synced

pytestmark = pytest.mark.network
S = SyncJobState

LARGE = FAST_SHA256_MIN_BYTES
FILES = {
    "frames/f0.tif": os.urandom(LARGE + 123),
    "frames/f1.tif": os.urandom(2 * LARGE),
    "notes.txt": b"acquired ok\n",
}


def _nas_data(nas: Path) -> dict[str, bytes]:
    return {rel: data for rel, data in regular_tree(nas).items() if not rel.startswith(".exlab-wizard/")}


async def test_a_nas_byte_flipped_after_verification_is_found_by_the_audit_before_any_deletion(
    lab: Lab, sshd, remote_dir: Path, tmp_path: Path, openssl_calls: Path
) -> None:
    conf = write_rclone_sftp_config(tmp_path / "rclone.conf", sshd, name="labnas", remote_sha256=True)
    data = lab.config_data(sync={"backoff_s": [0.01, 0.01], "scan_interval_s": 3600, "audit_interval_s": 6 * 3600})
    data["equipment"][0]["transport"] = {
        "type": "rclone",
        "rclone_remote": "labnas",
        "rclone_remote_path": str(remote_dir),
        "rclone_config": str(conf),
    }
    data["nas_cleanup"] = {"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": True}
    cfg = parse_config(data)
    clock = Clock()
    run = lab.make_run(files=FILES)
    nas = remote_dir / run.relative_to(lab.local_root / EQ)
    async with running(cfg, clock) as client:
        await synced(client, run)  # the first pass: the large files hashed by openssl on the NAS
        assert _nas_data(nas) == FILES
        assert openssl_calls.read_text().count("call") == 2  # both large files, once each
        flip_byte_keep_stat(nas / "frames/f1.tif", offset=LARGE + 7)

        clock.advance(6)
        await client.audit_once()
        job = await client.job(run)
        assert not any(e.kind == "verify_pass" for e in job.events), "a damaged NAS copy counted as a pass"
        back = [e for e in events(job, "transition") if e.from_state == "verified" and e.to_state == "queued"]
        assert len(back) == 1 and "audit mismatch: 1 different" in back[0].detail, [e.detail for e in job.events]
        assert openssl_calls.read_text().count("call") == 4  # the audit's hashing that found it was openssl's
        clock.advance(19)
        assert not [o for o in acts(await client.cleanup_once()) if o.action == "deleted"]
        assert data_intact(run, FILES)  # not one local byte deleted

        await client.wait_idle(timeout=60)  # the re-send puts the run's bytes back on the NAS
        job = await client.job(run)
        assert job.state == S.VERIFIED and job.verify_passes == 1, job.last_error
        assert _nas_data(nas) == FILES
        clock.advance(6)
        await client.audit_once()
        clock.advance(19)
        assert (await client.job(run)).verify_passes == 2
        assert [o.action for o in acts(await client.cleanup_once())] == ["deleted"]
        assert (await client.job(run)).state == S.CLEANED
    assert not any((run / rel).exists() for rel in FILES)
    assert _nas_data(nas) == FILES
    calls = openssl_calls.read_text().count("call")
    assert calls > 4 and calls % 2 == 0  # the later hashings too, each of both large files
    assert "rclone_fast_sha256_off" not in lab.equipment_log().read_text()
