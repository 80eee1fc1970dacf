"""A mount push sends or finds every file it listed, or fails: never a run VERIFIED without one of its files.

The local manifest of a mount push is the push's own hashes, so a file a send
path left out would be missing from the NAS and from the local manifest
alike, and the verification, comparing the two, could not see it. The push
checks that every listed file was hashed. Forced here by a send path that
drops a file (injected); the spilled path that once did (the interleave of
large files given a chunk of 0 when every map spills from its first entry)
is run for real, in a child process with ``EXLAB_SPILL_AT=0``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exlab_wizard.sync.transports import mount as mount_module
from exlab_wizard.sync.transports.base import TransportError, TransportErrorKind
from tests.lab import MountLab

REPO = Path(__file__).resolve().parents[2]
LARGE = 2 * mount_module.LARGE_FILE  # sent alone, fsynced on its own


@pytest.mark.parametrize("which", ["alone", "batched"])
def test_a_send_path_that_leaves_a_file_out_fails_the_push(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    lab = MountLab(tmp_path)
    for index in range(20):
        lab.write(f"frames/f{index:02d}.raw", bytes([index]) * 100)
    lab.write("stack.tif", os.urandom(LARGE))
    if which == "alone":
        real = mount_module._interleave
        monkeypatch.setattr(mount_module, "_interleave", lambda sources, *a: list(real(sources, *a))[:-1])
    else:
        real_small = mount_module.MountTransport._send_small
        monkeypatch.setattr(
            mount_module.MountTransport,
            "_send_small",
            lambda self, job, small: real_small(self, job, (s for s in small if s.rel != "frames/f07.raw")),
        )
    with pytest.raises(TransportError) as caught:
        lab.push()
    assert caught.value.kind is TransportErrorKind.UNKNOWN
    assert "push incomplete: 20 of the 21 files listed" in caught.value.message, caught.value.message


_CHILD = """
import asyncio, json, sys
from pathlib import Path
from tests.lab import client_lab, make_client

async def main(root):
    lab = client_lab(Path(root))
    files = {f"frames/f{i:03d}.raw": bytes([i % 256]) * 64 for i in range(150)}
    files["stack.tif"] = b"L" * int(sys.argv[2])
    run = lab.make_run("Run_2026-01-01", files=files)
    client = make_client(lab.config())
    await client.init()
    try:
        await client.enqueue(run)
        await client.wait_idle(timeout=120)
        job = await client.job(run)
    finally:
        await client.close()
    manifest = (run / ".exlab-wizard" / "checksums.sha256").read_text() if job.state.value == "verified" else ""
    nas = lab.nas_copy(run) / "stack.tif"
    print(json.dumps({"state": job.state.value, "error": job.last_error,
                      "listed": manifest.count("\\n"), "stack_on_nas": nas.exists() and nas.stat().st_size}))

asyncio.run(main(sys.argv[1]))
"""


def test_every_map_spilled_from_the_environment_verifies_every_file(tmp_path: Path) -> None:
    env = {**os.environ, "EXLAB_SPILL_AT": "0", "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path), str(LARGE)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome == {"state": "verified", "error": None, "listed": 151, "stack_on_nas": LARGE}, outcome
