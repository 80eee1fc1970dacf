"""The mount transport on a real share that folds case: exFAT through FUSE (as an SMB share does).

Found by review on exfat-fuse: ``MountTransport._share_folds`` took two
inode numbers for the run folder under its name and under its name with
the case swapped for two folders, so the share passed for one that tells
case apart and a late ``a.tif`` landed on the verified ``A.tif``, nothing
kept. A FUSE filesystem without ``use_ino`` (exfat-fuse, and cifs with
``noserverino``) numbers a file per name it is looked up under; the share
now folds when both names are found but its folder does not list both.

Also found there: a name the share cannot store (``a:b.tif``) fails with
ENOENT on create, and was taken for an unreachable share (retried through
every backoff, then FAILED "network"); it is now ``remote_write_refused``
naming the file, while an ENOENT of a share gone still reads unreachable.

Needs root, /dev/fuse and a free loop device (``scripts/bootstrap.sh``
installs exfat-fuse and exfatprogs); missing ones fail the tests.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from exlab_wizard.sync.transports import mount
from exlab_wizard.sync.transports.base import TransportError, TransportErrorKind
from tests.fixtures.fuse_shares import exfat_share
from tests.lab import MountLab, everything_under


@pytest.fixture
def exfat_lab(tmp_path: Path):
    """A mount lab whose NAS folder (tmp_path/nas) is an exFAT mount; the marker is written there."""
    with exfat_share(tmp_path / "nas"):
        yield MountLab(tmp_path)


@pytest.fixture(params=["one_by_one", "batched"])
def write_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each way small files are written: fsynced one by one (exfat-fuse's own), or in batches sealed by one syncfs."""
    if request.param == "batched":
        monkeypatch.setattr(mount, "_SYNCFS_DURABLE", mount._SYNCFS_DURABLE | {"fuseblk"})
    return request.param


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if mount.is_temp_name(p.name))


def _nas_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def _push(lab: MountLab):
    """The push's result or error, once the kernel's FUSE entry cache (1 s) forgot the names looked up."""
    try:
        return lab.push()
    except TransportError as exc:
        return exc
    finally:
        time.sleep(1.5)


def test_the_share_really_folds_case(exfat_lab: MountLab) -> None:
    exfat_lab.write("A.tif", b"verified frame")
    assert exfat_lab.push().ok
    remote = Path(exfat_lab.remote)
    assert (remote / "a.tif").read_bytes() == b"verified frame"  # one file under both names
    assert _nas_names(remote) == ["A.tif"]  # listed in the case it was created with


def test_the_share_is_seen_to_fold_case(exfat_lab: MountLab) -> None:
    exfat_lab.write("A.tif", b"verified frame")
    assert exfat_lab.push().ok
    assert exfat_lab.transport._share_folds(exfat_lab.remote)


def _late_twin_refused(lab: MountLab, verified: str, late: str) -> TransportError:
    """``verified`` pushed, then a late ``late`` (a case twin of it or of its folder) pushed: refused,
    the verified copy still on the NAS (rule 2)."""
    lab.write(verified, b"verified frame")
    assert lab.push().ok
    lab.write(late, b"another frame, late")
    outcome = _push(lab)
    # Read by the names listed: a lookup of "A.tif" may still find a replaced file's node in the
    # kernel's FUSE entry cache for a moment.
    assert b"verified frame" in everything_under(Path(lab.remote)), _nas_names(Path(lab.remote))
    assert isinstance(outcome, TransportError), outcome
    assert outcome.kind is TransportErrorKind.REMOTE_WRITE_REFUSED, outcome
    return outcome


def test_a_late_case_twin_never_lands_on_the_verified_copy(exfat_lab: MountLab) -> None:
    outcome = _late_twin_refused(exfat_lab, "A.tif", "a.tif")
    assert "'A.tif'" in outcome.message and "'a.tif'" in outcome.message
    assert _nas_names(Path(exfat_lab.remote)) == ["A.tif"]


def test_a_late_file_in_a_case_twin_folder_is_refused(exfat_lab: MountLab) -> None:
    _late_twin_refused(exfat_lab, "Sub/A.tif", "sub/A.tif")


@pytest.mark.parametrize(
    ("rel", "named"),
    [
        ("a:b.tif", "a:b.tif"),
        ('q"x.tif', 'q"x.tif'),
        ("x*", "x*"),
        ('q"x/frame.tif', 'q"x'),
        ("d/a?b.tif", "d/a?b.tif"),
    ],
)
def test_a_name_the_share_cannot_store_is_refused_not_taken_for_an_unreachable_share(
    exfat_lab: MountLab, write_path: str, rel: str, named: str
) -> None:
    lab = exfat_lab
    lab.write("ok.tif", b"frame")
    lab.write(rel, b"frame with a name exFAT refuses")
    with pytest.raises(TransportError) as refused:
        lab.push()
    assert refused.value.kind is TransportErrorKind.REMOTE_WRITE_REFUSED, refused.value
    assert "cannot store" in refused.value.message
    assert refused.value.message.startswith(f"remote refused the write: {lab.remote}/{named}:"), refused.value
    assert _leftovers(Path(lab.remote)) == []


@pytest.mark.parametrize("size", [5, 3 << 20])
def test_a_long_name_the_share_cannot_store_is_refused_at_its_rename(
    exfat_lab: MountLab, write_path: str, size: int
) -> None:
    """The bad character past the part of the name the temp name keeps: the create works, the rename fails."""
    lab = exfat_lab
    name = "x" * 210 + ":late.tif"
    lab.write(name, b"f" * size)
    with pytest.raises(TransportError) as refused:
        lab.push()
    assert refused.value.kind is TransportErrorKind.REMOTE_WRITE_REFUSED, refused.value
    assert "cannot store" in refused.value.message and name in refused.value.message
    assert _nas_names(Path(lab.remote)) == [] and _leftovers(Path(lab.remote)) == []


# ---------------------------------------------------------------- rule 3: an ENOENT of a share gone is no refused name
# (on the test's own disk: no FUSE share needed)


@pytest.mark.parametrize("gone", ["folder", "folder_made_again", "share"])
def test_a_create_failing_because_the_share_or_folder_went_is_still_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gone: str
) -> None:
    """The run folder (or the whole share, its marker with it) goes just before the first file is created in it."""
    lab = MountLab(tmp_path)
    lab.write("frame.tif", b"frame")
    remote = Path(lab.remote)
    real_open = os.open

    def open_after_it_went(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and mount.is_temp_name(os.path.basename(path)) and remote.exists():
            shutil.rmtree(lab.nas if gone == "share" else remote)
            if gone == "folder_made_again":
                remote.mkdir()
            elif gone == "share":
                lab.nas.mkdir()  # the bare mount point, no marker
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_after_it_went)
    with pytest.raises(TransportError) as caught:
        lab.push()
    assert caught.value.kind is TransportErrorKind.NETWORK, caught.value
    assert "cannot store" not in caught.value.message
    assert caught.value.message.startswith("remote unreachable"), caught.value
