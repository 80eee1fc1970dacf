"""A fresh filesystem for every measurement: what makes small-file figures fair.

On an ext4 without a journal (this machine's disk) the kernel does not hand
out inodes freed in the last minutes again, so creating 20,000 files right
after deleting 20,000 others is up to ten times slower: a benchmark that
deletes one method's copy before the next method runs makes the second pay
for the first. Here every method writes into a filesystem made for that one
measurement:

* ``loop`` (root, ``losetup`` and ``mkfs.ext4`` present): a sparse image,
  ``mkfs.ext4 -q`` (journaled, the default features), attached with
  ``losetup --direct-io=on`` (the loop device writes past the host's page
  cache, so a ``sync`` on it reaches the disk) and mounted; unmounted,
  detached and removed after the measurement;
* ``keep`` (no loop mounts possible): a new folder on the work disk for each
  measurement, nothing deleted until the benchmark ends.

    fs = FreshFs(base)                  # picks loop when it can
    with fs.make("small-ours", files=20_000, data_bytes=80 << 20) as dest:
        ...                             # dest: an empty folder, alone on its filesystem
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

__all__ = ["FreshFs", "loop_possible"]

_MIB = 1 << 20


def _run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[:500]}")
    return done.stdout


def loop_possible(base: Path) -> str:
    """``""`` when a loop-mounted ext4 can be made under ``base``, else why not."""
    if os.geteuid() != 0:
        return "not root"
    for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    probe = FreshFs(base, mode="loop")
    try:
        with probe.make("probe", files=10, data_bytes=0):
            pass
    except (RuntimeError, OSError) as exc:
        return f"loop mount failed: {exc}"
    return ""


class FreshFs:
    """Makes one empty destination per measurement (see the module doc)."""

    def __init__(self, base: Path, mode: str | None = None):
        self.base = base
        self.base.mkdir(parents=True, exist_ok=True)
        self.why_not_loop = ""
        if mode is None:
            self.why_not_loop = loop_possible(base)
            mode = "keep" if self.why_not_loop else "loop"
        self.mode = mode
        self.counter = 0

    def describe(self) -> str:
        if self.mode == "loop":
            return (
                "every method's copy went to a fresh loop-mounted ext4 made for that one measurement "
                "(sparse image, `mkfs.ext4 -q`, journaled; `losetup --direct-io=on`; unmounted and removed after)"
            )
        return (
            f"loop mounts impossible here ({self.why_not_loop}): every copy went to a new folder on the "
            "work disk and no copy was deleted before the benchmark ended"
        )

    @contextlib.contextmanager
    def make(self, label: str, *, files: int, data_bytes: int) -> Iterator[Path]:
        """An empty folder on a filesystem of its own (``loop``) or a never-used folder (``keep``)."""
        self.counter += 1
        name = f"{self.counter:03d}-{label}"
        if self.mode == "keep":
            dest = self.base / "keep" / name
            dest.mkdir(parents=True)
            yield dest  # removed with the whole base at the end, never before
            return
        image = self.base / f"{name}.img"
        mountpoint = self.base / name
        mountpoint.mkdir()
        size = max(128 * _MIB, int(data_bytes * 1.3) + files * 8192 + 64 * _MIB)
        inodes = max(4096, int(files * 1.2) + 2048)
        device = ""
        mounted = False
        try:
            with open(image, "wb") as handle:
                handle.truncate(size)
            _run(["mkfs.ext4", "-q", "-F", "-N", str(inodes), str(image)])
            device = _run(["losetup", "-f", "--show", "--direct-io=on", str(image)]).strip()
            _run(["mount", device, str(mountpoint)])
            mounted = True
            (mountpoint / "lost+found").rmdir()
            yield mountpoint
        finally:
            if mounted:
                _run(["umount", str(mountpoint)])
            if device:
                _run(["losetup", "-d", device])
            mountpoint.rmdir()
            image.unlink(missing_ok=True)

    def cleanup(self) -> None:
        shutil.rmtree(self.base / "keep", ignore_errors=True)
