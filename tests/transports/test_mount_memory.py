"""Per-file memory of a mount push and of the remote manifest after it (issue 13: 200,000 files under 150 MB).

Measured with ``tracemalloc`` (the Python heap, not timed): the peak while a
run of a few thousand tiny files is pushed, and while its remote manifest is
taken, beyond what was allocated before, divided by the file count. Batches
are made small so the figure is what is held per file, not the batch in flight.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from pathlib import Path

import pytest

from exlab_wizard.sync.transports import mount as mount_module
from tests.lab import MountLab

FILES = 5000
#: Bytes a file at the traced peak. Before the per-file records were cut (absolute paths,
#: folder and name strings per file, read-back stats as tuples of ints, sorted copies as
#: lists of pairs) these were about 920 and 730; then about 530 and 500. With the read-back kept
#: as a count and a sum of tags a folder, and the manifest a view of the local digests, about 410.
PUSH_BOUND = 460
MANIFEST_BOUND = 460


def test_push_and_remote_manifest_hold_few_bytes_per_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mount_module, "BATCH_FILES", 128)
    lab = MountLab(tmp_path)
    lab.write(".exlab-wizard/creation.json", b"{}")
    lab.push()  # imports and first-use caches, outside the measurement
    asyncio.run(lab.transport.remote_manifest(lab.run))
    for index in range(FILES):
        lab.write(f"f{index // 500:03d}/s_{index:06d}.bin", index.to_bytes(4, "little"))
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = lab.push()
        push_peak = tracemalloc.get_traced_memory()[1] - before
        tracemalloc.reset_peak()
        manifest = asyncio.run(lab.transport.remote_manifest(lab.run))
        manifest_peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert result.files_sent == FILES
    assert manifest.hashes == result.local_hashes  # every file read back and matching
    assert push_peak / FILES < PUSH_BOUND, f"push: {push_peak / FILES:.0f} bytes a file at the peak"
    assert manifest_peak / FILES < MANIFEST_BOUND, f"manifest: {manifest_peak / FILES:.0f} bytes a file at the peak"
