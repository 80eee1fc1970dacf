"""A creation.json that is hostile or broken is refused with a typed error, never read unsafely.

Nested brackets deep enough to exhaust the recursion limit, a FIFO, a symbolic
link, a folder, a file larger than the bound: reading raises
:class:`CacheError` with a kind, and no writer rewrites (destroys) the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from exlab_wizard.cache import CacheError, CacheErrorKind, CreationJson, CreationWriter, creation_path
from exlab_wizard.cache.creation import CREATION_MAX_BYTES
from tests.helpers import BOMB, NESTED_IN_A_FIELD, finishes


def make_run(tmp_path: Path) -> Path:
    run = tmp_path / "CONFOCAL_01" / "P" / "Runs" / "Run_1"
    (run / ".exlab-wizard").mkdir(parents=True)
    return run


def writer_calls(writer: CreationWriter, run: Path) -> list[Callable[[], Any]]:
    return [
        lambda: writer.set_sync_status(run, "blocked_by_validation"),
        lambda: writer.ensure_minimal(run, local_path=str(run), nas_path=None),
        lambda: writer.record(run, "local_cleaned", True),
        lambda: writer.append_override(run, problem_class="orphan", operator="asmith", reason="x"),
        lambda: writer.update(run, lambda raw: raw.__setitem__("k", 1)),
    ]


@pytest.mark.parametrize("data", [BOMB, NESTED_IN_A_FIELD], ids=["top level", "inside a field"])
def test_deep_nesting_is_malformed_not_a_recursion_error(data: bytes) -> None:
    with pytest.raises(CacheError) as caught:
        CreationJson.from_bytes(data, source="creation.json")
    assert caught.value.kind is CacheErrorKind.MALFORMED
    assert "nested too deeply" in caught.value.message


def test_writers_refuse_a_deeply_nested_file_and_leave_it_as_it_is(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    creation_path(run).write_bytes(NESTED_IN_A_FIELD)
    writer = CreationWriter()
    with pytest.raises(CacheError):
        writer.read(run)
    for call in writer_calls(writer, run):
        with pytest.raises(CacheError) as caught:
            call()
        assert caught.value.kind is CacheErrorKind.MALFORMED
    assert creation_path(run).read_bytes() == NESTED_IN_A_FIELD


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    os.mkfifo(creation_path(run))
    writer = CreationWriter()
    with pytest.raises(CacheError) as caught:
        finishes(lambda: writer.read(run))
    assert caught.value.kind is CacheErrorKind.NOT_REGULAR
    assert "FIFO" in caught.value.message and str(creation_path(run)) in caught.value.message
    for call in writer_calls(writer, run):
        with pytest.raises(CacheError) as caught:
            finishes(call)
        assert caught.value.kind is CacheErrorKind.NOT_REGULAR
    assert creation_path(run).is_fifo()


def test_a_symbolic_link_is_never_followed_nor_replaced(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    elsewhere = tmp_path / "elsewhere.json"
    good = b'{"schema_version": "1.0", "level": "run", "sync_status": "pending"}'
    elsewhere.write_bytes(good)
    creation_path(run).symlink_to(elsewhere)
    writer = CreationWriter()
    with pytest.raises(CacheError) as caught:
        writer.read(run)
    assert caught.value.kind is CacheErrorKind.NOT_REGULAR
    assert "symbolic link" in caught.value.message
    for call in writer_calls(writer, run):
        with pytest.raises(CacheError):
            call()
    assert creation_path(run).is_symlink() and elsewhere.read_bytes() == good


def test_a_folder_is_not_a_creation_json(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    creation_path(run).mkdir()
    with pytest.raises(CacheError) as caught:
        CreationWriter().read(run)
    assert caught.value.kind is CacheErrorKind.NOT_REGULAR and "folder" in caught.value.message


def test_the_size_bound(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    head = b'{"schema_version": "1.0", "level": "run"}'
    # Exactly at the bound: read (trailing whitespace is valid JSON).
    creation_path(run).write_bytes(head + b" " * (CREATION_MAX_BYTES - len(head)))
    assert CreationWriter().read(run).level == "run"
    # One byte more: refused whole, before reading it, and never rewritten.
    with creation_path(run).open("ab") as handle:
        handle.write(b" ")
    writer = CreationWriter()
    with pytest.raises(CacheError) as caught:
        writer.read(run)
    assert caught.value.kind is CacheErrorKind.TOO_LARGE
    assert str(CREATION_MAX_BYTES) in caught.value.message
    with pytest.raises(CacheError):
        writer.set_sync_status(run, "pending")
    assert creation_path(run).stat().st_size == CREATION_MAX_BYTES + 1


def test_the_lock_file_is_never_opened_through_a_symlink(tmp_path: Path) -> None:
    """A ``creation.json.lock`` planted as a symlink neither creates nor opens the file it points to."""
    from exlab_wizard.cache.atomic import FileLock

    run = make_run(tmp_path)
    elsewhere = tmp_path / "elsewhere" / "created-by-the-engine"
    elsewhere.parent.mkdir()
    lock = run / ".exlab-wizard" / "creation.json.lock"
    lock.symlink_to(elsewhere)
    with pytest.raises(CacheError) as caught, FileLock(lock, timeout=1.0):
        pass
    assert caught.value.kind == CacheErrorKind.IO and "symbolic link" in str(caught.value)
    assert not elsewhere.exists()
    with FileLock(run / ".exlab-wizard" / "other.lock", timeout=1.0):  # a plain lock file still works
        pass
