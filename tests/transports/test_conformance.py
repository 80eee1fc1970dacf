"""One conformance suite, run against every transport.

Each transport is a few lines of fixture (:class:`Remote`): how to build its
equipment, where the run lands on the server's disk (so a test can look at,
damage or plant files there without going through the transport), an
equipment whose server is down, and the name the transport gives its own
leftover of an interrupted upload. The tests are the same for all:

- hostile, nested and empty files arrive byte for byte, symlinks are not
  copied, and the remote manifest equals the local hashes;
- a second push sends nothing and rewrites nothing;
- someone else's files make the push fail ``remote_conflict`` and stay as they
  were, even when named like a leftover of a file this run does not have;
- our own leftovers are no conflict and are gone after the push;
- reachable() is true; with the server down (or the share unmounted) it is
  false, and push, remote_manifest and remote_listing raise ``network`` -- an
  unreachable remote is never an empty one; so is a remote root that is gone;
  probed again and again while down, it writes one equipment-log line at most;
- remote_listing gives every regular file of the remote run folder with its
  size (hostile names, non-UTF-8 names where the backend keeps bytes), sees a
  deleted, a truncated and an added file, leaves symlinks out, and lists a
  run folder that is not there yet as empty; remote_stats lists the same
  files with the mtime each was sent with (in a time zone far from UTC);
- the manifest of a run folder that is not there yet is empty;
- the manifest shows what the remote holds: a corrupted byte (size and mtime
  kept), a truncated, a deleted and an added file;
- ``rewrite`` sends again a file damaged on the remote with size and mtime kept;
- files named in ``cleaned`` (local copies deleted by cleanup) are ours, not
  a conflict, and are left as they are;
- ``push_metadata`` sends every ``.exlab-wizard/`` file (even one rewritten
  with size and mtime kept) and no data file; with the server down it raises
  ``network`` and writes nothing;
- ``fetch`` reads named files back as the remote stores them (hostile names,
  a file absent there left out); with the server down it raises ``network``;
- ``keep_previous`` moves named files under ``.exlab-wizard/previous/<stamp>/``
  on the server (a rename where the server has one), is idempotent, never
  overwrites a kept file, and the kept files are no conflict for the next push
  and no data for verification.

Backends: mount (a folder with the mount marker), rsync_ssh (the test sshd;
once as it sends a run this small, in one rsync, and once with every run sent
as parallel rsync streams), rclone to sftp (the same sshd) and rclone to an S3 object store (``rclone
serve s3`` on loopback). A missing tool fails the test, never skips it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import os
import pwd
import shutil
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from exlab_wizard.config.models import EquipmentConfig
from exlab_wizard.sync import spill
from exlab_wizard.sync.equipment_log import log_path_for
from exlab_wizard.sync.transports import make_transport, rsync_ssh
from exlab_wizard.sync.transports.base import PreviousStampTaken, Transport, TransportError, TransportErrorKind
from exlab_wizard.sync.transports.mount import is_temp_name, same_mtime
from tests.fixtures.sshd import RW_USER, free_port
from tests.helpers import assert_sha256sum_check, tree
from tests.lab import EQ as EQUIPMENT
from tests.lab import HOSTILE, RUN_REL, rsync_equipment
from tests.lab import make_hostile_run as make_run

pytestmark = pytest.mark.network
K = TransportErrorKind
BACKENDS = ["mount", "mount_spilled", "rsync_ssh", "rsync_ssh_streams", "rclone_sftp", "rclone_s3"]
#: the mount transport's temporary name while writing ``name`` (``.<name>.exlab-tmp-<hex>``)
MOUNT_TMP = ".{}.exlab-tmp-0123456789ab"


def sha256(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def data_only(hashes: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in hashes.items() if not k.startswith(".exlab-wizard/")}


def file_ids(root: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, size, mtime) of every file: a rewrite or a touch shows as a change."""
    out = {}
    for folder, _dirs, files in os.walk(root):
        for name in files:
            info = os.lstat(os.path.join(folder, name))
            out[Path(folder, name).relative_to(root).as_posix()] = (info.st_ino, info.st_size, info.st_mtime_ns)
    return out


def snapshot(root: Path) -> dict[str, tuple[bytes, tuple[int, int, int]]]:
    ids = file_ids(root)
    return {name: (data, ids[name]) for name, data in tree(root).items()}


@dataclass
class Remote:
    """One transport and its server, as the conformance tests see them."""

    name: str
    #: equipment whose runs live under ``local_root`` and land on the working server
    equipment: Callable[[Path], EquipmentConfig]
    #: the same equipment with the server down (or the share unmounted)
    down: Callable[[Path], EquipmentConfig]
    #: the server's folder on disk where the run ``RUN_REL`` lands
    run_on_disk: Path
    #: the transport's own leftover of an interrupted upload of ``name`` (a leaf name)
    leftover: Callable[[str], str]
    #: a leftover-shaped name is ours only when its file is in the run (rsync and
    #: rclone names are shared with anyone using those tools); the mount
    #: transport's temporary names are its own alone
    leftover_needs_run_file: bool = True
    #: wait until files written straight to disk are seen through the server
    settle: Callable[[], None] = lambda: None
    #: the same equipment with the server up and its remote root folder gone
    root_gone: Callable[[Path], EquipmentConfig] | None = None
    #: where that gone root would be on the server's disk (a write must never create it)
    gone_on_disk: Path | None = None
    #: names are bytes end to end (a name that is not UTF-8 is listed as it is stored)
    byte_names: bool = False
    #: the server's login that must own files written straight to disk (None: a share, no login)
    login: str | None = RW_USER

    def transport(self, eq: EquipmentConfig) -> Transport:
        return make_transport(eq)


def _with_port(conf: Path, old: str, new: str) -> Path:
    text = conf.read_text()
    assert old in text, (old, text)
    down = conf.with_name(conf.stem + "-down.conf")
    down.write_text(text.replace(old, new))
    return down


def _rclone_equipment(local_root: Path, remote: str, remote_path: str, config: Path) -> EquipmentConfig:
    transport = {
        "type": "rclone",
        "rclone_remote": remote,
        "rclone_remote_path": remote_path,
        "rclone_config": str(config),
    }
    return EquipmentConfig.model_validate({"id": EQUIPMENT, "local_root": str(local_root), "transport": transport})


def _mount(request: pytest.FixtureRequest, tmp_path: Path) -> Remote:
    nas = tmp_path / "nas"
    nas.mkdir()
    (nas / ".exlab-nas").write_text("marker\n")

    def equipment(local_root: Path, mount_path: Path = nas) -> EquipmentConfig:
        return EquipmentConfig.model_validate(
            {
                "id": EQUIPMENT,
                "local_root": str(local_root),
                "transport": {"type": "mount", "mount_path": str(mount_path)},
            }
        )

    def down(local_root: Path) -> EquipmentConfig:
        bare = tmp_path / "unmounted"  # the bare folder an unmounted share leaves: no marker
        bare.mkdir(exist_ok=True)
        return equipment(local_root, bare)

    def root_gone(local_root: Path) -> EquipmentConfig:
        return equipment(local_root, tmp_path / "no-such-share")

    assert is_temp_name(MOUNT_TMP.format("x"))
    return Remote(
        "mount",
        equipment,
        down,
        nas / RUN_REL,
        MOUNT_TMP.format,
        leftover_needs_run_file=False,
        root_gone=root_gone,
        gone_on_disk=tmp_path / "no-such-share",
        byte_names=True,
        login=None,
    )


