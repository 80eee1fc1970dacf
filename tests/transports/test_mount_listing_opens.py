"""The mount transport's listing opens each file: a file that cannot be opened is never one that is not there.

One the service may not open (EACCES/EPERM) is there: it is listed with its stat, asked of the server."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from exlab_wizard.sync.transports.base import RemoteFile, TransportError, TransportErrorKind
from tests.lab import MountLab as Lab


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    lab = Lab(tmp_path)
    lab.write("a.raw", b"a" * 10, mtime_ns=1_600_000_000_123_456_789)
    lab.write("sub/b.raw", b"b" * 20)
    lab.push()
    return lab


def _failing_open(monkeypatch: pytest.MonkeyPatch, name: str, code: int) -> None:
    real = os.open

    def fake(path, flags, *args, **kwargs):
        if os.fsdecode(path) == name and kwargs.get("dir_fd") is not None:
            raise OSError(code, os.strerror(code))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake)


def test_each_file_is_listed_with_its_size_and_mtime(lab: Lab) -> None:
    listed = asyncio.run(lab.transport.remote_stats(lab.run))
    assert listed["a.raw"] == RemoteFile(10, 1_600_000_000_123_456_789)
    assert listed["sub/b.raw"].size == 20


@pytest.mark.parametrize(
    ("code", "kind"), [(errno.EIO, "network"), (errno.ENOTCONN, "network"), (errno.EOVERFLOW, "unknown")]
)
def test_a_file_that_cannot_be_opened_fails_the_listing(
    lab: Lab, monkeypatch: pytest.MonkeyPatch, code: int, kind: str
) -> None:
    _failing_open(monkeypatch, "b.raw", code)
    with pytest.raises(TransportError) as raised:
        asyncio.run(lab.transport.remote_stats(lab.run))
    assert raised.value.kind == TransportErrorKind(kind) and "b.raw" in raised.value.message


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM])
def test_a_file_the_service_may_not_open_is_listed_with_its_stat(
    lab: Lab, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    _failing_open(monkeypatch, "a.raw", code)
    listed = asyncio.run(lab.transport.remote_stats(lab.run))
    assert listed["a.raw"] == RemoteFile(10, 1_600_000_000_123_456_789)
    assert listed["sub/b.raw"].size == 20


def test_a_file_the_service_may_not_open_and_then_gone_is_not_listed(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.open

    def refused_then_gone(path, flags, *args, **kwargs):
        if os.fsdecode(path) == "a.raw" and kwargs.get("dir_fd") is not None:
            os.unlink(path, dir_fd=kwargs["dir_fd"])
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refused_then_gone)
    assert set(asyncio.run(lab.transport.remote_stats(lab.run))) == {"sub/b.raw"}


def test_a_file_gone_when_opened_is_not_listed(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    _failing_open(monkeypatch, "b.raw", errno.ENOENT)
    assert set(asyncio.run(lab.transport.remote_stats(lab.run))) >= {"a.raw"}
    assert "sub/b.raw" not in asyncio.run(lab.transport.remote_stats(lab.run))
