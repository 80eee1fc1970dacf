"""Two files of one run whose names differ only in letter case, on a share that ignores case.

Found by review (reasoned from the code): on a share that folds case (SMB,
exFAT) a late ``a.tif`` beside the verified ``A.tif`` counted as new (the
push looks names up exactly), and its rename landed on the verified NAS
copy of ``A.tif``, nothing kept. The push now refuses such a run before
anything is written (``remote_write_refused``, naming both files) when the
share folds; a share that tells case apart takes both, as before.

Here the share's folding is shown the way a lookup on it behaves: the run
folder found under its name with the case swapped (a symlink to it, made on
the share; the kernel's own casefold needs CONFIG_UNICODE, which this one
lacks). The same cases on a real share that folds case (exFAT through
exfat-fuse, which also gives the one folder a new inode number per name
looked up) are in ``test_mount_case_folding_share.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from exlab_wizard.sync.transports.base import TransportError, TransportErrorKind
from tests.lab import MountLab


def _folding(lab: MountLab) -> None:
    """The share finds the run folder under its name with the case swapped, as one that folds case does."""
    remote = Path(lab.remote)
    os.symlink(remote.name, remote.parent / remote.name.swapcase())


def test_a_late_case_twin_never_lands_on_the_verified_copy_of_a_share_that_folds_case(tmp_path: Path) -> None:
    lab = MountLab(tmp_path)
    lab.write("A.tif", b"verified frame")
    assert lab.push().ok
    _folding(lab)
    lab.write("a.tif", b"another frame, late")
    with pytest.raises(TransportError) as refused:
        lab.push()
    assert refused.value.kind is TransportErrorKind.REMOTE_WRITE_REFUSED
    assert "'A.tif'" in refused.value.message and "'a.tif'" in refused.value.message
    assert (Path(lab.remote) / "A.tif").read_bytes() == b"verified frame"  # rule 2
    assert sorted(p.name for p in Path(lab.remote).iterdir() if not p.name.startswith(".")) == ["A.tif"]


def test_a_late_file_in_a_case_twin_folder_is_refused_on_a_share_that_folds_case(tmp_path: Path) -> None:
    """``sub/A.tif`` is the NAS file ``Sub/A.tif`` on such a share (found by review)."""
    lab = MountLab(tmp_path)
    lab.write("Sub/A.tif", b"verified frame")
    assert lab.push().ok
    _folding(lab)
    lab.write("sub/A.tif", b"another frame, late")
    with pytest.raises(TransportError) as refused:
        lab.push()
    assert refused.value.kind is TransportErrorKind.REMOTE_WRITE_REFUSED
    assert (Path(lab.remote) / "Sub" / "A.tif").read_bytes() == b"verified frame"


def test_a_share_that_tells_case_apart_takes_both(tmp_path: Path) -> None:
    lab = MountLab(tmp_path)
    lab.write("A.tif", b"one")
    assert lab.push().ok
    lab.write("a.tif", b"two")
    assert lab.push().ok
    assert (Path(lab.remote) / "A.tif").read_bytes() == b"one"
    assert (Path(lab.remote) / "a.tif").read_bytes() == b"two"


def test_twins_are_names_of_one_folder_that_fold_alike() -> None:
    from exlab_wizard.sync.transports.conflict import fold_twins as _fold_twins

    assert _fold_twins(["d/A.tif", "d/b", "d/a.tif"]) == ("d/A.tif", "d/a.tif")
    assert _fold_twins(["d/A.tif", "e/a.tif"]) is None
    assert _fold_twins(["x/caf\u00e9.raw", "x/cafe\u0301.raw"]) == ("x/caf\u00e9.raw", "x/cafe\u0301.raw")
    assert _fold_twins(["Image_001.TIF", "Image_002.TIF"]) is None
    # folders too: their files meet on the NAS (found by review)
    assert _fold_twins(["Sub/A.tif", "other/x", "sub/A.tif"], ["Sub", "other", "sub"]) == ("Sub", "sub")
    assert _fold_twins(["Data", "data/x"], ["data"]) == ("data", "Data")
    assert _fold_twins(["d/Data", "d/data/x"], ["d", "d/data"]) == ("d/data", "d/Data")
