"""``bench/floor.py``'s direct copy writes every byte, unaligned tails and empty files included; its read back
reads every byte of a copy from storage."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import floor  # noqa: E402


def test_direct_copy_is_byte_identical(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    sizes = {"empty": 0, "tiny": 100, "block": 4096, "tail": 5000, "deep/big": (9 << 20) + 3}
    for name, size in sizes.items():
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
    floor.direct_copy(src, dst)
    for name in sizes:
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name


def test_read_back_reads_every_byte_from_storage(tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    sizes = {"empty": 0, "tail": 5000, "deep/big": (9 << 20) + 3}
    for name, size in sizes.items():
        path = copy / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
    os.sync()
    before = _read_bytes()
    assert floor.read_back(copy) > 0
    # O_DIRECT: read from the device although the page cache still holds every byte just written
    assert _read_bytes() - before >= sum(sizes.values()) - 4096


def _read_bytes() -> int:
    """This process's bytes read from storage so far (``read_bytes`` of /proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise AssertionError("no read_bytes in /proc/self/io")