def _mount_spilled(request: pytest.FixtureRequest, tmp_path: Path) -> Remote:
    """The mount transport with every per-file map on disk from its first entry (spill.SpillMap)."""
    request.getfixturevalue("monkeypatch").setattr(spill, "SPILL_AT", 0)
    return dataclasses.replace(_mount(request, tmp_path), name="mount_spilled")


def _rsync_ssh(request: pytest.FixtureRequest, tmp_path: Path) -> Remote:
    sshd = request.getfixturevalue("sshd")
    remote_dir = request.getfixturevalue("remote_dir")

    def equipment(local_root: Path) -> EquipmentConfig:
        assert local_root.name == "lab"
        return rsync_equipment(local_root.parent, sshd, remote_dir)

    def down(local_root: Path) -> EquipmentConfig:
        eq = equipment(local_root)
        return eq.model_copy(update={"transport": eq.transport.model_copy(update={"ssh_port": free_port()})})

    def root_gone(local_root: Path) -> EquipmentConfig:
        assert local_root.name == "lab"
        return rsync_equipment(local_root.parent, sshd, remote_dir / "no-such-root")

    return Remote(
        "rsync_ssh",
        equipment,
        down,
        remote_dir / RUN_REL,
        lambda name: f".{name}.Ab12Cd",
        root_gone=root_gone,
        gone_on_disk=remote_dir / "no-such-root",
        byte_names=True,
    )


def _rsync_ssh_streams(request: pytest.FixtureRequest, tmp_path: Path) -> Remote:
    """rsync_ssh with every run, however small, sent as parallel rsync streams."""
    monkeypatch = request.getfixturevalue("monkeypatch")
    monkeypatch.setattr(rsync_ssh, "STREAMS_MIN_BYTES", 0)
    monkeypatch.setattr(rsync_ssh, "STREAMS_MIN_FILES", 0)
    monkeypatch.setattr(rsync_ssh, "STREAMS_MIN_AVERAGE_BYTES", 0)
    return _rsync_ssh(request, tmp_path)


def _rclone_sftp(request: pytest.FixtureRequest, tmp_path: Path) -> Remote:
    sshd = request.getfixturevalue("sshd")
    remote_dir = request.getfixturevalue("remote_dir")
    conf = request.getfixturevalue("rclone_sftp_config")(sshd)

    def equipment(local_root: Path) -> EquipmentConfig:
        return _rclone_equipment(local_root, "labsftp", str(remote_dir), conf)

    def down(local_root: Path) -> EquipmentConfig:
        dead = _with_port(conf, f"port = {sshd.port}\n", f"port = {free_port()}\n")
        return _rclone_equipment(local_root, "labsftp", str(remote_dir), dead)

    def root_gone(local_root: Path) -> EquipmentConfig:
        return _rclone_equipment(local_root, "labsftp", str(remote_dir / "no-such-root"), conf)

    return Remote(
        "rclone_sftp",
        equipment,
        down,
        remote_dir / RUN_REL,
        lambda name: f"{name}.0123abcd.partial",
        root_gone=root_gone,
        gone_on_disk=remote_dir / "no-such-root",
    )


def _rclone_s3(request: pytest.FixtureRequest, tmp_path: Path) -> Remote:
    server = request.getfixturevalue("s3_server")
    conf = request.getfixturevalue("s3_rclone_config")()
    prefix = f"conformance-{uuid.uuid4().hex[:10]}"
    gone_bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"

    def equipment(local_root: Path) -> EquipmentConfig:
        return _rclone_equipment(local_root, "labs3", f"{server.bucket}/{prefix}", conf)

    def down(local_root: Path) -> EquipmentConfig:
        dead = _with_port(conf, f"127.0.0.1:{server.port}\n", f"127.0.0.1:{free_port()}\n")
        # rclone's S3 backend retries a refused connection with the AWS SDK's backoff
        # (--low-level-retries attempts, each again retried by rclone: 10-25 s a call).
        # A user's rclone.conf may lower that per remote; the refusal is classified the same.
        dead.write_text(dead.read_text() + "override.low_level_retries = 1\n")
        return _rclone_equipment(local_root, "labs3", f"{server.bucket}/{prefix}", dead)

    def root_gone(local_root: Path) -> EquipmentConfig:  # a bucket that does not exist
        return _rclone_equipment(local_root, "labs3", f"{gone_bucket}/{prefix}", conf)

    on_disk = server.data_dir / server.bucket / prefix / RUN_REL
    return Remote(
        "rclone_s3",
        equipment,
        down,
        on_disk,
        lambda name: f"{name}.0123abcd.partial",
        settle=server.settle,
        root_gone=root_gone,
        gone_on_disk=server.data_dir / gone_bucket,
    )


_FACTORIES = {
    "mount": _mount,
    "rsync_ssh": _rsync_ssh,
    "mount_spilled": _mount_spilled,
    "rsync_ssh_streams": _rsync_ssh_streams,
    "rclone_sftp": _rclone_sftp,
    "rclone_s3": _rclone_s3,
}


@pytest.fixture(params=BACKENDS)
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> Remote:
    return _FACTORIES[request.param](request, tmp_path)


@pytest.fixture
def local_root(tmp_path: Path) -> Path:
    return tmp_path / "lab"


def put_on_disk(remote: Remote, files: dict[str, bytes]) -> None:
    """Write files straight into the server's copy of the run, as someone else would."""
    for name, data in files.items():
        path = remote.run_on_disk / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for folder, _dirs, _files in os.walk(remote.run_on_disk.parents[len(RUN_REL.parts) - 1]):
        if remote.login is not None:  # (the mount backend has no login: made only by the sshd fixture)
            shutil.chown(folder, remote.login, remote.login)  # the sshd login user must be able to write there
    remote.settle()


# ------------------------------------------------------------------ tests


async def test_push_copies_hostile_nested_and_empty_files_and_manifest_matches(remote, local_root):
    eq = remote.equipment(local_root)
    run = make_run(eq.local_root)  # with a symlink inside and one pointing outside
    transport = remote.transport(eq)

    result = await transport.push(run, bwlimit_kibps=None)
    assert result.ok and result.files_sent == len(HOSTILE)
    if remote.name == "mount_spilled":  # the hashes from disk, not a dict
        assert isinstance(result.local_hashes, spill.SpillMap) and result.local_hashes.spilled
    on_disk = tree(remote.run_on_disk)
    assert on_disk == HOSTILE  # byte-identical names and contents; symlinks not copied
    assert not any(os.path.islink(remote.run_on_disk / name) for name in on_disk)
    assert_sha256sum_check(remote.run_on_disk, run)  # real coreutils over the server's copy

    manifest = await transport.remote_manifest(run)
    assert manifest.unverifiable == {}
    expected = sha256(HOSTILE)
    assert data_only(manifest.hashes) == data_only(expected)
    for name, digest in manifest.hashes.items():  # metadata files may or may not be listed
        assert digest == expected[name], name


