"""The disk's own floor for copying a run: what no copier on this machine can beat by much.

``direct_copy(src, dst)``: every file of ``src`` read with ``O_DIRECT`` (past
the page cache, from the disk, even when the source is cached) and its bytes
written to ``dst`` with ``O_DIRECT``, on two threads (one per core), with an
8 MiB aligned buffer each, then one ``syncfs`` of the destination (the new
files' metadata and the device's cache reach the disk). A tail shorter than
a 4 KiB block is written after clearing ``O_DIRECT`` (the length must be
aligned). Folders are made, nothing else (no modes, no times, no hashing).
One ``fsync`` per file instead would measure the journal's commit latency
(about 6 ms a file on a loop-mounted ext4 here), not the disk's throughput:
our engine overlaps its per-file syncs on several threads.

``cp_sync(src, dst)``: ``cp -a`` then ``sync -f`` (``syncfs`` of the copy's
filesystem, so other processes' dirty pages elsewhere are not counted): the
plain unverified copy.

``read_back(dst)``: every file of ``dst`` read with ``O_DIRECT`` on two
threads, as a verified copy must read its bytes back from storage (not from
the page cache that still holds what was just written), hashing nothing.
After :func:`cp_sync`, the two together are what a durable copy read back
from storage costs done one after the other.

All return wall seconds.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import subprocess
import threading
import time
from pathlib import Path

__all__ = ["cp_sync", "direct_copy", "read_back"]

_BUF = 8 << 20
_BLOCK = 4096


def _files(src: Path) -> list[tuple[str, int]]:
    out = []
    for folder, _dirs, names in os.walk(src):
        for name in names:
            path = os.path.join(folder, name)
            out.append((os.path.relpath(path, src), os.path.getsize(path)))
    return out


def _copy_one(src: str, dst: str, buf: mmap.mmap) -> None:
    view = memoryview(buf)
    fin = os.open(src, os.O_RDONLY | os.O_DIRECT)
    try:
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        try:
            direct = True
            while True:
                got = os.readv(fin, [view])
                if got == 0:
                    break
                aligned = got - got % _BLOCK
                if aligned and direct:
                    os.write(fout, view[:aligned])
                else:
                    aligned = 0
                if aligned < got:  # an unaligned tail: the last read of the file
                    fcntl.fcntl(fout, fcntl.F_SETFL, fcntl.fcntl(fout, fcntl.F_GETFL) & ~os.O_DIRECT)
                    direct = False
                    os.write(fout, bytes(view[aligned:got]))
                if got < len(view):
                    break
        finally:
            os.close(fout)
    finally:
        os.close(fin)
        view.release()


def _read_one(path: str, buf: mmap.mmap) -> None:
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        while os.readv(fd, [view]) == len(view):
            pass
    finally:
        os.close(fd)
        view.release()


def _on_threads(files: list[tuple[str, int]], one, threads: int) -> None:
    """``one(rel, buf)`` for every file, largest first dealt round-robin (about the same bytes each)."""
    files = sorted(files, key=lambda item: -item[1])
    shares = [files[i::threads] for i in range(threads)]
    errors: list[BaseException] = []

    def work(share: list[tuple[str, int]]) -> None:
        buf = mmap.mmap(-1, _BUF)  # page aligned, as O_DIRECT wants
        try:
            for rel, _size in share:
                one(rel, buf)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
        finally:
            buf.close()

    workers = [threading.Thread(target=work, args=(share,)) for share in shares]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]


def direct_copy(src: Path, dst: Path, threads: int = 2) -> float:
    start = time.perf_counter()
    files = _files(src)
    for folder in sorted({os.path.dirname(rel) for rel, _size in files}):
        os.makedirs(dst / folder, exist_ok=True)
    _on_threads(files, lambda rel, buf: _copy_one(os.path.join(src, rel), os.path.join(dst, rel), buf), threads)
    _syncfs(dst)
    return time.perf_counter() - start


def read_back(dst: Path, threads: int = 2) -> float:
    start = time.perf_counter()
    _on_threads(_files(dst), lambda rel, buf: _read_one(os.path.join(dst, rel), buf), threads)
    return time.perf_counter() - start


def _syncfs(path: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def cp_sync(src: Path, dst: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["cp", "-a", "--", str(src), str(dst)], check=True)
    subprocess.run(["sync", "-f", str(dst)], check=True)
    return time.perf_counter() - start
