"""A run whose per-file records are on disk (``spill.SpillMap`` past its bound) ends as an in-memory one does.

The same run, files and names (a name that is not UTF-8, a newline, a
backslash, a name under ``-``, folders interleaved in byte order) synced
twice through the client on the mount transport: once with every per-file
map in memory, once with every map spilled to disk from its first entry.
Both reach VERIFIED with the same ``checksums.sha256``, byte for byte (its
digest is what the reaper and the audit check the run against), the same
verified stats recorded for every file, and a NAS copy ``sha256sum -c``
passes. A file changed on the NAS is found by the spilled verification too.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from exlab_wizard.sync import spill
from exlab_wizard.sync.manifest_format import manifest_path
from exlab_wizard.sync.reaper import load_verified_stats
from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports import mount as mount_module
from tests.client.test_end_to_end import OVERRIDE  # the override of the names these runs hold
from tests.helpers import require_tool
from tests.lab import client_lab, make_client

FILES: dict[str, bytes] = {
    **{f"f{index % 7}/s_{index:04d}.bin": index.to_bytes(4, "little") * (index % 5) for index in range(400)},
    # "a/b" sorts between "a-" and "a0": a folder's files are not together in byte order
    **{f"a/{name}": name.encode() for name in ("x", "b/y", "b-z", "B", "é")},
    "a-": b"dash",
    "a0": b"zero",
    os.fsdecode(b"caf\xe9.raw"): b"not utf-8",
    "new\nline.txt": b"newline",
    "back\\slash.txt": b"backslash",
    "-": b"a file named dash",
}


async def _verified(root: Path, spill_at: int | None) -> tuple[bytes, dict, Path, Path]:
    lab = client_lab(root)
    run = lab.make_run("Run_2026-01-01", files=FILES, overrides=[OVERRIDE])
    client = make_client(lab.config())
    await client.init()
    try:
        await client.enqueue(run)
        await client.wait_idle(timeout=120)
        job = await client.job(run)
        assert job is not None and job.state == SyncJobState.VERIFIED, job and job.last_error
        stats = {
            rel: (row.sha256, row.size) for rel, row in load_verified_stats(client._require_queue(), job.id).items()
        }
    finally:
        await client.close()
    return manifest_path(run).read_bytes(), stats, run, lab.nas_copy(run)


async def test_a_spilled_run_verifies_to_the_same_manifest_and_stats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[spill.SpillMap] = []
    real = spill.SpillMap.__init__

    def counted(self: spill.SpillMap, *args: object, **kwargs: object) -> None:
        real(self, *args, **kwargs)  # type: ignore[arg-type]
        made.append(self)

    monkeypatch.setattr(spill.SpillMap, "__init__", counted)
    monkeypatch.setattr(spill, "SPILL_AT", None)
    in_memory = await _verified(tmp_path / "memory", None)
    assert made and not any(m.spilled for m in made)
    made.clear()
    monkeypatch.setattr(spill, "SPILL_AT", 0)
    monkeypatch.setattr(mount_module, "BATCH_FILES", 64)  # several batches, flushes between them
    on_disk = await _verified(tmp_path / "disk", 0)
    assert made and all(m.spilled for m in made if m)  # every map that held an entry, on disk

    assert on_disk[0] == in_memory[0]  # the manifest, byte for byte
    assert on_disk[1] == in_memory[1] and len(on_disk[1]) == len(FILES)
    sha256sum = require_tool("sha256sum")
    _manifest, _stats, run, nas = on_disk
    for copy in (run, nas):
        check = subprocess.run(
            [sha256sum, "-c", "--quiet", ".exlab-wizard/checksums.sha256"], cwd=copy, capture_output=True
        )
        assert check.returncode == 0, check.stdout + check.stderr


async def test_a_spilled_verification_finds_a_changed_nas_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The push's read-back confirms folders from a spilled map; a NAS file changed after it is still found."""
    monkeypatch.setattr(spill, "SPILL_AT", 0)
    lab = client_lab(tmp_path)
    run = lab.make_run("Run_2026-01-01", files={f"d{i % 3}/f{i:03d}.bin": bytes([i]) * 64 for i in range(90)})
    client = make_client(lab.config())
    real_manifest = mount_module.MountTransport._remote_manifest

    def changed_first(self, run_path: Path, abort=None):  # type: ignore[no-untyped-def]
        target = lab.nas_copy(run) / "d1" / "f001.bin"
        data = bytearray(target.read_bytes())
        data[10] ^= 0xFF
        target.write_bytes(bytes(data))
        monkeypatch.setattr(mount_module.MountTransport, "_remote_manifest", real_manifest)
        return real_manifest(self, run_path, abort)

    monkeypatch.setattr(mount_module.MountTransport, "_remote_manifest", changed_first)
    await client.init()
    try:
        await client.enqueue(run)
        await client.wait_idle(timeout=120)
        job = await client.job(run)
        assert job is not None
        mismatch = [e for e in job.events if "hash mismatch" in (e.detail or "")]
        assert mismatch and "d1/f001.bin" in mismatch[0].detail, [e.detail for e in job.events]
        assert job.state == SyncJobState.VERIFIED, job.last_error  # the retry put the bytes back
        assert (lab.nas_copy(run) / "d1" / "f001.bin").read_bytes() == bytes([1]) * 64
    finally:
        await client.close()
