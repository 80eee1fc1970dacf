"""A NAS folder of the run swapped for a symlink after the push listed it is never written through (rule 2).

The push lists the remote run folder once (a symlink there is a conflict),
then writes files one by one, for hours on a large run. Files of 1 MiB and
more (and every file on a share whose syncfs is not trusted: SMB, FUSE) were
created and renamed by path, so a folder replaced meanwhile by a symlink to
another run's verified folder was followed, and this run's bytes renamed over
the other run's verified file. They are now made, renamed and read back in
their folder opened part by part without following a symlink, as the batched
small files always were. Keeping a verified NAS copy under
``.exlab-wizard/previous/<stamp>/`` likewise never follows a symlink there.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from exlab_wizard.sync.transports.base import TransportError, TransportErrorKind
from exlab_wizard.sync.transports.mount import LARGE_FILE, MountTransport
from tests.lab import MountLab as Lab


def test_remote_folder_swapped_for_symlink_mid_push_is_not_written_through(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    # One copy thread: the files go in order, "a/" before "sub/".
    lab.transport = MountTransport(lab.equipment, log=lab.log, threads=1)

    # Another run's verified NAS copy (the only copy once its local data is cleaned).
    other = lab.remote.parent / "Run_2023-12-01"
    (other / "sub").mkdir(parents=True)
    theirs = (b"run 2023-12-01 verified bytes ").ljust(LARGE_FILE + 7, b"A")
    (other / "sub" / "data.bin").write_bytes(theirs)

    lab.write("a/first.bin", os.urandom(2 * LARGE_FILE))
    ours = (b"run 2024-01-08 bytes ").ljust(LARGE_FILE + 7, b"B")
    lab.write("sub/data.bin", ours)
    lab.remote.mkdir(parents=True)
    (lab.remote / "sub").mkdir()  # an earlier, interrupted push made the folder

    swapped: list[bool] = []

    def swap_on_first_bytes(_count: int) -> None:
        # A person (or a script) on the NAS side tidies up while the push copies a/first.bin.
        if not swapped:
            swapped.append(True)
            (lab.remote / "sub").rename(lab.remote.parent / "moved-away")
            (lab.remote / "sub").symlink_to(other / "sub")

    try:
        lab.push(progress=swap_on_first_bytes)
    except TransportError:
        pass  # failing is fine; writing through the link is not
    assert swapped
    after = (other / "sub" / "data.bin").read_bytes()
    assert hashlib.sha256(after).hexdigest() == hashlib.sha256(theirs).hexdigest(), (
        "the other run's verified NAS file was overwritten with this run's bytes through the symlink"
    )


def test_keeping_a_verified_copy_never_follows_a_symlink_on_the_way_to_previous(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.write("sub/data.bin", b"verified bytes")
    assert lab.push().ok
    # On the NAS, previous/ is a symlink to another run's folder (made by hand, or by a tool).
    elsewhere = lab.remote.parent / "Run_2023-12-01"
    elsewhere.mkdir()
    (lab.remote / ".exlab-wizard").mkdir(exist_ok=True)
    (lab.remote / ".exlab-wizard" / "previous").symlink_to(elsewhere)

    with pytest.raises(TransportError) as caught:
        asyncio.run(lab.transport.keep_previous(lab.run, ["sub/data.bin"], "20240108T120000Z"))
    assert caught.value.kind == TransportErrorKind.REMOTE_CONFLICT, caught.value.message
    assert list(elsewhere.iterdir()) == []  # nothing made or moved through the link
    assert (lab.remote / "sub" / "data.bin").read_bytes() == b"verified bytes"
