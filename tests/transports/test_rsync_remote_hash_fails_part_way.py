"""rsync_ssh reads no hash from a python3 remote hasher that failed part way.

``remote_hash.py`` exits non-zero only when it did not finish (a traceback: its
own shares, a child it could not wait for): its output is then a part of the
run's manifest, and the files it misses would fail the verification on every
attempt as "missing on the NAS" (the client took such output for a manifest
some files of which could not be read, as ``sha256sum`` under ``xargs`` gives
with exit 123). Now the attempt fails as a tool failure and is retried; the sh
programs' exit 123 keeps its meaning.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from exlab_wizard.sync.transports import rsync_ssh
from exlab_wizard.sync.transports.base import TransportError
from exlab_wizard.sync.transports.rsync_ssh import RsyncSshTransport
from tests.lab import make_hostile_run as make_run
from tests.lab import rsync_equipment as equipment

pytestmark = pytest.mark.network

FILES = {"a.bin": b"a" * 100, "b.bin": b"b" * 200}

# Prints a true record for a.bin only, then dies as a traceback would.
_HALF_A_MANIFEST = (
    "import hashlib, os, sys\n"
    "data = open(os.path.join(sys.argv[1], 'a.bin'), 'rb').read()\n"
    "sys.stdout.buffer.write(hashlib.sha256(data).hexdigest().encode() + b'  a.bin\\0')\n"
    "sys.stdout.flush()\n"
    "raise ChildProcessError(10, 'No child processes')\n"
)


async def test_a_python3_hasher_that_failed_part_way_gives_no_manifest(tmp_path, sshd, remote_dir, monkeypatch):
    eq = equipment(tmp_path, sshd, remote_dir)
    run = make_run(eq.local_root, FILES, symlink=False)
    transport = RsyncSshTransport(eq)
    assert (await transport.push(run, bwlimit_kibps=None)).ok
    assert await transport.hash_tool(run) == "python3-openssl"
    whole = await transport.remote_manifest(run)
    assert whole.hashes == {name: hashlib.sha256(data).hexdigest() for name, data in FILES.items()}

    monkeypatch.setattr(rsync_ssh, "_PY_HASH", _HALF_A_MANIFEST)
    with pytest.raises(TransportError) as failed:
        await transport.remote_manifest(run)
    assert "hashing" in failed.value.message and failed.value.kind.value != "hash_mismatch", failed.value
    assert os.path.exists(remote_dir)  # nothing touched on the NAS
