"""rsync_ssh names every remote folder exactly, whatever its name or the run's names.

- A remote path holding a wildcard character (``[``, and with an override of
  the gate ``*``, ``?``) is expanded by rsync's remote side (its shell, rrsync,
  or rsync itself), as a source and as a destination: ``Run_[1]`` was listed,
  fetched and written as ``Run_1`` whenever that existed. Now each is
  bracketed, and a destination is made before it is written to.
- A data folder named ``.rsync-partial`` is the run's own: rsync's relative
  partial-dir of that name took ``D/.rsync-partial/N`` for the partial upload
  of ``D/N`` (used it as the basis and deleted it) and never sent such a
  folder again. Such a run is pushed without a partial-dir, and such a folder
  on the NAS is a leftover only where the run has (and had) none.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from exlab_wizard.sync.transports._process import LocalTree
from exlab_wizard.sync.transports.base import TransportError, TransportErrorKind
from exlab_wizard.sync.transports.rsync_ssh import (
    PARTIAL_DIR,
    RsyncSshTransport,
    _partial_args,
    _sort_extras,
    parse_listing,
    remote_path_arg,
)
from tests.fixtures.sshd import RW_USER
from tests.helpers import tree, wait_until
from tests.lab import RUN_REL
from tests.lab import make_hostile_run as make_run
from tests.lab import rsync_equipment as equipment

pytestmark = pytest.mark.network
K = TransportErrorKind

FILES = {"image_001.tif": os.urandom(4000), "sub/notes.txt": b"this run's notes\n"}
TWIN = {name: bytes(255 - b for b in data) for name, data in FILES.items()}  # same names and sizes


def _chown(root: Path) -> None:
    subprocess.run(["chown", "-R", f"{RW_USER}:{RW_USER}", str(root)], check=True)


def test_remote_path_arg_brackets_every_wildcard_character() -> None:
    assert remote_path_arg("/nas/P[1]/Runs/Run_*?]") == "/nas/P[[]1]/Runs/Run_[*][?]]"
    assert remote_path_arg("/nas/plain/back\\slash") == "/nas/plain/back\\slash"
    assert remote_path_arg("/nas/a\\b[1]", protected=True) == "/nas/a[\\\\]b[[]1]"  # -s: glob(3) escapes
    for name in ("a\\[1]", "a\\*", "a\\]"):  # rsync would pass the backslash on as an escape
        with pytest.raises(TransportError) as caught:
            remote_path_arg(f"/nas/{name}")
        assert caught.value.kind == K.UNKNOWN


@pytest.mark.parametrize(
    ("rel", "sibling"),
    [
        (RUN_REL.with_name("Run_[1]"), RUN_REL.with_name("Run_1")),
        (RUN_REL.with_name("Run_*"), RUN_REL.with_name("Run_x")),
        (RUN_REL.with_name("Run_?"), RUN_REL.with_name("Run_x")),
        (Path("P[1]") / "Runs" / "Run_A", Path("P1") / "Runs" / "Run_A"),  # a project above the run
    ],
    ids=["bracket", "star", "question", "project"],
)
async def test_a_folder_named_like_a_pattern_is_listed_fetched_and_written_as_itself(
    tmp_path, sshd, remote_dir, rel, sibling
):
    eq = equipment(tmp_path, sshd, remote_dir)
    restricted = equipment(tmp_path, sshd, remote_dir, key=sshd.env.rrsync_key)  # rrsync: its own glob
    run = make_run(eq.local_root, {**FILES, ".exlab-wizard/creation.json": b"{}"}, rel=rel, symlink=False)
    other = remote_dir / sibling
    for name, data in TWIN.items():
        (other / name).parent.mkdir(parents=True, exist_ok=True)
        (other / name).write_bytes(data)
    _chown(remote_dir)
    transport = RsyncSshTransport(eq)

    # Not there yet: nothing listed, nothing fetched (not the sibling's files).
    assert await transport.remote_listing(run) == {}
    assert await RsyncSshTransport(restricted).remote_listing(run) == {}
    assert await transport.fetch(run, list(FILES), tmp_path / "none") == {}

    # Pushed into its own folder, never the sibling's, and not refused for the sibling's files.
    await transport.push(run, bwlimit_kibps=None, fresh=True)
    assert tree(remote_dir / rel) == {**FILES, ".exlab-wizard/creation.json": b"{}"}
    assert tree(other) == TWIN
    sizes = {**{name: len(data) for name, data in FILES.items()}, ".exlab-wizard/creation.json": 2}
    assert await transport.remote_listing(run) == sizes
    assert await RsyncSshTransport(restricted).remote_listing(run) == sizes
    fetched = await transport.fetch(run, list(FILES), tmp_path / "back")
    assert {name: path.read_bytes() for name, path in fetched.items()} == FILES
    streamed = await RsyncSshTransport(restricted).remote_manifest(run)  # read back through rrsync
    assert streamed.hashes["image_001.tif"] == hashlib.sha256(FILES["image_001.tif"]).hexdigest()

    # Sent again: its own files, no conflict; the metadata push lands in its own .exlab-wizard/.
    (run / "image_001.tif").write_bytes(os.urandom(4000))
    os.utime(run / "image_001.tif", (1_900_000_000, 1_900_000_000))
    await transport.push(run, bwlimit_kibps=None)
    shutil.rmtree(remote_dir / rel / ".exlab-wizard")
    await transport.push_metadata(run)
    assert tree(remote_dir / rel) == tree(run)
    assert tree(other) == TWIN

    # Its NAS folder gone: the last look before a deletion sees it gone, not the sibling.
    shutil.rmtree(remote_dir / rel)
    assert await transport.remote_listing(run) == {}
    assert await RsyncSshTransport(restricted).remote_listing(run) == {}


# ------------------------------------------------------- a data folder named .rsync-partial


RUN_OWN = {
    "a.tif": os.urandom(3000),
    ".rsync-partial/a.tif": b"verified data in a folder named like rsync's partial-dir\n",
    "sub/b.bin": os.urandom(5000),
    "sub/.rsync-partial/b.bin": b"more of the run's own data\n",
}


async def test_a_run_folder_named_rsync_partial_is_sent_and_never_taken_for_a_partial_upload(
    tmp_path, sshd, remote_dir
):
    eq = equipment(tmp_path, sshd, remote_dir)
    run = make_run(eq.local_root, RUN_OWN, symlink=False)
    nas = remote_dir / RUN_REL
    transport = RsyncSshTransport(eq)
    await transport.push(run, bwlimit_kibps=None)  # a new folder: written in place
    assert tree(nas) == RUN_OWN
    kept = {rel: os.lstat(nas / rel).st_ino for rel in RUN_OWN if PARTIAL_DIR in rel}

    # The files those folders would hold "partials" of change; a file is added to one of them.
    for rel in ("a.tif", "sub/b.bin"):
        (run / rel).write_bytes(os.urandom(len(RUN_OWN[rel])))
        os.utime(run / rel, (1_900_000_000, 1_900_000_000))
    (run / PARTIAL_DIR / "late.txt").write_bytes(b"added after the first push")
    await transport.push(run, bwlimit_kibps=None)
    assert tree(nas) == tree(run)  # the folders' files kept, the new one sent
    assert {rel: os.lstat(nas / rel).st_ino for rel in kept} == kept  # not even rewritten


async def test_a_push_of_such_a_run_cut_off_writes_nothing_into_its_folder(tmp_path, sshd, remote_dir):
    eq = equipment(tmp_path, sshd, remote_dir)
    files = {"a.txt": b"a", ".rsync-partial/big.bin": b"the run's own"}
    run = make_run(eq.local_root, files, symlink=False)
    transport = RsyncSshTransport(eq)
    await transport.push(run, bwlimit_kibps=None)
    nas = remote_dir / RUN_REL
    (run / "big.bin").write_bytes(os.urandom(900_000))

    push = asyncio.create_task(transport.push(run, bwlimit_kibps=150))  # into a folder that exists
    await wait_until(lambda: any(nas.glob(".big.bin.*")), what="big.bin on its way")
    await asyncio.sleep(0.3)
    push.cancel()  # rsync stopped: with a partial-dir, its receiver would keep what arrived there
    with pytest.raises(asyncio.CancelledError):
        await push
    await wait_until(lambda: not any(nas.glob(".big.bin.*")), what="the temporary file removed")
    assert tree(nas) == files

    await transport.push(run, bwlimit_kibps=None)
    assert tree(nas) == tree(run)


async def test_a_leftover_partial_dir_in_a_folder_the_run_no_longer_has_is_removed(tmp_path, sshd, remote_dir):
    """Its folder is not in the run: rsync's removal, sent from the run folder, failed "file has vanished"."""
    eq = equipment(tmp_path, sshd, remote_dir)
    run = make_run(eq.local_root, {"a.txt": b"a"}, symlink=False)
    nas = remote_dir / RUN_REL
    (nas / "gone" / PARTIAL_DIR).mkdir(parents=True)
    (nas / "gone" / PARTIAL_DIR / "c.bin").write_bytes(b"partial of a file in a folder deleted since")
    _chown(remote_dir)
    await RsyncSshTransport(eq).push(run, bwlimit_kibps=None)
    assert tree(nas) == {"a.txt": b"a"}


