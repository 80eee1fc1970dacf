"""A file the push's listing did not show on the NAS is renamed only to a free name, never over a NAS file.

The share may take a new file's name for an existing file's (letter case,
Unicode form, a name it mangles or cuts: smbnetfs stores ``x?`` as ``x``;
see tests/transports/test_mount_on_smb.py), or another program may write
the name after the listing: the push then refuses (REMOTE_WRITE_REFUSED)
and the NAS file stays as it was (rule 2). Here a file appears at the name
between the listing and the rename, on the local disk (``RENAME_NOREPLACE``)
and where the share refuses that flag (a look-up, then the rename).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from exlab_wizard.sync.transports import mount
from exlab_wizard.sync.transports.base import TransportError, TransportErrorKind
from exlab_wizard.sync.transports.mount import LARGE_FILE, MountTransport
from tests.lab import MountLab, act_once_in

SIZES = {"small": 5000, "large": LARGE_FILE + 1}


def _flag_refused(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The share refuses ``RENAME_NOREPLACE``, as FUSE 2 does (smbnetfs, exfat-fuse); the names asked."""
    asked: list[str] = []

    def refused(src, dst, *, dir_fd, dst_dir_fd=None, atomic_only=False):
        asked.append(dst)
        raise OSError(errno.ENOTSUP, "no rename that refuses to replace a file here", src, None, dst)

    monkeypatch.setattr(mount, "rename_noreplace", refused)
    return asked


@pytest.mark.parametrize("flag", ["noreplace", "refused"])
@pytest.mark.parametrize("size", sorted(SIZES))
def test_a_file_made_at_a_new_file_s_name_after_the_listing_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: str, flag: str
) -> None:
    lab = MountLab(tmp_path)
    lab.write("keep.tif", b"verified frame")
    assert lab.push().ok
    data = os.urandom(SIZES[size])
    lab.write("new.tif", data)
    if flag == "refused":
        _flag_refused(monkeypatch)
    there = Path(lab.remote) / "new.tif"
    # right before the rename: of the large file on its own, of the small one's batch
    step, when = (
        ("_rename", lambda _self, _job, _temp, final, **_k: final.endswith("/new.tif"))
        if size == "large"
        else ("_commit_batch", lambda _self, _job, batch, _shares: any(i[2] == "new.tif" for i in batch))
    )
    fired = act_once_in(monkeypatch, MountTransport, step, when, lambda: there.write_bytes(b"another program's frame"))
    with pytest.raises(TransportError) as caught:
        lab.push()
    assert fired
    assert caught.value.kind is TransportErrorKind.REMOTE_WRITE_REFUSED, caught.value
    assert "already holds a file" in caught.value.message
    assert there.read_bytes() == b"another program's frame"  # rule 2
    assert (Path(lab.remote) / "keep.tif").read_bytes() == b"verified frame"
    assert not [p for p in Path(lab.remote).rglob("*") if mount.is_temp_name(p.name)]
    there.unlink()
    assert lab.push().ok  # the name free again: sent
    assert there.read_bytes() == data


@pytest.mark.parametrize("size", sorted(SIZES))
def test_a_changed_file_the_listing_showed_is_replaced_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: str
) -> None:
    """A file the push sends over its listed NAS copy on purpose is renamed over it (no look-up, no refusal)."""
    lab = MountLab(tmp_path)
    lab.write("a.tif", b"first frame")
    assert lab.push().ok
    asked = _flag_refused(monkeypatch)
    data = os.urandom(SIZES[size])
    lab.write("a.tif", data)
    result = lab.push()
    assert result.ok and result.files_sent == 1, result
    assert (Path(lab.remote) / "a.tif").read_bytes() == data
    assert asked == []


def test_a_refused_flag_is_asked_for_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the share refuses ``RENAME_NOREPLACE``, later renames and pushes go straight to the look-up."""
    lab = MountLab(tmp_path)
    asked = _flag_refused(monkeypatch)
    for i in range(5):
        lab.write(f"f{i}.tif", os.urandom(LARGE_FILE + i))
    lab.transport.threads = 1
    assert lab.push().files_sent == 5
    lab.write("g.tif", os.urandom(LARGE_FILE))
    assert lab.push().files_sent == 1
    assert asked == ["f0.tif"], asked
