"""The mount transport on a real share that folds case: exFAT through FUSE (as an SMB share does).

Found by review on exfat-fuse: ``MountTransport._share_folds`` took two
inode numbers for the run folder under its name and under its name with
the case swapped for two folders, so the share passed for one that tells
case apart and a late ``a.tif`` landed on the verified ``A.tif``, nothing
kept. A FUSE filesystem without ``use_ino`` (exfat-fuse, and cifs with
``noserverino``) numbers a file per name it is looked up under; the share
now folds when both names are found but its folder does not list both.

Needs root, /dev/fuse and a free loop device (``scripts/bootstrap.sh``
installs exfat-fuse and exfatprogs); missing ones fail the tests.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from exlab_wizard.sync.transports.base import TransportError, TransportErrorKind
from tests.fixtures.fuse_shares import exfat_share
from tests.lab import MountLab, everything_under


@pytest.fixture
def exfat_lab(tmp_path: Path):
    """A mount lab whose NAS folder (tmp_path/nas) is an exFAT mount; the marker is written there."""
    with exfat_share(tmp_path / "nas"):
        yield MountLab(tmp_path)


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


def test_a_late_case_twin_never_lands_on_the_verified_copy(exfat_lab: MountLab) -> None:
    lab = exfat_lab
    lab.write("A.tif", b"verified frame")
    assert lab.push().ok
    lab.write("a.tif", b"another frame, late")
    outcome = _push(lab)
    # rule 2: the verified copy of A.tif is still on the NAS. Read by the names listed: a lookup of
    # "A.tif" may still find a replaced file's node in the kernel's FUSE entry cache for a moment.
    assert b"verified frame" in everything_under(Path(lab.remote)), _nas_names(Path(lab.remote))
    assert isinstance(outcome, TransportError), outcome
    assert outcome.kind is TransportErrorKind.REMOTE_WRITE_REFUSED, outcome
    assert "'A.tif'" in outcome.message and "'a.tif'" in outcome.message
    assert _nas_names(Path(lab.remote)) == ["A.tif"]


def test_a_late_file_in_a_case_twin_folder_is_refused(exfat_lab: MountLab) -> None:
    lab = exfat_lab
    lab.write("Sub/A.tif", b"verified frame")
    assert lab.push().ok
    lab.write("sub/A.tif", b"another frame, late")
    outcome = _push(lab)
    assert b"verified frame" in everything_under(Path(lab.remote)), _nas_names(Path(lab.remote))  # rule 2
    assert isinstance(outcome, TransportError), outcome
    assert outcome.kind is TransportErrorKind.REMOTE_WRITE_REFUSED, outcome
