"""``sync_network.py`` with every measurement's remote copy on a fresh loop-mounted ext4.

On this machine's ext4 (no journal) inodes freed in the last minutes are not
reused, so a method measured right after the previous copy was deleted pays
for that delete (up to ten times slower on 20,000 small files). Here the
remote folder of each measurement is the root of a filesystem made for it
(``truncate``, ``mkfs.ext4`` with its inode tables written at once, ``mount -o
loop``, owned by the ssh login user) and unmounted and removed right after,
outside the timings. Everything else -- datasets, methods, options, output --
is ``sync_network.py``'s. Needs root (mount).

    .venv/bin/python bench/network_profile.py --datasets small,mixed,big --methods R,RB,RR --repeat 3
    .venv/bin/python bench/network_profile.py --scale 0.05 --repeat 1         # smoke run

``EXLAB_BENCH_IMG_DIR`` (default ``/var/tmp``) holds the image files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sync_network

__all__ = ["FreshRemoteBench", "main"]

IMAGE_SIZE = "3G"  # sparse; holds the largest dataset (1 GiB) with room to spare


def _run(argv: list[object]) -> None:
    subprocess.run([os.fspath(a) for a in argv], check=True, capture_output=True)


class FreshRemoteBench(sync_network.Bench):
    """A ``Bench`` whose remote root is a new ext4 filesystem for every measurement."""

    made: list[FreshRemoteBench] = []

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        folder = os.environ.get("EXLAB_BENCH_IMG_DIR", "/var/tmp")
        self.images = Path(tempfile.mkdtemp(prefix="exlab-bench-img-", dir=folder))
        self.images.chmod(0o755)  # the login user reaches the mount points through it
        self.mounted: tuple[Path, Path] | None = None
        self.filesystems = 0
        FreshRemoteBench.made.append(self)
        self._mount_fresh()

    def _mount_fresh(self) -> None:
        self.filesystems += 1
        image = self.images / f"nas-{self.filesystems}.img"
        mount = self.images / f"mnt-{self.filesystems}"
        mount.mkdir(mode=0o755)
        _run(["truncate", "-s", IMAGE_SIZE, image])
        _run(["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", image])
        _run(["mount", "-o", "loop", image, mount])
        self.mounted = (image, mount)
        root = mount / "nas"
        root.mkdir(mode=0o755)
        shutil.chown(root, sync_network.RW_USER, sync_network.RW_USER)
        _run(["sync"])
        self.remote_root = root

    def _unmount(self) -> None:
        if self.mounted is None:
            return
        image, mount = self.mounted
        self.mounted = None
        _run(["umount", mount])
        mount.rmdir()
        image.unlink()

    def _clean_remote(self) -> None:
        self._unmount()
        self._mount_fresh()

    def close(self) -> None:
        self._unmount()
        shutil.rmtree(self.images, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    sync_network.Bench = FreshRemoteBench  # type: ignore[misc]
    try:
        return sync_network.main(argv)
    finally:
        for bench in FreshRemoteBench.made:
            bench.close()


if __name__ == "__main__":
    sys.exit(main())