async def test_second_push_sends_and_rewrites_nothing(remote, local_root):
    eq = remote.equipment(local_root)
    run = make_run(eq.local_root)
    transport = remote.transport(eq)
    await transport.push(run, bwlimit_kibps=None)
    before = file_ids(remote.run_on_disk)

    again = await remote.transport(eq).push(run, bwlimit_kibps=None)  # a fresh transport: a restarted service
    assert again.ok and again.files_sent == 0 and again.bytes_sent == 0
    assert file_ids(remote.run_on_disk) == before


async def _refused_untouched(remote: Remote, push: Callable[[], Any]) -> TransportError:
    """``push()`` raises ``REMOTE_CONFLICT`` and leaves the server's copy of the run as it was."""
    before = snapshot(remote.run_on_disk)
    with pytest.raises(TransportError) as caught:
        await push()
    assert caught.value.kind == K.REMOTE_CONFLICT, caught.value.message
    assert snapshot(remote.run_on_disk) == before  # nothing written, removed or touched
    return caught.value


async def test_someone_elses_files_are_remote_conflict_and_untouched(remote, local_root):
    eq = remote.equipment(local_root)
    ours = {"data.raw": b"our data", "new\nline.txt": b"ours", "sub/a.txt": b"a"}
    run = make_run(eq.local_root, ours, symlink=False)
    theirs = {"data.raw": b"their data", "theirs/result.csv": b"their result"}  # data.raw: our name, other bytes
    if remote.leftover_needs_run_file:  # shaped like a leftover, but of no file of this run
        theirs["sub/" + remote.leftover("not-in-this-run.bin")] = b"half of something"
    put_on_disk(remote, theirs)

    refused = await _refused_untouched(remote, lambda: remote.transport(eq).push(run, bwlimit_kibps=None))
    assert "theirs/result.csv" in refused.message


def _manifest_of(files: dict[str, bytes]) -> bytes:
    return "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in sorted(files.items())).encode()


async def test_another_runs_verified_copy_is_remote_conflict_and_untouched(remote, local_root):
    """Two runs on one NAS folder (a share folding case, two PCs set up alike): the first push never overwrites."""
    eq = remote.equipment(local_root)
    ours = {"frame_001.tif": b"our frame", "sub/stack.raw": b"our stack"}  # an instrument's fixed names
    run = make_run(eq.local_root, ours, symlink=False)
    theirs = {"frame_001.tif": b"their frame", "sub/stack.raw": b"their stack"}
    put_on_disk(remote, {**theirs, ".exlab-wizard/checksums.sha256": _manifest_of(theirs)})

    refused = await _refused_untouched(remote, lambda: remote.transport(eq).push(run, bwlimit_kibps=None))
    assert "verified copy of another run" in refused.message


async def test_a_first_push_never_takes_files_of_its_names_for_its_own(remote, local_root):
    """``fresh``: another run's copy whose manifest is not there yet (its metadata push waits) is refused.

    The same folder for a job that ran before is an earlier attempt of its own, resumed.
    """
    eq = remote.equipment(local_root)
    ours = {"frame_001.tif": b"our frame", "sub/stack.raw": b"our stack", "new.bin": b"only ours"}
    run = make_run(eq.local_root, ours, symlink=False)
    theirs = {"frame_001.tif": b"their frame", "sub/stack.raw": b"our stack"}  # one differs, one is equal
    put_on_disk(remote, theirs)

    refused = await _refused_untouched(remote, lambda: remote.transport(eq).push(run, bwlimit_kibps=None, fresh=True))
    assert "frame_001.tif" in refused.message and "sub/stack.raw" in refused.message

    result = await remote.transport(eq).push(run, bwlimit_kibps=None)  # a later attempt: its own, resumed
    assert result.ok
    assert {rel: data for rel, data in tree(remote.run_on_disk).items() if rel in ours} == ours


async def test_a_first_push_into_its_own_verified_copy_goes_on(remote, local_root):
    """``fresh`` with the run's own manifest on the NAS (a queue lost): the folder is the run's."""
    eq = remote.equipment(local_root)
    files = {"frame_001.tif": b"frame", "sub/stack.raw": b"stack"}
    manifest = {".exlab-wizard/checksums.sha256": _manifest_of(files)}
    run = make_run(eq.local_root, {**files, **manifest}, symlink=False)
    put_on_disk(remote, {"frame_001.tif": b"half", **manifest})
    result = await remote.transport(eq).push(run, bwlimit_kibps=None, fresh=True)
    assert result.ok
    assert tree(remote.run_on_disk) == {**files, **manifest}


OWNER, OTHER_JOB = "a" * 32, "b" * 32


async def test_a_push_naming_its_job_claims_the_folder(remote, local_root):
    """``owner``: the push leaves ``.exlab-wizard/claims/<owner>`` in the remote run folder (made by it)."""
    eq = remote.equipment(local_root)
    files = {"frame_001.tif": b"frame", "sub/stack.raw": b"stack"}
    run = make_run(eq.local_root, files, symlink=False)
    result = await remote.transport(eq).push(run, bwlimit_kibps=None, fresh=True, owner=OWNER)
    assert result.ok
    on_disk = tree(remote.run_on_disk)
    assert f".exlab-wizard/claims/{OWNER}" in on_disk
    assert {rel: on_disk[rel] for rel in files} == files
    # the reaper's last listing sees claims (another run's refuses the deletion)
    assert f".exlab-wizard/claims/{OWNER}" in await remote.transport(eq).remote_listing(run)

    again = await remote.transport(eq).push(run, bwlimit_kibps=None, fresh=True, owner=OWNER)  # its own folder
    assert again.ok and again.files_sent == 0


async def test_a_folder_another_job_claimed_is_remote_conflict_and_untouched(remote, local_root):
    """Another job's claim, no verified manifest: that job's folder, even with none of its files there yet."""
    eq = remote.equipment(local_root)
    run = make_run(eq.local_root, {"frame_001.tif": b"ours", "new.bin": b"only ours"}, symlink=False)
    put_on_disk(remote, {f".exlab-wizard/claims/{OTHER_JOB}": b"FACS_02 /data/Run_1\n"})
    for fresh in (True, False):
        refused = await _refused_untouched(
            remote, lambda fresh=fresh: remote.transport(eq).push(run, bwlimit_kibps=None, fresh=fresh, owner=OWNER)
        )
        assert "claimed by another job" in refused.message and OTHER_JOB in refused.message


async def test_its_own_claim_makes_the_files_there_its_own(remote, local_root):
    """A push cut off after its claim: the job's next push resumes over its own files, ``fresh`` or not."""
    eq = remote.equipment(local_root)
    files = {"frame_001.tif": b"frame, whole", "sub/stack.raw": b"stack"}
    run = make_run(eq.local_root, files, symlink=False)
    put_on_disk(remote, {f".exlab-wizard/claims/{OWNER}": b"x\n", "frame_001.tif": b"fra"})
    result = await remote.transport(eq).push(run, bwlimit_kibps=None, fresh=True, owner=OWNER)
    assert result.ok
    assert {rel: data for rel, data in tree(remote.run_on_disk).items() if rel in files} == files


