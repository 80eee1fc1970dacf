"""A file whose NAS path is close to PATH_MAX, edited after verification, is sent again and its run cleaned.

Sending it again keeps the verified NAS copy under
``.exlab-wizard/previous/<stamp>/<path>``, ~40 bytes deeper than the file:
that absolute path is past PATH_MAX (4096 bytes). The mount transport used
to rename it there by absolute path and failed ``remote_write_refused``
("File name too long") on every retry, so the edit never reached the NAS.
It now works below the run folder through open folders (``dir_fd``), and
so do its listings and its remote manifest, which read the kept copy too.
Two shapes: a 200-byte file name (the kept file's path is too long), and a
short name in a folder near the limit (the kept folder's path is too long).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from exlab_wizard.sync.states import SyncJobState
from tests.helpers import Clock
from tests.lab import Site, running, synced

S = SyncJobState
PATH_MAX = 4096


def _make_chain(run: Path, parts: list[str], data: bytes, *, create: bool = True) -> None:
    fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            if create:
                os.mkdir(part, dir_fd=fd)
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        out = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=fd)
        os.write(out, data)
        os.close(out)
    finally:
        os.close(fd)


def _read_chain(root: Path, parts: list[str]) -> bytes:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        with os.fdopen(os.open(parts[-1], os.O_RDONLY, dir_fd=fd), "rb") as handle:
            return handle.read()
    finally:
        os.close(fd)


def _parts(longest: int, name: str) -> list[str]:
    """Folders, then ``name``: ``longest`` + the path fits PATH_MAX with 10 bytes to spare."""
    left = PATH_MAX - 1 - longest - 1 - 10 - (len(name) + 1)
    parts: list[str] = []
    while left >= 2:
        seg = min(200, left - 1)
        parts.append("d" * seg)
        left -= seg + 1
    return [*parts, name]


@pytest.mark.parametrize("name", ["f" * 200, "f.bin"], ids=["long_name", "deep_folder"])
async def test_an_edited_file_near_path_max_is_sent_again_kept_and_cleaned(site: Site, name: str) -> None:
    run = site.make_run("Run_1", files={"other.bin": b"o"})
    nas_run = site.nas_copy(run)
    longest = max(len(os.fsencode(str(run))), len(os.fsencode(str(nas_run))))
    parts = _parts(longest, name)
    path_bytes = longest + 1 + len("/".join(parts))
    assert PATH_MAX - 60 < path_bytes < PATH_MAX  # fits; under .exlab-wizard/previous/<stamp>/ it does not
    _make_chain(run, parts, b"v1 data")
    clock = Clock()
    cfg = site.config(
        sync={"audit_interval_s": 6 * 3600, "scan_interval_s": 3600},
        cleanup={"enabled": True, "min_verify_passes": 2, "min_age_hours": 24, "retain_cache": True},
    )
    async with running(cfg, clock) as client:
        await synced(client, run)
        assert _read_chain(nas_run, parts) == b"v1 data"
        _make_chain(run, parts, b"v2 data, an edit after verification", create=False)
        clock.advance(6)
        await client.audit_once()  # the audit passes, sees the edit, sends the run again
        for _ in range(100):
            await client.wait_idle(timeout=60)
            job = await client.job(run)
            if job.state not in (S.QUEUED, S.RUNNING):
                break
            await asyncio.sleep(0.05)
        assert job.state == S.VERIFIED, (job.state, (job.last_error or "")[:300])
        assert _read_chain(nas_run, parts) == b"v2 data, an edit after verification"
        (stamp,) = os.listdir(nas_run / ".exlab-wizard" / "previous")
        assert _read_chain(nas_run, [".exlab-wizard", "previous", stamp, *parts]) == b"v1 data"

        clock.advance(6)
        await client.audit_once()  # the NAS copy, kept copy included, is read again
        await client.wait_idle(timeout=60)
        clock.advance(19)
        await client.cleanup_once()
        await client.wait_idle(timeout=60)
        job = await client.job(run)
    assert job.state == S.CLEANED, (job.state, job.last_error, [e.detail for e in job.events][-5:])
    assert not (run / parts[0]).exists()
    assert _read_chain(nas_run, parts) == b"v2 data, an edit after verification"
