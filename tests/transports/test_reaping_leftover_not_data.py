"""A reaper's set-aside file (``.exlab-reaping-<hex>``) is never sent as run data.

A reaper pass killed between a planned file's rename to its private name and the unlink leaves
that name in the run; docs/cleanup.md: "no listing of a run (the push, the local checks, the
audit's late data) counts such a name as data". If a push sends it anyway, the NAS copy holds a
file the local hashes never list: the verification finds it "extra" (FAILED local_file_vanished),
and since no local listing ever shows it, every retry and audit fails the same way.
"""

from __future__ import annotations

import os

from exlab_wizard.fileio import reaping_name
from exlab_wizard.sync.metadata_push import data_only
from tests.transports.test_conformance import local_root, make_run, remote  # noqa: F401 (fixtures)


async def test_a_set_aside_file_is_neither_sent_nor_listed_on_the_nas(remote, local_root):  # noqa: F811
    eq = remote.equipment(local_root)
    run = make_run(eq.local_root)
    (run / "sub").mkdir(exist_ok=True)
    target = run / "sub" / "frame.raw"
    target.write_bytes(b"frame bytes " * 50)
    private = run / "sub" / reaping_name("old.raw", 123456)  # what a killed deletion pass left
    private.write_bytes(b"set aside for its unlink " * 10)
    transport = remote.transport(eq)

    result = await transport.push(run, bwlimit_kibps=None)
    assert result.ok
    remote.settle()
    on_nas = remote.run_on_disk / "sub" / private.name
    sent = os.path.lexists(on_nas)
    manifest = await transport.remote_manifest(run)
    listed = f"sub/{private.name}" in data_only(manifest.hashes)
    # Listed by the NAS manifest while no local hashing lists it: the verification calls it "extra".
    assert not sent and not listed, ("the reaper's set-aside file was pushed to the NAS as run data", sent, listed)


async def test_a_set_aside_name_inside_the_metadata_folder_is_metadata(remote, local_root):  # noqa: F811
    eq = remote.equipment(local_root)
    run = make_run(eq.local_root)
    meta = run / ".exlab-wizard"
    meta.mkdir(exist_ok=True)
    private = meta / reaping_name("notes.txt", 42)
    private.write_bytes(b"metadata set aside")
    transport = remote.transport(eq)
    assert (await transport.push_metadata(run, bwlimit_kibps=None)).ok
    remote.settle()
    assert (remote.run_on_disk / ".exlab-wizard" / private.name).read_bytes() == b"metadata set aside"