def test_only_a_partial_dir_the_run_does_not_have_is_a_leftover() -> None:
    local = LocalTree(files={"a.tif": 1, ".rsync-partial/a.tif": 1, "sub/b.bin": 1}, dirs={".rsync-partial", "sub"})
    listing = parse_listing(
        b"-rw-r--r--              1 2026/01/01 00:00:00 .rsync-partial/stray.bin\n"
        b"-rw-r--r--              1 2026/01/01 00:00:00 sub/.rsync-partial/b.bin\n"
        b"-rw-r--r--              1 2026/01/01 00:00:00 gone/.rsync-partial/c.bin\n"
        b"-rw-r--r--              1 2026/01/01 00:00:00 reaped/.rsync-partial/d.bin\n"
        b"-rw-r--r--              1 2026/01/01 00:00:00 .exlab-wizard/previous/20260101T000000Z/.rsync-partial/a.tif\n"
    )
    cleaned = frozenset({"reaped/.rsync-partial/d.bin"})  # the run's own, its local copy deleted by cleanup
    extras = _sort_extras(local, listing, cleaned)
    assert extras.leftovers == ["gone/.rsync-partial", "sub/.rsync-partial"]  # partials of an interrupted push
    assert extras.foreign == [".rsync-partial/stray.bin"]  # in the run's own folder: someone else's
    # reaped/...: the run's own verified copy; previous/...: one kept when it was replaced. Both stay.
    assert _partial_args(local, frozenset()) == []  # the run has such a folder: no partial-dir
    assert _partial_args(LocalTree(files={"a.tif": 1}), cleaned) == []  # it had one
    assert _partial_args(LocalTree(files={"a.tif": 1}), frozenset()) == ["--partial", f"--partial-dir={PARTIAL_DIR}"]