async def test_a_verified_copy_of_this_run_is_no_conflict(remote, local_root):
    """The run's own verified copy: the local run carries the same manifest (moved to a new disk, queue lost)."""
    eq = remote.equipment(local_root)
    files = {"frame_001.tif": b"frame", "sub/stack.raw": b"stack"}
    manifest = {".exlab-wizard/checksums.sha256": _manifest_of(files)}
    run = make_run(eq.local_root, {**files, **manifest}, symlink=False)
    put_on_disk(remote, {"frame_001.tif": b"half", **manifest})  # an earlier push of it, cut short
    result = await remote.transport(eq).push(run, bwlimit_kibps=None)
    assert result.ok
    assert tree(remote.run_on_disk) == {**files, **manifest}


async def test_an_older_manifest_of_this_run_is_no_conflict_and_anothers_still_is(remote, local_root):
    """A run verified before sends its edits over its own copy, whose manifest there is an older one of its own."""
    eq = remote.equipment(local_root)
    files = {"frame_001.tif": b"frame, edited", "sub/stack.raw": b"stack"}
    run = make_run(eq.local_root, {**files, ".exlab-wizard/checksums.sha256": _manifest_of(files)}, symlink=False)
    older = {"frame_001.tif": b"frame", "sub/stack.raw": b"stack"}
    put_on_disk(remote, {**older, ".exlab-wizard/checksums.sha256": _manifest_of(older)})
    older_digest = hashlib.sha256(_manifest_of(older)).hexdigest()

    # Not one of the manifests named as this run's:
    await _refused_untouched(
        remote, lambda: remote.transport(eq).push(run, bwlimit_kibps=None, own_manifests=["0" * 64])
    )

    result = await remote.transport(eq).push(
        run, bwlimit_kibps=None, rewrite=frozenset({"frame_001.tif"}), own_manifests=[older_digest[:12]]
    )
    assert result.ok
    assert tree(remote.run_on_disk)["frame_001.tif"] == b"frame, edited"


async def test_a_push_given_a_stamp_keeps_every_file_it_replaces(remote, local_root):
    """A run verified before: what the push itself finds changed and writes over is first kept under previous/."""
    eq = remote.equipment(local_root)
    old = {"a.bin": b"verified a", "sub/b.bin": b"verified b", "same.bin": b"unchanged"}
    run = make_run(eq.local_root, old, symlink=False)
    transport = remote.transport(eq)
    await transport.push(run, bwlimit_kibps=None)
    new = {"a.bin": b"edited a, longer now", "sub/b.bin": b"VERIFIED B"}  # b: same size, other bytes
    for rel, data in new.items():
        (run / rel).write_bytes(data)
        os.utime(run / rel, (1_900_000_000, 1_900_000_000))
    stamp = "20261206T010203Z"

    result = await transport.push(run, bwlimit_kibps=None, own_manifests=["0" * 64], previous_stamp=stamp)
    assert result.ok
    on_disk = tree(remote.run_on_disk)
    assert {rel: on_disk[rel] for rel in old} == {**old, **new}
    kept = {rel: data for rel, data in on_disk.items() if rel.startswith(".exlab-wizard/previous/")}
    assert kept == {f".exlab-wizard/previous/{stamp}/{rel}": old[rel] for rel in new}


async def test_a_push_given_a_stamp_keeps_every_file_it_rewrites_under_its_own_path(remote, local_root):
    """Files sent again whatever their stat (a hash mismatch, accept-local): each kept at its own path.

    rclone sends them one by one with ``copyto``, which takes no filter and keeps a replaced file
    under the backup folder by its name alone: two files of one name in two folders would share it.
    """
    eq = remote.equipment(local_root)
    old = {"a/x.bin": b"verified a", "b/x.bin": b"verified b", "top.bin": b"verified top"}
    run = make_run(eq.local_root, old, symlink=False)
    transport = remote.transport(eq)
    await transport.push(run, bwlimit_kibps=None)
    new = {rel: data.upper() for rel, data in old.items()}  # same sizes, stats put back
    for rel, data in new.items():
        st = os.stat(run / rel)
        (run / rel).write_bytes(data)
        os.utime(run / rel, ns=(st.st_atime_ns, st.st_mtime_ns))
    stamp = "20261206T010203Z"

    result = await transport.push(
        run, bwlimit_kibps=None, rewrite=frozenset(new), own_manifests=["0" * 64], previous_stamp=stamp
    )
    assert result.ok
    on_disk = tree(remote.run_on_disk)
    assert {rel: on_disk[rel] for rel in old} == new
    kept = {rel: data for rel, data in on_disk.items() if rel.startswith(".exlab-wizard/previous/")}
    assert kept == {f".exlab-wizard/previous/{stamp}/{rel}": old[rel] for rel in old}


async def test_own_leftovers_are_no_conflict_and_are_removed(remote, local_root):
    eq = remote.equipment(local_root)
    files = {"a.bin": os.urandom(2000), "new\nline": b"n", "sub dir/b.txt": b"b", "L" * 150: b"long name"}
    run = make_run(eq.local_root, files, symlink=False)
    put_on_disk(
        remote,
        {
            remote.leftover("a.bin"): b"half",
            remote.leftover("new\nline"): b"h",
            "sub dir/" + remote.leftover("b.txt"): b"",
        },
    )
    result = await remote.transport(eq).push(run, bwlimit_kibps=None)
    assert result.ok
    assert tree(remote.run_on_disk) == files


async def test_reachable_and_an_unreachable_remote_is_never_empty(remote, local_root):
    eq = remote.equipment(local_root)
    run = make_run(eq.local_root, {"a.txt": b"a"}, symlink=False)
    assert await remote.transport(eq).reachable(run)

    dead = remote.transport(remote.down(local_root))
    # all at once: some clients wait out their own retries before giving up
    reachable, manifest, push, listing = await asyncio.gather(
        dead.reachable(run),
        dead.remote_manifest(run),
        dead.push(run, bwlimit_kibps=None),
        dead.remote_listing(run),
        return_exceptions=True,
    )
    assert reachable is False
    for outcome in (manifest, push, listing):
        assert isinstance(outcome, TransportError), outcome
        assert outcome.kind == K.NETWORK, outcome.message
    assert not remote.run_on_disk.exists()


async def test_a_remote_that_stays_down_is_logged_once_however_often_it_is_probed(remote, local_root):
    # The reaper and the audit probe each waiting job on every pass, the service's metrics every
    # 30 s: a weekend outage must not grow the equipment log (on the instrument's disk) per probe.
    eq = remote.down(local_root)
    run = make_run(eq.local_root, {"a.txt": b"a"}, symlink=False)
    transport = remote.transport(eq)
    for _ in range(3):
        assert await transport.reachable(run) is False
    log = log_path_for(eq)
    lines = log.read_text().splitlines() if log.exists() else []
    assert len(lines) <= 1, lines


