"""The verifier: hashing, the two-way compare, the recorded manifest, force_verify."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from exlab_wizard.sync import spill
from exlab_wizard.sync import verifier as verifier_module
from exlab_wizard.sync.manifest_format import manifest_digest, manifest_path, read_manifest
from exlab_wizard.sync.transports.base import RemoteManifest, TransportError, TransportErrorKind
from exlab_wizard.sync.verifier import (
    Verifier,
    VerifyResult,
    compare,
    drop_page_cache,
    hash_file,
    hash_tree,
    run_parallel,
    walk_run,
)
from tests.helpers import require_tool

EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"

HOSTILE_NAMES = [
    "with space.txt",
    "ünïcødé_日本語.txt",
    "new\nline.txt",
    "back\\slash.txt",
    "-leading-dash.txt",
    "$(touch pwned).txt",
    'quote\'s "double".txt',
]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _make_run(root: Path) -> dict[str, bytes]:
    """A small run: nested folders, an empty file, a 3 MiB file, metadata."""
    contents = {
        "a.txt": b"alpha\n",
        "empty.bin": b"",
        "sub/b.csv": b"x,y\n1,2\n",
        "sub/deeper/c.dat": bytes(range(256)) * 40,
        "big.raw": os.urandom(3 * (1 << 20) + 17),
        ".exlab-wizard/creation.json": b'{"schema_version": "1.0"}',
    }
    for rel, data in contents.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return contents


def _data_hashes(contents: dict[str, bytes]) -> dict[str, str]:
    return {rel: _sha(data) for rel, data in contents.items() if not rel.startswith(".exlab-wizard/")}


# --------------------------------------------------------------------------- hash_file


@pytest.mark.parametrize(("data", "digest"), [(b"", EMPTY), (b"abc", ABC)])
def test_known_digests(tmp_path: Path, data: bytes, digest: str) -> None:
    path = tmp_path / "f"
    path.write_bytes(data)
    assert hash_file(path) == digest


def test_multi_mib_file_streams_in_blocks(tmp_path: Path) -> None:
    data = os.urandom(5 * (1 << 20) + 3)
    path = tmp_path / "big"
    path.write_bytes(data)
    seen: list[int] = []
    assert hash_file(path, progress=seen.append) == _sha(data)
    assert sum(seen) == len(data)
    assert max(seen) <= 1 << 20
    assert hash_file(path, block_size=4096) == _sha(data)


def test_hash_file_never_follows_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "target").write_bytes(b"abc")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(OSError) as caught:
        hash_file(tmp_path / "link")
    assert caught.value.errno == errno.ELOOP


def _cached(fd: int, offset: int) -> bool:
    """Is the page at ``offset`` of ``fd`` in this machine's memory?

    ``mincore`` on a private mapping of that page: it only looks. A read with
    ``RWF_NOWAIT`` is no probe: on a miss the kernel starts readahead before
    it answers ``EAGAIN``, and a tiny file's read can complete in between
    (about 1 in 50 here), so the probe itself made the page cached. (mincore
    reports every page of a file the caller may not write as cached: the
    tests probe only files they wrote.)
    """
    page = mmap.PAGESIZE
    start = offset // page * page
    size = os.fstat(fd).st_size
    if start >= size:
        return False  # no page there to hold
    with mmap.mmap(fd, min(page, size - start), offset=start, access=mmap.ACCESS_COPY) as mapped:
        vector = ctypes.create_string_buffer(1)
        first = ctypes.c_char.from_buffer(mapped)
        try:
            if _LIBC.mincore(ctypes.c_void_p(ctypes.addressof(first)), ctypes.c_size_t(1), vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del first  # the mapping closes only once no export of it is left
        return bool(vector.raw[0] & 1)


_LIBC = ctypes.CDLL(None, use_errno=True)


def test_drop_page_cache_evicts_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cached"
    path.write_bytes(os.urandom(1 << 20))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert _cached(fd, 0) and _cached(fd, 65536)  # in memory after the write
        drop_page_cache(path)
        assert not _cached(fd, 0) and not _cached(fd, 65536)  # no longer in memory: a read would go to the disk
        assert _cached(fd, 0) is False  # the probe itself read nothing in
    finally:
        os.close(fd)


@pytest.mark.parametrize("size", [0, 1, 4096, 3 * (1 << 20) + 5, 20 * (1 << 20) + 123])
def test_hash_from_storage_reads_past_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    data = os.urandom(size)
    path = tmp_path / "copy.bin"
    path.write_bytes(data)  # dirty, in memory
    fd = os.open(path, os.O_RDONLY)
    first_read_cached: list[bool] = []
    real_readv = os.readv

    def readv(fileno, buffers):
        if fileno == fd and not first_read_cached:
            first_read_cached.append(_cached(fd, 0))
        return real_readv(fileno, buffers)

    monkeypatch.setattr(verifier_module.os, "readv", readv)
    try:
        assert verifier_module.hash_from_storage(fd, memoryview(bytearray(1 << 20))) == hashlib.sha256(data).hexdigest()
        monkeypatch.setattr(verifier_module.os, "readv", real_readv)
        if size:
            assert first_read_cached == [False]  # written back and dropped before the first read
        if size > 2 * verifier_module.DROP_BEHIND:
            # pages already hashed were dropped as the read went on: the page cache did not fill up
            assert not _cached(fd, 0) and not _cached(fd, verifier_module.DROP_BEHIND)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- walking and hash_tree


def test_walk_run_lists_regular_files_only(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _make_run(run)
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"not part of the run")
    (run / "link_to_file").symlink_to(outside)
    (run / "link_to_dir").symlink_to(tmp_path)
    (run / "sub" / "dangling").symlink_to(tmp_path / "nowhere")
    (run / "empty_dir").mkdir()
    (run / "sub" / ".exlab-wizard").mkdir()  # only the top-level one is metadata
    (run / "sub" / ".exlab-wizard" / "note").write_bytes(b"data")
    os.mkfifo(run / "a_fifo")

    data = walk_run(run)
    assert data == sorted(data, key=os.fsencode)
    assert set(data) == {"a.txt", "empty.bin", "sub/b.csv", "sub/deeper/c.dat", "big.raw", "sub/.exlab-wizard/note"}
    assert set(walk_run(run, include_metadata=True)) == set(data) | {".exlab-wizard/creation.json"}


def test_hash_tree_parallel_equals_serial(tmp_path: Path) -> None:
    run = tmp_path / "run"
    contents = _make_run(run)
    for index in range(60):
        blob = os.urandom(index * 977)
        contents[f"many/{index % 7}/f{index}.bin"] = blob
        (run / "many" / str(index % 7)).mkdir(parents=True, exist_ok=True)
        (run / f"many/{index % 7}/f{index}.bin").write_bytes(blob)
    serial = hash_tree(run, threads=1)
    assert serial == _data_hashes(contents)
    for threads in (2, 4, 8):
        assert hash_tree(run, threads=threads) == serial
    with_metadata = hash_tree(run, threads=3, include_metadata=True)
    assert with_metadata == {rel: _sha(data) for rel, data in contents.items()}
    total: list[int] = []
    hash_tree(run, threads=4, progress=total.append)
    assert sum(total) == sum(len(data) for rel, data in contents.items() if not rel.startswith(".exlab"))


def test_hash_tree_spilled_to_disk_is_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    contents = _make_run(run)
    in_memory = hash_tree(run, threads=2)
    monkeypatch.setattr(spill, "SPILL_AT", 0)
    on_disk = hash_tree(run, threads=2)
    assert isinstance(on_disk, spill.SpillMap) and on_disk.spilled
    assert on_disk == in_memory == _data_hashes(contents)
    assert list(spill.items_by_bytes(on_disk)) == sorted(in_memory.items(), key=lambda kv: os.fsencode(kv[0]))


@pytest.mark.parametrize("threads", [1, 3])
def test_a_listing_that_fails_while_its_items_are_taken_fails_the_work(threads: int) -> None:
    """Items taken from a generator as they are worked on: its error is raised, never the end of the items."""
    done: list[int] = []

    def listing():
        yield from range(5)
        raise PermissionError(errno.EACCES, "Permission denied", "run/locked")

    with pytest.raises(PermissionError):
        run_parallel(listing(), lambda item, _view: done.append(item), threads)
    assert sorted(done) == list(range(5))


def test_hash_tree_file_vanishing_raises_local_file_vanished(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "d").mkdir(parents=True)
    for index in range(10):  # one folder: listed at once, read one file after another
        (run / "d" / f"f{index}.bin").write_bytes(b"x" * 5000)

    def delete_everything_else(_count: int) -> None:
        for index in range(10):
            (run / "d" / f"f{index}.bin").unlink(missing_ok=True)

    with pytest.raises(TransportError) as caught:
        hash_tree(run, threads=1, progress=delete_everything_else)
    assert caught.value.kind is TransportErrorKind.LOCAL_FILE_VANISHED
    assert "vanished" in caught.value.message and "d/f" in caught.value.message


# --------------------------------------------------------------------------- compare with damaged fixtures


def _corrupt_one_byte(remote: Path) -> None:
    path = remote / "sub/deeper/c.dat"
    data = bytearray(path.read_bytes())
    data[1234] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(remote: Path) -> None:
    path = remote / "big.raw"
    with open(path, "r+b") as handle:
        handle.truncate(1 << 20)


def _delete(remote: Path) -> None:
    (remote / "sub/b.csv").unlink()


def _add(remote: Path) -> None:
    (remote / "sub" / "stranger.txt").write_bytes(b"not ours")


def _empty_a_file(remote: Path) -> None:
    (remote / "a.txt").write_bytes(b"")


@pytest.mark.parametrize(
    ("damage", "outcome", "path"),
    [
        (_corrupt_one_byte, "different", "sub/deeper/c.dat"),
        (_truncate, "different", "big.raw"),
        (_empty_a_file, "different", "a.txt"),
        (_delete, "missing", "sub/b.csv"),
        (_add, "extra", "sub/stranger.txt"),
    ],
    ids=["one-byte-corrupted", "truncated", "emptied", "deleted", "added"],
)
def test_compare_catches_each_damage(tmp_path: Path, damage, outcome: str, path: str) -> None:
    local = tmp_path / "local"
    remote = tmp_path / "remote"
    _make_run(local)
    shutil.copytree(local, remote)
    assert compare(hash_tree(local), hash_tree(remote)).ok
    damage(remote)
    result = compare(hash_tree(local), RemoteManifest(hashes=hash_tree(remote)))
    assert not result.ok
    expected = {"missing": (), "extra": (), "different": (), "unverifiable": ()}
    expected[outcome] = (path,)
    assert {name: getattr(result, name) for name in expected} == expected
    assert result.problems == {outcome: (path,)}


def test_unverifiable_is_never_a_pass() -> None:
    local = {"a": ABC, "b": EMPTY}
    remote = RemoteManifest(hashes={"a": ABC, "b": EMPTY}, unverifiable={"b": "verify_skipped_oversize"})
    result = compare(local, remote)
    assert not result.ok
    assert result.unverifiable == ("b",)
    assert (result.missing, result.extra, result.different) == ((), (), ())
    # an unverifiable file the local run does not have is extra
    result = compare({"a": ABC}, RemoteManifest(hashes={"a": ABC}, unverifiable={"z": "unreadable"}))
    assert result.extra == ("z",) and not result.ok


def test_compare_ignores_metadata_on_both_sides() -> None:
    local = {"a": ABC, ".exlab-wizard/creation.json": EMPTY, ".exlab-wizard/sync.log": ABC}
    for remote in (
        {"a": ABC},
        {"a": ABC, ".exlab-wizard/creation.json": ABC, ".exlab-wizard/extra.json": ABC},
        RemoteManifest(hashes={"a": ABC}, unverifiable={".exlab-wizard/big.log": "oversize"}),
    ):
        result = compare(local, remote)
        assert result.ok, result
        assert result.checked == 1
        assert result.manifest_digest == manifest_digest({"a": ABC})


def test_compare_without_the_digest_renders_no_manifest(monkeypatch: pytest.MonkeyPatch) -> None:
    """``digest=False``: the caller writes the manifest and gets its digest there; nothing is rendered here."""
    local = {f"d/f{i}": hashlib.sha256(b"%d" % i).hexdigest() for i in range(5)}
    rendered: list[int] = []
    real = verifier_module.manifest_digest
    monkeypatch.setattr(verifier_module, "manifest_digest", lambda hashes: rendered.append(1) or real(hashes))
    result = compare(local, dict(local), digest=False)
    assert result.ok and result.checked == 5
    assert result.manifest_digest is None and rendered == []
    assert compare(local, dict(local)).manifest_digest == manifest_digest(local) and rendered == [1]


def test_compare_hex_case_and_empty_sides() -> None:
    assert compare({"a": ABC}, {"a": ABC.upper()}).ok
    assert compare({}, {}).ok
    result = compare({"a": ABC, "b": EMPTY}, {})
    assert result.missing == ("a", "b") and result.checked == 2


def test_verify_result_defaults() -> None:
    result = VerifyResult(ok=True)
    assert result.problems == {} and result.manifest_digest is None


# --------------------------------------------------------------------------- the recorded manifest


def test_write_manifest_is_sha256sum_compatible_with_hostile_names(tmp_path: Path) -> None:
    sha256sum = require_tool("sha256sum")
    run = tmp_path / "Run_1"
    contents = _make_run(run)
    for index, name in enumerate(HOSTILE_NAMES):
        data = f"{index}:{name}".encode()
        (run / "hostile").mkdir(exist_ok=True)
        (run / "hostile" / name).write_bytes(data)
        (run / name).write_bytes(data * 2)
        contents[f"hostile/{name}"] = data
        contents[name] = data * 2
    hashes = hash_tree(run, include_metadata=True)
    digest = Verifier().write_manifest(run, hashes)

    recorded = read_manifest(run)
    assert recorded == _data_hashes(contents)
    assert digest == manifest_digest(recorded)
    assert not [p for p in (run / ".exlab-wizard").iterdir() if "exlab-tmp" in p.name]
    check = subprocess.run(
        [sha256sum, "-c", "--strict", ".exlab-wizard/checksums.sha256"],
        cwd=run,
        capture_output=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert not (run / "pwned").exists()

    (run / "new\nline.txt").write_bytes(b"changed")  # sha256sum must now see the damage
    check = subprocess.run([sha256sum, "-c", ".exlab-wizard/checksums.sha256"], cwd=run, capture_output=True)
    assert check.returncode == 1


def test_write_manifest_replaces_atomically(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / ".exlab-wizard").mkdir(parents=True)
    verifier = Verifier()
    first = verifier.write_manifest(run, {"a": ABC})
    second = verifier.write_manifest(run, {"a": ABC, "b": EMPTY})
    assert first != second
    assert read_manifest(run) == {"a": ABC, "b": EMPTY}
    assert sorted(p.name for p in (run / ".exlab-wizard").iterdir()) == ["checksums.sha256"]


async def test_force_verify_detects_local_bit_rot_edits_and_additions(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _make_run(run)
    verifier = Verifier(threads=2)
    digest = verifier.write_manifest(run, await verifier.hash_local(run))

    clean = await verifier.verify_local_against_manifest(run)
    assert clean.ok and clean.manifest_digest == digest and clean.checked == 5

    # bit rot: one byte flipped, size and mtime unchanged
    target = run / "sub/deeper/c.dat"
    before = target.stat()
    data = bytearray(target.read_bytes())
    data[99] ^= 0x40
    target.write_bytes(bytes(data))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    (run / "a.txt").unlink()
    (run / "new.txt").write_bytes(b"added after verification")
    (run / ".exlab-wizard" / "creation.json").write_bytes(b"{}")  # metadata never counts

    result = await verifier.verify_local_against_manifest(run)
    assert not result.ok
    assert result.different == ("sub/deeper/c.dat",)
    assert result.missing == ("a.txt",)
    assert result.extra == ("new.txt",)
    assert result.manifest_digest == digest


async def test_force_verify_without_a_recorded_manifest(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _make_run(run)
    result = await Verifier().verify_local_against_manifest(run)
    assert not result.ok
    assert result.manifest_digest is None
    assert set(result.extra) == {"a.txt", "empty.bin", "sub/b.csv", "sub/deeper/c.dat", "big.raw"}
    assert not manifest_path(run).exists()


def test_module_exports() -> None:
    for name in verifier_module.__all__:
        assert hasattr(verifier_module, name), name
    assert {"Verifier", "VerifyResult", "compare", "hash_tree", "walk_run", "hash_file", "drop_page_cache"} <= set(
        verifier_module.__all__
    )
