"""The mount transport on a real Samba share through smbnetfs (:mod:`tests.fixtures.smb_share`).

Samba's defaults: lookups fold case and keep it. smbnetfs (libsmbclient)
cuts a path at ``?``: ``x?`` is the NAS file ``x``, and so is the temp
name the push makes for it. A file the push's listing did not show must
never land on a NAS file the share takes its name to mean (rule 2), and the
times the push sets must stay, or every push sends every file again.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from exlab_wizard.sync.transports.base import TransportError, TransportErrorKind
from exlab_wizard.sync.transports.mount import same_mtime
from tests.fixtures.smb_share import SmbShare
from tests.lab import MountLab, everything_under


@pytest.fixture
def smb_lab(tmp_path: Path) -> Iterator[tuple[MountLab, SmbShare]]:
    smb = SmbShare(tmp_path / "smb", tmp_path / "nas")
    try:
        smb.mount()
        yield MountLab(tmp_path), smb
    finally:
        smb.close()


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def _server(lab: MountLab, smb: SmbShare) -> Path:
    """The run's folder on the server's own disk."""
    return smb.server_dir / Path(lab.remote).relative_to(lab.nas)


def _push(lab: MountLab):
    try:
        return lab.push()
    except TransportError as exc:
        return exc


def test_the_share_is_samba_through_fuse(smb_lab) -> None:
    lab, smb = smb_lab
    (lab.nas / "A.tif").write_bytes(b"frame")
    assert (smb.server_dir / "A.tif").read_bytes() == b"frame"  # on the server's disk
    assert (lab.nas / "a.tif").read_bytes() == b"frame"  # folds case
    assert "A.tif" in os.listdir(lab.nas)  # keeps it
    with open("/proc/self/mountinfo") as handle:
        assert any(f" {lab.nas} " in line and "fuse.smbnetfs" in line for line in handle)


@pytest.mark.parametrize("late", ["x?", "x?late.tif"])
@pytest.mark.parametrize("threads", [1, 6])
def test_a_late_file_whose_name_the_share_cuts_never_lands_on_a_verified_copy(smb_lab, late: str, threads: int) -> None:
    """``x?`` is created, renamed and read back as the NAS file ``x``: the verified ``x`` must stay (rule 2)."""
    lab, smb = smb_lab
    lab.write("x", b"verified frame")
    assert lab.push().ok
    lab.write(late, b"another frame, late")
    lab.transport.threads = threads
    outcome = _push(lab)
    server = _server(lab, smb)
    assert b"verified frame" in everything_under(server), (_names(server), outcome)  # rule 2
    assert isinstance(outcome, TransportError), outcome
    assert outcome.kind is TransportErrorKind.REMOTE_WRITE_REFUSED, outcome
    assert "already holds a file" in outcome.message, outcome.message


def test_two_names_the_share_cuts_to_one_are_not_both_taken(smb_lab) -> None:
    """``scan?a`` and ``scan?b`` are both the NAS file ``scan``: the push must not report both sent."""
    lab, smb = smb_lab
    lab.write("scan?a", b"frame a")
    lab.write("scan?b", b"frame b")
    outcome = _push(lab)
    assert isinstance(outcome, TransportError), (outcome, _names(_server(lab, smb)))


def test_a_late_case_twin_never_lands_on_the_verified_copy(smb_lab) -> None:
    lab, smb = smb_lab
    lab.write("A.tif", b"verified frame")
    assert lab.push().ok
    assert lab.transport._share_folds(lab.remote)
    lab.write("a.tif", b"another frame, late")
    outcome = _push(lab)
    assert b"verified frame" in everything_under(_server(lab, smb))  # rule 2
    assert isinstance(outcome, TransportError) and outcome.kind is TransportErrorKind.REMOTE_WRITE_REFUSED, outcome


def test_a_verified_file_renamed_in_case_only_is_not_written_over(smb_lab) -> None:
    """A.tif verified; the lab replaces it by a.tif (other bytes): the NAS's A.tif is another file, kept."""
    lab, smb = smb_lab
    lab.write("A.tif", b"verified frame")
    assert lab.push().ok
    (lab.run / "A.tif").unlink()
    lab.write("a.tif", b"another frame")
    outcome = _push(lab)
    assert (_server(lab, smb) / "A.tif").read_bytes() == b"verified frame"  # rule 2
    assert isinstance(outcome, TransportError), outcome


def test_a_foreign_nas_file_differing_only_in_case_is_a_conflict(smb_lab) -> None:
    lab, smb = smb_lab
    lab.write("a.tif", b"this run's frame")
    server = _server(lab, smb)
    server.mkdir(parents=True)
    (server / "A.tif").write_bytes(b"another run's frame")
    outcome = _push(lab)
    assert (server / "A.tif").read_bytes() == b"another run's frame"  # rule 2
    assert isinstance(outcome, TransportError) and outcome.kind is TransportErrorKind.REMOTE_CONFLICT, outcome


def test_the_times_set_by_the_push_stay_and_the_next_push_sends_nothing(smb_lab) -> None:
    """Samba stamps the write time when the writing handle closes, after the push set it: set again by name."""
    lab, smb = smb_lab
    old = 1_600_000_000_123_456_789
    lab.write("a.tif", b"frame a", mtime_ns=old)
    lab.write("sub/b.raw", os.urandom(3000), mtime_ns=old)
    first = lab.push()
    assert first.ok and first.files_sent == 2, first
    for rel in ("a.tif", "sub/b.raw"):
        on_server = (_server(lab, smb) / rel).stat().st_mtime_ns
        assert same_mtime(old, on_server), (rel, old, on_server)
    again = lab.push()
    assert again.ok and again.files_sent == 0, again.message