async def test_mount_path_missing_is_unreachable_too(local_root, tmp_path):
    gone = {"type": "mount", "mount_path": str(tmp_path / "gone")}
    eq = EquipmentConfig.model_validate({"id": EQUIPMENT, "local_root": str(local_root), "transport": gone})
    run = make_run(eq.local_root, {"a.txt": b"a"}, symlink=False)
    transport = make_transport(eq)
    assert not await transport.reachable(run)
    with pytest.raises(TransportError) as caught:
        await transport.remote_manifest(run)
    assert caught.value.kind == K.NETWORK
    assert not (tmp_path / "gone").exists()


async def test_manifest_of_a_run_folder_not_there_yet_is_empty(remote, local_root):
    eq = remote.equipment(local_root)
    run = make_run(eq.local_root, {"a.txt": b"a"}, symlink=False)
    manifest = await remote.transport(eq).remote_manifest(run)
    assert manifest.hashes == {} and manifest.unverifiable == {}


async def test_rewrite_resends_a_file_damaged_with_size_and_mtime_kept(remote, local_root):
    eq = remote.equipment(local_root)
    files = {
        "a.bin": os.urandom(5000),
        "new\nname.bin": os.urandom(100),
        "#hash first.bin": b"#" * 300,
        "sub/kept.txt": b"kept",
    }
    run = make_run(eq.local_root, files, symlink=False)
    transport = remote.transport(eq)
    await transport.push(run, bwlimit_kibps=None)
    for name in ("a.bin", "new\nname.bin", "#hash first.bin"):
        damaged = remote.run_on_disk / name
        info = damaged.stat()
        damaged.write_bytes(b"\0" * info.st_size)
        os.utime(damaged, ns=(info.st_atime_ns, info.st_mtime_ns))
    remote.settle()
    kept = file_ids(remote.run_on_disk)["sub/kept.txt"]

    result = await transport.push(
        run, bwlimit_kibps=None, rewrite=frozenset({"a.bin", "new\nname.bin", "#hash first.bin"})
    )
    assert result.ok and result.files_sent == 3
    assert tree(remote.run_on_disk) == files
    assert file_ids(remote.run_on_disk)["sub/kept.txt"] == kept
    assert data_only((await transport.remote_manifest(run)).hashes) == sha256(files)


async def test_manifest_shows_what_the_remote_holds_after_damage(remote, local_root):
    """Corrupt a byte (size and mtime kept), truncate one, delete one, add one: the manifest sees each."""
    eq = remote.equipment(local_root)
    files = {
        "corrupt.bin": os.urandom(4096),
        "truncate.bin": os.urandom(3000),
        "delete.txt": b"d",
        "new\nline.txt": b"kept",
        "sub/kept.bin": os.urandom(100),
    }
    run = make_run(eq.local_root, files, symlink=False)
    transport = remote.transport(eq)
    await transport.push(run, bwlimit_kibps=None)
    assert data_only((await transport.remote_manifest(run)).hashes) == sha256(files)  # read once: warm caches

    corrupt = remote.run_on_disk / "corrupt.bin"
    info = corrupt.stat()
    with open(corrupt, "r+b") as handle:
        handle.seek(2000)
        handle.write(bytes([files["corrupt.bin"][2000] ^ 0x01]))
    os.utime(corrupt, ns=(info.st_atime_ns, info.st_mtime_ns))
    os.truncate(remote.run_on_disk / "truncate.bin", 1000)
    (remote.run_on_disk / "delete.txt").unlink()
    put_on_disk(remote, {"sub/added.txt": b"added"})

    seen = data_only((await transport.remote_manifest(run)).hashes)
    expected = sha256(files)
    expected.pop("delete.txt")
    expected["corrupt.bin"] = hashlib.sha256(corrupt.read_bytes()).hexdigest()
    expected["truncate.bin"] = hashlib.sha256(files["truncate.bin"][:1000]).hexdigest()
    expected["sub/added.txt"] = hashlib.sha256(b"added").hexdigest()
    assert seen == expected


async def test_cleaned_files_are_ours_and_left_alone(remote, local_root):
    """After cleanup deleted verified local data, the final metadata push leaves the NAS copies be."""
    eq = remote.equipment(local_root)
    files = {
        "a.txt": b"ours",
        "new\nline.txt": b"nl",
        "sub/data.raw": b"our data",
        ".exlab-wizard/creation.json": b'{"v": 1}',
    }
    run = make_run(eq.local_root, files, symlink=False)
    transport = remote.transport(eq)
    await transport.push(run, bwlimit_kibps=None)
    data = frozenset(name for name in files if not name.startswith(".exlab-wizard/"))
    for name in data:
        (run / name).unlink()
    (run / "sub").rmdir()
    (run / ".exlab-wizard" / "creation.json").write_bytes(b'{"v": 2, "local_cleaned": true}')
    before = snapshot(remote.run_on_disk)

    with pytest.raises(TransportError) as caught:  # not told: they look like someone else's
        await transport.push(run, bwlimit_kibps=None)
    assert caught.value.kind == K.REMOTE_CONFLICT
    put_on_disk(remote, {"not ours.txt": b"theirs"})
    with pytest.raises(TransportError) as caught:  # "cleaned" covers our files, nothing else
        await transport.push(run, bwlimit_kibps=None, cleaned=data)
    assert caught.value.kind == K.REMOTE_CONFLICT
    (remote.run_on_disk / "not ours.txt").unlink()
    remote.settle()
    assert snapshot(remote.run_on_disk) == before

    assert (await transport.push(run, bwlimit_kibps=None, cleaned=data)).ok  # told: sent, data left be
    remote.settle()
    after = snapshot(remote.run_on_disk)
    assert after[".exlab-wizard/creation.json"][0] == b'{"v": 2, "local_cleaned": true}'
    assert {name: after[name] for name in data} == {name: before[name] for name in data}

    assert (await transport.push(run, bwlimit_kibps=None, cleaned=data)).ok
    after = snapshot(remote.run_on_disk)
    assert after[".exlab-wizard/creation.json"][0] == b'{"v": 2, "local_cleaned": true}'
    assert {name: after[name] for name in data} == {name: before[name] for name in data}


async def test_push_metadata_sends_only_the_metadata_folder(remote, local_root):
    """After a verified push, push_metadata refreshes ``.exlab-wizard/`` and leaves the data alone."""
    eq = remote.equipment(local_root)
    files = {
        "a.bin": os.urandom(3000),
        "new\nline.txt": b"nl",
        "sub/b.txt": b"b",
        ".exlab-wizard/creation.json": b'{"v": 1}',
        ".exlab-wizard/checksums.sha256": b"0" * 64 + b"  a.bin\n",
    }
    run = make_run(eq.local_root, files, symlink=False)
    transport = remote.transport(eq)
    await transport.push(run, bwlimit_kibps=None)
    before = snapshot(remote.run_on_disk)

    (run / "a.bin").write_bytes(b"changed locally, a whole push would send it")
    (run / "sub" / "new.txt").write_bytes(b"a new data file, not sent either")
    (run / ".exlab-wizard" / "creation.json").write_bytes(b'{"v": 2, "sync_status": "synced"}')
    manifest = run / ".exlab-wizard" / "checksums.sha256"
    info = manifest.stat()  # rewritten with its size and mtime kept: sent all the same
    manifest.write_bytes(b"1" * 64 + b"  a.bin\n")
    os.utime(manifest, ns=(info.st_atime_ns, info.st_mtime_ns))
    (run / ".exlab-wizard" / "sync.log").write_bytes(b"a new metadata file\n")
    (run / ".exlab-wizard" / "link-outside").symlink_to("/etc/passwd")  # never followed nor copied

    result = await remote.transport(eq).push_metadata(run, bwlimit_kibps=None)  # a fresh transport
    assert result.ok
    remote.settle()
    after = snapshot(remote.run_on_disk)
    data = [name for name in files if not name.startswith(".exlab-wizard/")]
    assert {name: after[name] for name in data} == {name: before[name] for name in data}
    assert "sub/new.txt" not in after
    assert {name: data for name, (data, _ids) in after.items() if name.startswith(".exlab-wizard/")} == {
        ".exlab-wizard/creation.json": b'{"v": 2, "sync_status": "synced"}',
        ".exlab-wizard/checksums.sha256": b"1" * 64 + b"  a.bin\n",
        ".exlab-wizard/sync.log": b"a new metadata file\n",
    }  # and no temporary or partial file left
    assert (await transport.push_metadata(run, bwlimit_kibps=None)).ok  # idempotent
    remote.settle()
    assert tree(remote.run_on_disk) == {name: data for name, (data, _ids) in after.items()}


