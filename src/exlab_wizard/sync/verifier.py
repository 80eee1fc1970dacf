"""Run manifests: hashing a run, comparing two manifests, the recorded checksums file.

The verifier works over any transport: it hashes the local run, takes the
remote side as a :class:`~exlab_wizard.sync.transports.base.RemoteManifest`
(or a plain ``{path: hex}`` mapping), and compares both ways with five
outcomes (match, missing, extra, different, unverifiable). "Could not hash"
is never a pass.

Keys are paths relative to the run root with ``/`` separators (non-UTF-8
bytes kept through the filesystem encoding). Only regular files count:
symlinks are never followed nor listed. ``.exlab-wizard/`` (the run's
metadata folder) is left out of data verification on both sides.

Example::

    verifier = Verifier()
    local = await verifier.hash_local(run)
    result = compare(local, await transport.remote_manifest(run))
    if result.ok:
        digest = verifier.write_manifest(run, local)

Hashing is streaming SHA-256 with one reusable 1 MiB buffer per thread
(constant memory), files hashed in parallel threads (``hashlib`` releases
the GIL while it digests). Progress callbacks receive byte deltas; they are
called from worker threads, one call at a time.
"""

from __future__ import annotations

import asyncio
import hashlib
import mmap
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from exlab_wizard.fileio import (
    BLOCK_SIZE,
    DROP_BEHIND,
    METADATA_DIR,
    OpenFolders,
    advise_sequential,
    atomic_write_chunks,
    drop_page_cache,
    drop_page_cache_fd,
    hash_fd,
    hash_file,
    hash_from_storage,
    is_metadata_path,
    is_reaping_name,
    make_dirs_durable,
    open_regular,
    open_regular_beneath,
    remove_stale_temps,
)
from exlab_wizard.sync.failures import FailureKind, local_errno_kind
from exlab_wizard.sync.manifest_format import (
    ManifestFormatError,
    manifest_chunks,
    manifest_digest,
    manifest_path,
    read_manifest,
)
from exlab_wizard.sync.spill import SpillMap
from exlab_wizard.sync.transports.base import (
    ProgressCallback,
    RemoteManifest,
    TransportError,
    TransportErrorKind,
)

__all__ = [
    "BLOCK_SIZE",
    "DROP_BEHIND",
    "RunEntry",
    "Verifier",
    "VerifyResult",
    "compare",
    "default_threads",
    "drop_page_cache",
    "drop_page_cache_fd",
    "hash_fd",
    "hash_from_storage",
    "hash_file",
    "hash_tree",
    "is_metadata_path",
    "open_regular",
    "run_parallel",
    "scan_run",
    "serial_progress",
    "walk_run",
]


def default_threads() -> int:
    """Hashing threads when none is given: the CPU count within 2..4 (2 overlaps I/O on one core)."""
    return max(2, min(os.cpu_count() or 1, 4))


# --------------------------------------------------------------------------- walking


class RunEntry(NamedTuple):
    """One regular file or directory found by :func:`scan_run`."""

    rel: str  #: relative POSIX path
    path: str  #: absolute (joined) path
    is_dir: bool
    stat: os.stat_result | None  #: lstat, when asked for


def scan_run(
    run_path: str | os.PathLike[str],
    *,
    include_metadata: bool = False,
    with_stat: bool = False,
    metadata_root: bool = False,
) -> Iterator[RunEntry]:
    """Every regular file and directory under ``run_path`` (not the root itself).

    Symlinks and special files are skipped, nothing is followed; entries that
    vanish while listed are left out. ``.exlab-wizard/`` (top level) only with
    ``include_metadata``. A file with one of the reaper's private names
    (:func:`~exlab_wizard.fileio.is_reaping_name`: set aside for its unlink)
    is left out, except inside ``.exlab-wizard/`` (``metadata_root``:
    ``run_path`` is that folder), where it is metadata like any other file, sent
    by the final metadata push and deleted with it. Unordered. Raises ``FileNotFoundError`` when the
    folder does not exist.
    """
    stack: list[tuple[str, str]] = [(os.fspath(run_path), "")]
    while stack:
        folder, prefix = stack.pop()
        data = not metadata_root and not is_metadata_path(prefix)
        with os.scandir(folder) as entries:
            for entry in entries:
                rel = prefix + entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if not prefix and entry.name == METADATA_DIR and not include_metadata:
                            continue
                        yield RunEntry(rel, entry.path, True, entry.stat(follow_symlinks=False) if with_stat else None)
                        stack.append((entry.path, rel + "/"))
                    elif entry.is_file(follow_symlinks=False) and not (data and is_reaping_name(entry.name)):
                        yield RunEntry(rel, entry.path, False, entry.stat(follow_symlinks=False) if with_stat else None)
                except FileNotFoundError:
                    continue  # vanished while listing: not part of the run any more


