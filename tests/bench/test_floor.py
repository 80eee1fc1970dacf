"""``bench/floor.py``'s direct copy writes every byte, unaligned tails and empty files included."""

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