async def test_push_metadata_to_an_unreachable_remote_is_network_and_writes_nothing(remote, local_root):
    eq = remote.equipment(local_root)
    run = make_run(eq.local_root, {"a.txt": b"a", ".exlab-wizard/creation.json": b"{}"}, symlink=False)
    with pytest.raises(TransportError) as caught:
        await remote.transport(remote.down(local_root)).push_metadata(run, bwlimit_kibps=None)
    assert caught.value.kind == K.NETWORK, caught.value.message
    assert not remote.run_on_disk.exists()
    if remote.name.startswith("mount"):  # the bare folder of an unmounted share stays bare
        assert list((local_root.parent / "unmounted").iterdir()) == []


# ------------------------------------------------------------------ remote listing


async def test_remote_listing_gives_every_file_with_its_size(remote, local_root):
    eq = remote.equipment(local_root)
    run = make_run(eq.local_root)  # hostile names, nested and empty files; symlinks are not sent
    transport = remote.transport(eq)
    await transport.push(run, bwlimit_kibps=None)
    expected = {name: len(data) for name, data in HOSTILE.items()}
    assert await transport.remote_listing(run) == expected

    (remote.run_on_disk / "with space.dat").unlink()
    os.truncate(remote.run_on_disk / "sub dir/nested $(x)/deep file.bin", 1000)
    added = {"new\nadded.txt": b"added", "#first.txt": b"#", "sub dir/nested $(x)/more.bin": b"m" * 77}
    if remote.byte_names:
        added[os.fsdecode(b"caf\xe9 \xff.raw")] = b"not utf-8"
    put_on_disk(remote, added)
    if remote.name != "rclone_s3":  # an object store holds no symlinks
        (remote.run_on_disk / "link-on-nas").symlink_to("plain.txt")
        (remote.run_on_disk / "sub dir" / "folder-link").symlink_to("nested $(x)")
    remote.settle()
    expected.pop("with space.dat")
    expected["sub dir/nested $(x)/deep file.bin"] = 1000
    expected |= {name: len(data) for name, data in added.items()}
    assert await remote.transport(eq).remote_listing(run) == expected  # a fresh transport: nothing cached


async def test_remote_stats_gives_every_file_with_its_size_and_the_mtime_it_was_sent_with(
    remote, local_root, monkeypatch
):
    """The local check of a run whose queue was lost takes a NAS copy's size and mtime for the verified stat.

    In a time zone far from UTC: rsync lists times in its own local time, rclone with their offset.
    """
    monkeypatch.setenv("TZ", "Pacific/Chatham")
    eq = remote.equipment(local_root)
    run = make_run(eq.local_root)
    old = 1_700_000_000_123_456_789  # sent with an mtime long past, to the nanosecond
    os.utime(run / "plain.txt", ns=(old, old))
    transport = remote.transport(eq)
    await transport.push(run, bwlimit_kibps=None)
    stats = await remote.transport(eq).remote_stats(run)
    assert {rel: info.size for rel, info in stats.items()} == await transport.remote_listing(run)
    for rel, info in stats.items():
        local = os.lstat(run / rel).st_mtime_ns
        assert same_mtime(local, info.mtime_ns), (rel, local, info.mtime_ns)
    assert stats["plain.txt"].mtime_ns // 1_000_000_000 == old // 1_000_000_000

    other = make_run(eq.local_root, {"a": b"a"}, RUN_REL.parent / "Other", symlink=False)
    assert await remote.transport(eq).remote_stats(other) == {}  # a run folder not there yet
    with pytest.raises(TransportError) as caught:
        await remote.transport(remote.root_gone(local_root)).remote_stats(run)
    assert caught.value.kind == K.NETWORK, caught.value.message


async def test_remote_listing_of_a_run_folder_not_there_yet_is_empty_and_a_gone_root_is_network(remote, local_root):
    eq = remote.equipment(local_root)
    run = make_run(eq.local_root, {"a.txt": b"a"}, symlink=False)
    assert await remote.transport(eq).remote_listing(run) == {}

    assert remote.root_gone is not None
    with pytest.raises(TransportError) as caught:
        await remote.transport(remote.root_gone(local_root)).remote_listing(run)
    assert caught.value.kind == K.NETWORK, caught.value.message


@pytest.mark.parametrize("write", ["push", "push_metadata", "keep_previous"])
async def test_a_write_to_a_gone_remote_root_is_network_and_creates_nothing(remote, local_root, write):
    """A root that is gone is a NAS volume not mounted: never created again, on its system disk, by a write."""
    eq = remote.root_gone(local_root)
    run = make_run(
        eq.local_root, {"a.txt": b"a", "sub/b.txt": b"b", ".exlab-wizard/creation.json": b"{}"}, symlink=False
    )
    transport = remote.transport(eq)
    writes = {
        "push": lambda: transport.push(run, bwlimit_kibps=None),
        "push_metadata": lambda: transport.push_metadata(run, bwlimit_kibps=None),
        "keep_previous": lambda: transport.keep_previous(run, ["a.txt"], STAMP),
    }
    assert remote.gone_on_disk is not None and remote.gone_on_disk.parent.is_dir()
    with pytest.raises(TransportError) as caught:
        await writes[write]()
    assert caught.value.kind == K.NETWORK, caught.value.message
    remote.settle()
    assert not remote.gone_on_disk.exists()
    assert not await transport.reachable(run)


async def test_the_manifest_of_a_run_under_a_gone_remote_root_is_network_never_empty(remote, local_root):
    eq = remote.root_gone(local_root)
    run = make_run(eq.local_root, {"a.txt": b"a"}, symlink=False)
    with pytest.raises(TransportError) as caught:
        await remote.transport(eq).remote_manifest(run)
    assert caught.value.kind == K.NETWORK, caught.value.message


# ------------------------------------------------------------------ fetch and keep_previous (local damage recovery)