def walk_run(run_path: str | os.PathLike[str], *, include_metadata: bool = False) -> list[str]:
    """Relative POSIX paths of every regular file of the run, sorted by their bytes.

    Symlinks are skipped (never followed); ``.exlab-wizard/`` is left out
    unless ``include_metadata``. Raises ``FileNotFoundError`` when the run
    folder does not exist.
    """
    files = [rel for rel, _path, is_dir, _st in scan_run(run_path, include_metadata=include_metadata) if not is_dir]
    files.sort(key=os.fsencode)
    return files


# --------------------------------------------------------------------------- parallel hashing


def serial_progress(callback: ProgressCallback | None) -> ProgressCallback | None:
    """Wrap a progress callback so worker threads call it one at a time."""
    return None if callback is None else _Progress(callback)


class _Progress:
    def __init__(self, callback: ProgressCallback | None):
        self._callback = callback
        self._lock = threading.Lock()

    def __call__(self, count: int) -> None:
        with self._lock:
            self._callback(count)  # type: ignore[misc]


def side_by_side(work: list[Callable[[], None]], abort: threading.Event) -> None:
    """Run each callable on its own thread (the first on this one); the first error stops the rest and is raised.

    A :class:`TransportError` wins over other errors, as in :func:`run_parallel`.
    """
    errors: list[BaseException] = []

    def run(step: Callable[[], None]) -> None:
        try:
            step()
        except BaseException as exc:
            errors.append(exc)
            abort.set()

    threads = [threading.Thread(target=run, args=(step,), name="exlab-side", daemon=True) for step in work[1:]]
    for thread in threads:
        thread.start()
    if work:
        run(work[0])
    for thread in threads:
        thread.join()
    if errors:
        typed = [exc for exc in errors if isinstance(exc, TransportError)]
        raise (typed or errors)[0]


