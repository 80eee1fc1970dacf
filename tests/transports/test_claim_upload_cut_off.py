"""A claim upload cut off leaves the transport's temporary file in claims/: it names no job.

rclone (sftp) uploads ``<leaf>`` as ``<leaf>.<8 hex>.partial`` and renames it; rsync
writes ``.<leaf>.<6 random>`` and renames it. A push cut off (SIGKILL of the client
for rclone, a NAS power cut for rsync) while sending ``.exlab-wizard/claims/<job id>``
leaves that temporary file. ``claim_markers`` took every regular file in claims/ for
a job id, so the job's own next push found "another job's claim" and was refused
REMOTE_CONFLICT on every retry, though no other run ever came near the folder (found by
review). Only a job id's exact form is a claim now.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import tests.transports.test_conformance as conf
from exlab_wizard.sync.transports.base import TransportError

pytestmark = pytest.mark.network
OWNER = "a" * 32


@pytest.fixture(params=["rsync_ssh", "rclone_sftp"])
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> conf.Remote:
    return conf._FACTORIES[request.param](request, tmp_path)


async def test_the_jobs_own_cut_off_claim_upload_does_not_lock_it_out(remote, tmp_path):
    local_root = tmp_path / "lab"
    eq = remote.equipment(local_root)
    files = {"frame_001.tif": b"frame", "sub/stack.raw": b"stack"}
    run = conf.make_run(eq.local_root, files, symlink=False)
    # What the first push's claim upload left when it was cut off (nothing else was written yet).
    conf.put_on_disk(remote, {f".exlab-wizard/claims/{remote.leftover(OWNER)}": b""})

    try:
        result = await remote.transport(eq).push(run, bwlimit_kibps=None, fresh=True, owner=OWNER)
    except TransportError as exc:  # the job is FAILED remote_conflict, for ever
        pytest.fail(f"the job's own retry is refused from a folder only it ever wrote to: {exc.kind}: {exc.message}")
    assert result.ok


async def test_rclone_sftp_leaves_a_partial_named_like_a_claim_when_killed(tmp_path, request):
    """The leftover of the test above is real: rclone copyto to sftp, SIGKILLed mid-upload."""
    remote = conf._FACTORIES["rclone_sftp"](request, tmp_path)
    eq = remote.equipment(tmp_path / "lab")
    big = tmp_path / "claim"
    big.write_bytes(os.urandom(4 << 20))
    claims = remote.run_on_disk / ".exlab-wizard" / "claims"
    conf.put_on_disk(remote, {".exlab-wizard/claims/.keep": b""})
    (claims / ".keep").unlink()
    t = eq.transport
    argv = [
        conf.shutil.which("rclone") or str(Path(os.sys.executable).parent / "rclone"),
        "--config",
        str(t.rclone_config),
        "--bwlimit",
        "256k",
        "copyto",
        str(big),
        f"{t.rclone_remote}:{t.rclone_remote_path}/{conf.RUN_REL.as_posix()}/.exlab-wizard/claims/{OWNER}",
    ]
    proc = subprocess.Popen(argv)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(claims.iterdir()):
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = sorted(p.name for p in claims.iterdir())
    assert len(left) == 1 and left[0].startswith(OWNER + ".") and left[0].endswith(".partial"), left

    run = conf.make_run(eq.local_root, {"frame_001.tif": b"frame"}, symlink=False)
    try:
        result = await remote.transport(eq).push(run, bwlimit_kibps=None, fresh=True, owner=OWNER)
    except TransportError as exc:
        pytest.fail(f"refused after its own killed claim upload: {exc.kind}: {exc.message}")
    assert result.ok