RECOVERY_FILES = {
    "a.bin": os.urandom(5000),
    "new\nline.bin": b"nl" * 100,
    "#hash first.bin": b"#" * 300,
    "sub dir/$(touch PWNED).bin": os.urandom(700),
    "-dash.txt": b"dash",
    "kept.txt": b"kept",
}
STAMP = "20261205T073000Z"


async def test_fetch_reads_named_files_back_as_the_remote_holds_them(remote, local_root, tmp_path):
    eq = remote.equipment(local_root)
    run = make_run(eq.local_root, RECOVERY_FILES, symlink=False)
    transport = remote.transport(eq)
    await transport.push(run, bwlimit_kibps=None)
    rotten = remote.run_on_disk / "a.bin"  # what the server stores now, size and mtime kept
    info = rotten.stat()
    rotten.write_bytes(b"\0" * info.st_size)
    os.utime(rotten, ns=(info.st_atime_ns, info.st_mtime_ns))
    remote.settle()
    wanted = ["a.bin", "new\nline.bin", "#hash first.bin", "sub dir/$(touch PWNED).bin", "-dash.txt", "absent.bin"]
    into = tmp_path / "scratch"
    into.mkdir()

    fetched = await remote.transport(eq).fetch(run, wanted, into)
    assert sorted(fetched) == sorted(wanted[:-1])  # absent on the remote: left out
    for rel, path in fetched.items():
        expected = b"\0" * 5000 if rel == "a.bin" else RECOVERY_FILES[rel]
        assert path == into / rel and path.read_bytes() == expected, rel
    assert not (local_root.parent / "PWNED").exists() and not Path("PWNED").exists()
    with pytest.raises(ValueError):
        await transport.fetch(run, ["../escape.bin"], into)

    dead = remote.transport(remote.down(local_root))
    with pytest.raises(TransportError) as caught:
        await dead.fetch(run, ["kept.txt"], tmp_path)
    assert caught.value.kind == K.NETWORK, caught.value.message


async def test_fetch_into_a_full_local_disk_is_this_pcs_error_never_the_nas_refusing(remote, local_root, tmp_path):
    """A restore's scratch folder on a full disk: the error is this PC's (an OSError, or a TransportError of
    another kind than remote_write_refused, which would fail a job at once and send its admin to the NAS)."""
    eq = remote.equipment(local_root)
    run = make_run(eq.local_root, {"big.bin": os.urandom(400_000)}, symlink=False)
    await remote.transport(eq).push(run, bwlimit_kibps=None)
    remote.settle()
    into = tmp_path / "full"
    into.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(into)], check=True)
    try:
        with pytest.raises((OSError, TransportError)) as caught:
            await remote.transport(eq).fetch(run, ["big.bin"], into)
    finally:
        subprocess.run(["umount", "-l", str(into)], check=True)
    if isinstance(caught.value, TransportError):
        assert caught.value.kind != K.REMOTE_WRITE_REFUSED, caught.value.message
        assert "this PC could not write" in caught.value.message, caught.value.message
    else:
        assert caught.value.errno == errno.ENOSPC, caught.value


async def test_fetch_from_a_run_folder_not_there_is_empty(remote, local_root, tmp_path):
    eq = remote.equipment(local_root)
    run = make_run(eq.local_root, {"a.txt": b"a"}, symlink=False)
    assert await remote.transport(eq).fetch(run, ["a.txt"], tmp_path) == {}


@pytest.mark.parametrize(("name", "sibling"), [("Run_[1]", "Run_1"), ("Run_*", "Run_x"), ("Run_?", "Run_x")])
async def test_a_run_folder_named_like_a_pattern_is_only_ever_itself(remote, local_root, tmp_path, name, sibling):
    """Listed, fetched, checked and written as itself, never as a sibling its name matches as a pattern.

    rsync's remote side expands wildcards in a remote path: ``Run_[1]`` was listed and checked as
    ``Run_1`` (the reaper's last look saw the sibling's files, the push was refused for them).
    """
    eq = remote.equipment(local_root)
    files = {"a.tif": os.urandom(3000), "sub/b.txt": b"this run's\n"}
    twin = {rel: bytes(255 - b for b in data) for rel, data in files.items()}  # same names and sizes
    run = make_run(eq.local_root, files, rel=RUN_REL.with_name(name), symlink=False)
    on_disk = remote.run_on_disk.with_name(name)
    other = remote.run_on_disk.with_name(sibling)
    for rel, data in twin.items():  # another run's copy, as put_on_disk writes one
        (other / rel).parent.mkdir(parents=True, exist_ok=True)
        (other / rel).write_bytes(data)
    put_on_disk(remote, {})
    transport = remote.transport(eq)

    assert await transport.remote_listing(run) == {}
    assert await transport.fetch(run, list(files), tmp_path) == {}
    await transport.push(run, bwlimit_kibps=None, fresh=True)  # no conflict with the sibling's files
    remote.settle()
    assert tree(on_disk) == files and tree(other) == twin
    assert await transport.remote_listing(run) == {rel: len(data) for rel, data in files.items()}
    fetched = await transport.fetch(run, list(files), tmp_path)
    assert {rel: path.read_bytes() for rel, path in fetched.items()} == files
    assert data_only((await transport.remote_manifest(run)).hashes) == sha256(files)

    shutil.rmtree(on_disk)  # its NAS copy lost: the last look before a deletion sees that
    remote.settle()
    assert await remote.transport(eq).remote_listing(run) == {}


async def test_keep_previous_moves_on_the_server_and_never_overwrites(remote, local_root):
    eq = remote.equipment(local_root)
    run = make_run(eq.local_root, RECOVERY_FILES, symlink=False)
    transport = remote.transport(eq)
    await transport.push(run, bwlimit_kibps=None)
    moved = ["a.bin", "new\nline.bin", "sub dir/$(touch PWNED).bin", "#hash first.bin"]
    before = snapshot(remote.run_on_disk)

    kept = await transport.keep_previous(run, [*moved, "absent.bin"], STAMP)
    assert kept == sorted(moved, key=os.fsencode)
    remote.settle()
    after = snapshot(remote.run_on_disk)
    for rel in moved:
        assert rel not in after
        data, (ino, size, mtime) = after[f".exlab-wizard/previous/{STAMP}/{rel}"]
        assert data == RECOVERY_FILES[rel] and (size, mtime) == before[rel][1][1:]
        if remote.name != "rclone_s3":  # a rename on the server, nothing sent again (S3 copies server-side)
            assert ino == before[rel][1][0]
    assert after["kept.txt"] == before["kept.txt"] and after["-dash.txt"] == before["-dash.txt"]
    assert not (local_root.parent / "PWNED").exists() and not Path("PWNED").exists()

    assert await remote.transport(eq).keep_previous(run, moved, STAMP) == kept  # idempotent
    remote.settle()
    assert snapshot(remote.run_on_disk) == after

    # The local bytes are the new truth: the push sends them; the kept files are no conflict.
    (run / "a.bin").write_bytes(b"accepted local bytes")
    result = await transport.push(run, bwlimit_kibps=None)
    assert result.ok
    remote.settle()
    assert (remote.run_on_disk / "a.bin").read_bytes() == b"accepted local bytes"
    # Called again now: the kept verified copy is not overwritten, the new file stays.
    assert await transport.keep_previous(run, ["a.bin"], STAMP) == ["a.bin"]
    remote.settle()
    assert (remote.run_on_disk / "a.bin").read_bytes() == b"accepted local bytes"
    assert (remote.run_on_disk / f".exlab-wizard/previous/{STAMP}/a.bin").read_bytes() == RECOVERY_FILES["a.bin"]
    manifest = await transport.remote_manifest(run)
    assert data_only(manifest.hashes) == data_only(sha256(tree(run)))  # previous/ is not data

    with pytest.raises(ValueError):
        await transport.keep_previous(run, ["a.bin"], "yesterday")
    with pytest.raises(ValueError):
        await transport.keep_previous(run, ["../a.bin"], STAMP)
    dead = remote.transport(remote.down(local_root))
    with pytest.raises(TransportError) as caught:
        await dead.keep_previous(run, ["kept.txt"], STAMP)
    assert caught.value.kind == K.NETWORK, caught.value.message