def run_parallel(items: Iterable, work: Callable, threads: int, abort: threading.Event | None = None) -> None:
    """Call ``work(item, buffer)`` for every item on ``threads`` threads.

    Each thread owns one ``BLOCK_SIZE`` buffer (a memoryview, page-aligned)
    for the whole run. The first exception stops the others (they finish the item in hand)
    and is re-raised; a :class:`TransportError` wins over other errors. ``items`` may be a
    generator (taken from under a lock): an error it raises is raised so too, never taken
    for the end of the items.
    """
    abort = abort if abort is not None else threading.Event()
    iterator = iter(items)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def loop() -> None:
        view = memoryview(mmap.mmap(-1, BLOCK_SIZE))  # page-aligned: usable for O_DIRECT
        while not abort.is_set():
            try:
                with lock:  # items may come from a listing made as they are taken: its error is the run's
                    item = next(iterator, _DONE)
                if item is _DONE:
                    return
                work(item, view)
            except BaseException as exc:
                errors.append(exc)
                abort.set()
                return

    if threads <= 1:
        loop()
    else:
        workers = [threading.Thread(target=loop, name=f"exlab-io-{n}", daemon=True) for n in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    if errors:
        typed = [exc for exc in errors if isinstance(exc, TransportError)]
        raise (typed or errors)[0]


_DONE = object()


def hash_run_file(
    root: str,
    rel: str,
    view: memoryview,
    progress: Callable[[int], None] | None = None,
    folders: OpenFolders | None = None,
) -> str:
    """SHA-256 hex of the run file ``rel`` of ``root``, never through a symlink, its folders' included.

    ``folders``: the caller's open folders of ``root``, for many files in a
    row. A file gone since it was listed, or a folder of its path swapped for
    a symlink since (the bytes there are someone else's), raises
    ``TransportError`` (``LOCAL_FILE_VANISHED``); other errors raise as ``OSError``.
    """
    try:
        fd, info = folders.open_regular(rel) if folders is not None else open_regular_beneath(root, rel)
    except OSError as exc:
        if local_errno_kind(exc.errno) is FailureKind.LOCAL_FILE_VANISHED:
            raise TransportError(
                TransportErrorKind.LOCAL_FILE_VANISHED, f"{rel}: vanished from {root} while hashing"
            ) from exc
        raise
    try:
        advise_sequential(fd, info.st_size)
        return hash_fd(fd, view, progress)
    finally:
        os.close(fd)


def hash_tree(
    run_path: str | os.PathLike[str],
    *,
    threads: int | None = None,
    include_metadata: bool = False,
    progress: ProgressCallback | None = None,
) -> SpillMap[str]:
    """``{relative path: sha256 hex}`` for every regular file of the run (a :class:`SpillMap`, unordered).

    Files are hashed in parallel (``threads``, default :func:`default_threads`)
    as the run is listed: no list of the run is held. Symlinks are skipped;
    ``.exlab-wizard/`` only with ``include_metadata``. The files are those
    each folder held when it was listed: one gone before its folder is listed
    is not in the map (a caller comparing with the NAS then finds it extra),
    one gone after raises ``TransportError(LOCAL_FILE_VANISHED)`` naming it
    (so does one that stopped being a regular file).
    """
    root = os.fspath(run_path)
    listed = (rel for rel, _path, is_dir, _st in scan_run(root, include_metadata=include_metadata) if not is_dir)
    hashes: SpillMap[str] = SpillMap()
    report = serial_progress(progress)

    def work(rel: str, view: memoryview) -> None:
        hashes[rel] = hash_run_file(root, rel, view, report)

    run_parallel(listed, work, threads or default_threads())
    return hashes


# --------------------------------------------------------------------------- compare


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of comparing a reference manifest with a candidate one.

    ``missing``: in the reference (the local run), not in the candidate (the
    remote). ``extra``: in the candidate, not in the reference. ``different``:
    on both sides with different hashes. ``unverifiable``: the candidate has
    the file but could not hash it (never a pass). ``checked``: data paths
    examined (both sides together). ``manifest_digest``: SHA-256 of the
    reference's data manifest as ``checksums.sha256`` renders it, or None
    when there was no reference. ``ok`` only when all four tuples are empty
    (and a reference existed).
    """

    ok: bool
    missing: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    different: tuple[str, ...] = ()
    unverifiable: tuple[str, ...] = ()
    checked: int = 0
    manifest_digest: str | None = None

    @property
    def problems(self) -> dict[str, tuple[str, ...]]:
        """The non-empty outcome lists by name (for messages and logs)."""
        named = {
            "missing": self.missing,
            "extra": self.extra,
            "different": self.different,
            "unverifiable": self.unverifiable,
        }
        return {name: paths for name, paths in named.items() if paths}


def _sorted(paths: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(paths, key=os.fsencode))


def _lower_hex(digest: str) -> bool:
    return digest.islower() or digest.isdigit()


def _lowered(digest: str) -> str:
    return digest if _lower_hex(digest) else digest.lower()


def _data_only(hashes: Mapping[str, str]) -> Mapping[str, str]:
    """The data files' entries, digests in lower case: ``hashes`` itself when it is that already.

    A run's manifest can hold 200,000 files: no copy (and no new digest strings) unless needed.
    """
    if all(_lower_hex(digest) and not is_metadata_path(rel) for rel, digest in hashes.items()):
        return hashes
    return {
        rel: digest if _lower_hex(digest) else digest.lower()
        for rel, digest in hashes.items()
        if not is_metadata_path(rel)
    }


def compare(
    local: Mapping[str, str], remote: RemoteManifest | Mapping[str, str], *, digest: bool = True
) -> VerifyResult:
    """Compare the data files of two manifests both ways.

    ``local`` is the reference, ``remote`` the candidate. Keys under
    ``.exlab-wizard/`` are ignored on both sides. Hex digests compare
    case-insensitively. A path the remote lists as unverifiable is reported
    there (even if it also has a hash); an unverifiable path the local side
    does not have is ``extra``. ``digest=False`` leaves ``manifest_digest``
    None (a caller about to write the manifest gets it from
    :meth:`Verifier.write_manifest` without rendering it twice).
    """
    if isinstance(remote, RemoteManifest):
        remote_hashes, unverifiable_reasons = remote.hashes, remote.unverifiable
    else:
        remote_hashes, unverifiable_reasons = remote, {}
    mine = _data_only(local)
    theirs = remote_hashes  # its .exlab-wizard/ entries skipped below: no copy of 200,000 entries
    unverifiable = {rel for rel in unverifiable_reasons if not is_metadata_path(rel)}

    # No set of every path: at 200,000 files each costs megabytes, and the lookups need none.
    # One lookup a file each way (a spilled map's are read from disk).
    missing: list[str] = []
    different: list[str] = []
    for rel, ours in mine.items():
        if rel in unverifiable:
            continue  # counted in ``cannot``
        other = theirs.get(rel)
        if other is None:
            missing.append(rel)
        elif _lowered(other) != ours:
            different.append(rel)
    extra = [rel for rel in theirs if rel not in mine and not is_metadata_path(rel)]
    extra += [rel for rel in unverifiable if rel not in mine and rel not in theirs]
    cannot = [rel for rel in unverifiable if rel in mine]
    ok = not (missing or extra or cannot or different)
    return VerifyResult(
        ok=ok,
        missing=_sorted(missing),
        extra=_sorted(extra),
        different=_sorted(different),
        unverifiable=_sorted(cannot),
        checked=len(mine) + len(extra),  # every path of either side, once
        manifest_digest=manifest_digest(mine) if digest else None,
    )


# --------------------------------------------------------------------------- the verifier


class Verifier:
    """Hashes runs and keeps their recorded manifest (``.exlab-wizard/checksums.sha256``).

    ``threads``: files hashed in parallel (default :func:`default_threads`).
    The async methods run the hashing in a worker thread.
    """

    def __init__(self, threads: int | None = None):
        self.threads = threads or default_threads()

    async def hash_local(self, run_path: Path, progress: ProgressCallback | None = None) -> SpillMap[str]:
        """``{path: hex}`` of the run's data files (``.exlab-wizard/`` left out).

        Raises ``TransportError(LOCAL_FILE_VANISHED)`` as :func:`hash_tree` does.
        """
        return await asyncio.to_thread(hash_tree, run_path, threads=self.threads, progress=progress)

    async def verify_local_against_manifest(
        self, run_path: Path, progress: ProgressCallback | None = None
    ) -> VerifyResult:
        """Re-hash the run's data files and check them against the recorded manifest.

        Detects local bit rot and edits; changes nothing. The recorded
        manifest is the reference: ``missing`` = recorded but gone locally,
        ``extra`` = local files the manifest does not list, ``different`` =
        content changed. Files found different are re-read once from storage
        (page cache dropped) before being reported.

        A run with no recorded manifest (never verified) gives ``ok=False``,
        every local data file in ``extra`` and ``manifest_digest=None``.
        A manifest that is not in sha256sum format, or that the file system
        refuses to read (``.exlab-wizard`` a file, no permission), raises
        :class:`~exlab_wizard.sync.manifest_format.ManifestFormatError`.
        """
        try:
            recorded = await asyncio.to_thread(read_manifest, Path(run_path))
        except OSError as exc:  # as the CLI's verify says it: the manifest cannot be used
            where = manifest_path(Path(run_path))
            raise ManifestFormatError(f"{where} cannot be read: {exc.strerror or exc}") from exc
        current = await self.hash_local(run_path, progress)
        if recorded is None:
            return VerifyResult(ok=False, extra=_sorted(current), checked=len(current), manifest_digest=None)
        result = compare(recorded, current)
        if result.different:
            recheck = await asyncio.to_thread(self._rehash_from_storage, Path(run_path), result.different)
            current.update(recheck)
            result = compare(recorded, current)
        return result

    @staticmethod
    def _rehash_from_storage(run_path: Path, paths: Iterable[str]) -> dict[str, str]:
        out = {}
        view = memoryview(bytearray(BLOCK_SIZE))
        for rel in paths:
            fd, _info = open_regular_beneath(run_path, rel)
            try:
                out[rel] = hash_from_storage(fd, view)
            finally:
                os.close(fd)
        return out

    def write_manifest(self, run_path: Path, hashes: Mapping[str, str]) -> str:
        """Record ``hashes`` as the run's ``checksums.sha256``; return its manifest digest.

        Only data files are written (keys under ``.exlab-wizard/`` are
        dropped). Atomic and durable: temp file in the same folder, byte
        count checked, fsync, rename, fsync of the folder. A crash leaves
        either the old manifest or the new one.
        """
        data = _data_only(hashes)
        target = manifest_path(Path(run_path))
        make_dirs_durable(target.parent)  # a power cut keeps the folder's entry, not only its files
        remove_stale_temps(target)  # the runner lease holder is the one writer: any other temp is a leftover
        digest = hashlib.sha256()

        def chunks() -> Iterator[bytearray]:  # rendered, hashed and written a piece at a time
            for chunk in manifest_chunks(data):
                digest.update(chunk)
                yield chunk

        atomic_write_chunks(target, chunks(), new_mode=0o644)
        return digest.hexdigest()  # manifest_digest(data), without rendering it again
