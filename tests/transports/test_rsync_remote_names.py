"""rsync_ssh names every remote folder exactly, whatever its name.

- A remote path holding a wildcard character (``[``, and with an override of
  the gate ``*``, ``?``) is expanded by rsync's remote side (its shell, rrsync,
  or rsync itself), as a source and as a destination: ``Run_[1]`` was listed,
  fetched and written as ``Run_1`` whenever that existed. Now each is
  bracketed, and a destination is made before it is written to.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from exlab_wizard.sync.transports.base import TransportError, TransportErrorKind
from exlab_wizard.sync.transports.rsync_ssh import RsyncSshTransport, remote_path_arg
from tests.fixtures.sshd import RW_USER
from tests.helpers import tree
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