async def test_a_new_stamp_the_nas_holds_already_is_refused_and_nothing_moves(remote, local_root):
    """``previous/<stamp>/`` already on the NAS (an earlier round's: a clock set back, a lost queue).

    A keep that starts the round there (``new``), and a push keeping under it, refuse it before
    anything is moved or written: the earlier round's kept copy is never replaced, and the NAS
    file the push would replace is never written over unkept. Without ``new`` (a keep cut off
    and resumed), the folder is the round's own, as before.
    """
    eq = remote.equipment(local_root)
    run = make_run(eq.local_root, RECOVERY_FILES, symlink=False)
    transport = remote.transport(eq)
    await transport.push(run, bwlimit_kibps=None)
    put_on_disk(remote, {f".exlab-wizard/previous/{STAMP}/a.bin": b"an earlier round's verified copy"})
    before = snapshot(remote.run_on_disk)

    with pytest.raises(PreviousStampTaken) as caught:
        await transport.keep_previous(run, ["a.bin", "kept.txt"], STAMP, new=True)
    assert caught.value.stamp == STAMP and caught.value.kind == K.UNKNOWN, caught.value.message
    remote.settle()
    assert snapshot(remote.run_on_disk) == before

    (run / "a.bin").write_bytes(b"an edit, sent over the verified copy")
    with pytest.raises(PreviousStampTaken):
        await transport.push(run, bwlimit_kibps=None, own_manifests=(), previous_stamp=STAMP)
    remote.settle()
    assert snapshot(remote.run_on_disk) == before

    # A later stamp is the round's own: the NAS copy is kept there, the earlier one stays.
    later = "20261205T073001Z"
    assert await transport.keep_previous(run, ["kept.txt"], later, new=True) == ["kept.txt"]
    assert await transport.keep_previous(run, ["kept.txt"], later) == ["kept.txt"]  # resumed: its own
    remote.settle()
    on_disk = tree(remote.run_on_disk)
    assert on_disk[f".exlab-wizard/previous/{STAMP}/a.bin"] == b"an earlier round's verified copy"
    assert on_disk[f".exlab-wizard/previous/{later}/kept.txt"] == RECOVERY_FILES["kept.txt"]


# ------------------------------------------------------------------ symlinks on the NAS
# A symlink on the NAS is never a verified file of the run, and never hides a conflict.
# On every transport that can hold symlinks (mount, rsync_ssh, rclone over
# sftp): a verified file of the run replaced on the NAS by a symlink to another
# run's file with the same bytes must not count as verified (the manifest does
# not report it hashed), and a push must neither write through the symlink into
# the other run's file nor pass it off as the run's own file.

LINKING = ["mount", "rsync_ssh", "rclone_sftp"]
SYMLINK_FILES = {"a.raw": b"verified bytes " * 100, "sub/b.txt": b"b"}


@pytest.fixture(params=LINKING)
def linking_remote(request, tmp_path):
    return _FACTORIES[request.param](request, tmp_path)


def _link_to_other_run(remote, rel: str, data: bytes):
    """``rel`` on the NAS becomes a symlink to another run's file holding ``data``."""
    other = remote.run_on_disk.parent / "Other_Run" / "theirs.raw"
    other.parent.mkdir(parents=True, exist_ok=True)
    other.write_bytes(data)
    target = remote.run_on_disk / rel
    target.unlink()
    target.symlink_to(other)
    if remote.login is not None:
        shutil.chown(other.parent, remote.login, remote.login)
        shutil.chown(other, remote.login, remote.login)
        os.lchown(target, pwd.getpwnam(remote.login).pw_uid, pwd.getpwnam(remote.login).pw_gid)
    remote.settle()
    return other


async def _push_refused_or_symlink_replaced(remote, eq, run, rewrite) -> None:
    """Either the push refuses the folder (REMOTE_CONFLICT) or the symlink is replaced by the run's own file."""
    try:
        await remote.transport(eq).push(run, bwlimit_kibps=None, rewrite=rewrite)
    except TransportError as exc:
        assert exc.kind == K.REMOTE_CONFLICT, exc.message
        assert os.path.islink(remote.run_on_disk / "a.raw")
        return
    on_nas = remote.run_on_disk / "a.raw"
    assert not os.path.islink(on_nas) and on_nas.read_bytes() == (run / "a.raw").read_bytes()


async def test_a_symlink_on_the_nas_is_not_a_verified_file(linking_remote, local_root):
    remote = linking_remote
    eq = remote.equipment(local_root)
    run = make_run(eq.local_root, SYMLINK_FILES, symlink=False)
    transport = remote.transport(eq)
    await transport.push(run, bwlimit_kibps=None)
    _link_to_other_run(remote, "a.raw", SYMLINK_FILES["a.raw"])

    manifest = await remote.transport(eq).remote_manifest(run)
    assert manifest.hashes.get("a.raw") != hashlib.sha256(SYMLINK_FILES["a.raw"]).hexdigest(), manifest
    assert "a.raw" not in (await remote.transport(eq).remote_listing(run))


async def test_a_push_never_writes_through_a_symlink_on_the_nas(linking_remote, local_root):
    remote = linking_remote
    eq = remote.equipment(local_root)
    run = make_run(eq.local_root, SYMLINK_FILES, symlink=False)
    await remote.transport(eq).push(run, bwlimit_kibps=None)
    other = _link_to_other_run(remote, "a.raw", b"their different bytes")  # another size too

    await _push_refused_or_symlink_replaced(remote, eq, run, frozenset())
    assert other.read_bytes() == b"their different bytes"


async def test_a_rewrite_never_writes_through_a_symlink_on_the_nas(linking_remote, local_root):
    remote = linking_remote
    eq = remote.equipment(local_root)
    run = make_run(eq.local_root, SYMLINK_FILES, symlink=False)
    await remote.transport(eq).push(run, bwlimit_kibps=None)
    other = _link_to_other_run(remote, "a.raw", SYMLINK_FILES["a.raw"])  # same bytes, so same size

    os.truncate(run / "a.raw", 10)  # the local copy differs: a rewrite would write it
    await _push_refused_or_symlink_replaced(remote, eq, run, frozenset({"a.raw"}))
    assert other.read_bytes() == SYMLINK_FILES["a.raw"]
