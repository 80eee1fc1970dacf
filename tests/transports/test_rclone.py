"""The rclone transport against real servers on 127.0.0.1.

Two backends: sftp on the test sshd (with and without SHA-256 on the server)
and an S3-compatible object store (``rclone serve s3``), which has no SHA-256
of objects, so its manifest is hashed by download.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from exlab_wizard.config.models import EquipmentConfig
from exlab_wizard.sync.transports import rclone as rclone_mod
from exlab_wizard.sync.transports._process import LocalTree, ToolResult
from exlab_wizard.sync.transports.base import TransportError, TransportErrorKind
from exlab_wizard.sync.transports.rclone import (
    RcloneTransport,
    _sort_extras,
    decode_name,
    encode_name,
    rclone_can_name,
)
from tests.fixtures.rclone_serve import S3Server
from tests.fixtures.sshd import RW_USER
from tests.helpers import assert_sha256sum_check, regular_tree, tree, wait_until
from tests.lab import EQ as EQUIPMENT
from tests.lab import HOSTILE, RUN_REL, act_once_in
from tests.lab import make_hostile_run as make_run

pytestmark = pytest.mark.network
K = TransportErrorKind


def hashes(files: dict[str, bytes]) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}


def rclone_equipment(
    tmp_path: Path, remote: str, remote_path: str, config: Path, bandwidth: dict | None = None
) -> EquipmentConfig:
    transport = {
        "type": "rclone",
        "rclone_remote": remote,
        "rclone_remote_path": remote_path,
        "rclone_config": str(config),
    }
    if bandwidth is not None:
        transport["bandwidth"] = bandwidth
    return EquipmentConfig.model_validate(
        {"id": EQUIPMENT, "local_root": str(tmp_path / "lab"), "transport": transport}
    )


@pytest.fixture
def s3_place(s3_server: S3Server, s3_rclone_config, tmp_path):
    """(equipment factory, folder on the server's disk where the run lands)."""
    prefix = f"t{uuid.uuid4().hex[:10]}"

    def make(**kwargs) -> EquipmentConfig:
        return rclone_equipment(tmp_path, "labs3", f"{s3_server.bucket}/{prefix}", s3_rclone_config(), **kwargs)

    return make, s3_server.data_dir / s3_server.bucket / prefix


def partials(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".partial")]


# ----------------------------------------------------------------- names


_Q = "\u201b"  # rclone's quote rune
#: every character of rclone's local encoding (Slash, Dot, NUL) and of its own notation (also control
#: characters and DEL), each stand-in, the quote rune, and look-alikes that are neither
_SPECIAL = [
    *(chr(code) for code in range(1, 0x20)),
    "\x7f",
    *(chr(code) for code in range(0x2400, 0x2422)),
    "\uff0f",
    "\uff0e",
    _Q,
    ".",
    "\\",
    "\uff3c",
    "\ufffd",
]
_NOTATION_NAMES = sorted(
    {f"a{ch}b" for ch in _SPECIAL}
    | {f"{ch}z" for ch in _SPECIAL}
    | {f"a{ch}" for ch in _SPECIAL}
    | {f"{_Q}{ch}" for ch in _SPECIAL}
    | {f"{_Q}{_Q}{ch}" for ch in _SPECIAL}
    | {
        "\uff0e",
        "\uff0e\uff0e",
        f"{_Q}\uff0e",
        f"{_Q}\uff0e{_Q}\uff0e",
        "\uff0e\uff0ex",
        f"{_Q}{_Q}z",
        "試料Ａ／Ｂ.csv",
    }
)


def test_rclone_name_notation_is_what_rclone_lists(tmp_path, rclone_bin):
    """encode_name is what ``rclone lsjson`` prints for real local files and folders; the ones it finds come back.

    Each name is a file (``f<i>/<name>``) and a folder (``d<i>/<name>/in``).
    ``rclone_can_name`` is exactly the set that ``rclone copy --files-from0``
    of the encoded names sends; the others rclone cannot find (it skips them).
    """
    src, dst = tmp_path / "src", tmp_path / "dst"
    dst.mkdir()
    for i, name in enumerate(_NOTATION_NAMES):
        (src / f"f{i}").mkdir(parents=True)
        (src / f"f{i}" / name).write_bytes(b"f")
        (src / f"d{i}" / name).mkdir(parents=True)
        (src / f"d{i}" / name / "in").write_bytes(b"d")
    # one level down only: rclone cannot list inside a folder it cannot find by its name
    argv = [rclone_bin, "--config", os.devnull, "lsjson", "-R", "--max-depth", "2", "--no-mimetype", str(src)]
    listed = json.loads(subprocess.run(argv, capture_output=True, check=True).stdout)
    printed = {tuple(item["Path"].split("/")) for item in listed if "/" in item["Path"]}
    expected = {(f"{kind}{i}", encode_name(name)) for i, name in enumerate(_NOTATION_NAMES) for kind in "fd"}
    assert printed == expected
    for name in _NOTATION_NAMES:
        assert "\n" not in encode_name(name) and "\0" not in encode_name(name)
        if rclone_can_name(name):
            assert decode_name(encode_name(name)) == name

    paths = [p for i, name in enumerate(_NOTATION_NAMES) for p in (f"f{i}/{name}", f"d{i}/{name}/in")]
    names = b"".join(encode_name(p).encode() + b"\0" for p in paths)
    argv = [rclone_bin, "--config", os.devnull, "--retries", "1", "copy", "--files-from0", "-", str(src), str(dst)]
    subprocess.run(argv, input=names, capture_output=True)  # fails for some of those it cannot find
    sent = {p for p in paths if (dst / p).is_file()}
    assert sent == {p for p in paths if rclone_can_name(p)}
    assert {"試料Ａ／Ｂ.csv", "a\uff0fb", "a\u2400b", f"{_Q}{_Q}z", f"{_Q}\uff0f"} <= set(
        filter(rclone_can_name, _NOTATION_NAMES)
    )
    assert not {f"a{_Q}", f"a{_Q}b", f"{_Q}z", f"{_Q}\u240a"} & set(filter(rclone_can_name, _NOTATION_NAMES))


# rclone 1.75 names its partial upload "<leaf>.<8 hex>.partial"; a leaf over
# 100 bytes is first cut, at a character boundary, so that the partial name is
# no longer than the leaf (names below were read from real interrupted uploads).
_L250, _E120 = "L" * 250, "é" * 120


@pytest.mark.parametrize(
    ("remote", "local", "ours"),
    [
        ("a.txt.0123abcd.partial", ["a.txt"], True),
        ("new\nline.89abcdef.partial", ["new\nline"], True),
        ("sub dir/b.txt.0123abcd.partial", ["sub dir/b.txt"], True),
        (_L250[:233] + ".8545fc6a.partial", [_L250], True),
        ("M" * 93 + ".5174fad9.partial", ["M" * 110], True),
        (_E120[:111] + ".8393aa2f.partial", [_E120], True),
        ("M" * 100 + ".2f20f919.partial", ["M" * 100], True),  # 100 bytes: not cut
        # not ours: nothing of the run by that name, in that folder, or not rclone's shape
        ("other.txt.0123abcd.partial", ["a.txt"], False),
        ("b.txt.0123abcd.partial", ["sub/b.txt"], False),
        ("sub/a.txt.0123abcd.partial", ["a.txt"], False),
        ("a.txt.0123ABCD.partial", ["a.txt"], False),
        ("a.txt.0123abc.partial", ["a.txt"], False),
        ("a.txt.0123abcd.partial.bak", ["a.txt"], False),
        ("a.txt.partial", ["a.txt"], False),
        ("M" * 50 + ".2f20f919.partial", ["M" * 60], False),  # a short name is never cut
        ("M" * 80 + ".2f20f919.partial", ["M" * 110], False),  # cut by more than the suffix
        ("N" * 93 + ".5174fad9.partial", ["M" * 110], False),
    ],
)
def test_own_partial_names(remote, local, ours):
    tree_ = LocalTree(files=dict.fromkeys(local, 1))
    junk, foreign, _claimed = _sort_extras(tree_, {remote: 1})
    assert (junk, foreign) == (([remote], []) if ours else ([], [remote]))


# ------------------------------------------------------------ end to end


@pytest.mark.parametrize("remote_sha256", [False, True], ids=["download_hashing", "server_hashing"])
async def test_sftp_hostile_names_end_to_end(tmp_path, sshd, remote_dir, rclone_sftp_config, remote_sha256):
    conf = rclone_sftp_config(sshd, remote_sha256=remote_sha256)
    eq = rclone_equipment(tmp_path, "labsftp", str(remote_dir), conf)
    run = make_run(eq.local_root)
    transport = RcloneTransport(eq)
    assert transport.capabilities.hashes_while_sending

    result = await transport.push(run, bwlimit_kibps=None)
    assert result.ok and result.files_sent == len(HOSTILE)
    assert result.local_hashes == {k: v for k, v in hashes(HOSTILE).items() if not k.startswith(".exlab-wizard/")}
    remote_run = remote_dir / RUN_REL
    assert tree(remote_run) == HOSTILE  # byte-identical names and contents, symlinks skipped
    assert not partials(remote_dir)
    assert_sha256sum_check(remote_run, run)

    manifest = await transport.remote_manifest(run)
    assert _remote_hashing_logged(eq) == str(remote_sha256).lower()
    expected = hashes(HOSTILE)
    assert {**manifest.hashes, **dict.fromkeys(manifest.unverifiable, "?")}.keys() == expected.keys()
    for path, digest in manifest.hashes.items():
        assert digest == expected[path], path
    assert manifest.unverifiable == {} and manifest.hashes == expected

    again = await transport.push(run, bwlimit_kibps=None)
    assert again.ok and again.files_sent == 0


def _log_text(eq: EquipmentConfig) -> str:
    return "".join(p.read_text() for p in (eq.equipment_root / ".exlab-wizard").glob("wizard.*.log"))


def _remote_hashing_logged(eq: EquipmentConfig) -> str:
    """What the transport last logged about the backend hashing SHA-256 itself."""
    found = re.findall(r" remote_hashing=(\S+)", _log_text(eq))
    return found[-1] if found else ""


@pytest.mark.parametrize("bulk_hashing_works", [True, False], ids=["bulk", "fallback"])
async def test_server_hashing_in_bulk_with_the_per_file_listing_as_fallback(
    tmp_path, sshd, remote_dir, rclone_sftp_config, monkeypatch, bulk_hashing_works
):
    files = {f"d{i % 5}/f{i:03d}.bin": os.urandom(100 + i) for i in range(60)} | {"sp ace  two.txt": b"x"}
    eq = rclone_equipment(tmp_path, "labsftp", str(remote_dir), rclone_sftp_config(sshd, remote_sha256=True))
    run = make_run(eq.local_root, files, symlink=False)
    transport = RcloneTransport(eq)
    await transport.push(run, bwlimit_kibps=None)
    if not bulk_hashing_works:  # a backend that refuses operations/hashsum: each file's hash from lsjson
        real = rclone_mod._hashsum

        async def refused(base, fs, *, download=False, **kwargs):
            if download:
                return await real(base, fs, download=download, **kwargs)
            return ToolResult(["rclone"], 1, b"", b"ERROR : hash unsupported", 0.0)

        monkeypatch.setattr(rclone_mod, "_hashsum", refused)
    manifest = await transport.remote_manifest(run)
    assert manifest.hashes == hashes(files) and manifest.unverifiable == {}
    tool = "rclone_hashsum" if bulk_hashing_works else "rclone_lsjson"
    assert f"remote_manifest tool={tool} files={len(files)}" in _log_text(eq)


async def test_s3_object_store_end_to_end_with_download_hashing(tmp_path, s3_place):
    make_eq, on_disk = s3_place
    eq = make_eq()
    run = make_run(eq.local_root)
    transport = RcloneTransport(eq)
    result = await transport.push(run, bwlimit_kibps=None)
    assert result.ok and result.files_sent == len(HOSTILE)

    remote_run = on_disk / RUN_REL
    assert regular_tree(remote_run) == HOSTILE
    assert_sha256sum_check(remote_run, run)
    manifest = await transport.remote_manifest(run)
    assert _remote_hashing_logged(eq) == "false"  # S3 has no SHA-256 of objects: downloaded
    assert manifest.hashes == hashes(HOSTILE)
    assert manifest.unverifiable == {}
    assert await transport.reachable(run)


#: names that rclone writes as they are, where it once was told ``‛／`` and ``‛␀`` and skipped them unseen
STAND_IN_NAMES = {
    "試料Ａ／Ｂ.csv": b"fullwidth solidus, an ordinary CJK name\n",
    "x␀y.dat": b"symbol for null\n",
    "sub／dir/in.txt": b"in a folder so named\n",
    "plain.txt": b"plain\n",
}


@pytest.mark.parametrize("run_rel", [RUN_REL, RUN_REL.parent / "Run_試料Ａ／Ｂ"], ids=["run", "run_folder_so_named"])
async def test_s3_names_with_rclone_stand_ins_are_sent_and_verified(tmp_path, s3_place, run_rel):
    make_eq, on_disk = s3_place
    eq = make_eq()
    run = make_run(eq.local_root, STAND_IN_NAMES, rel=run_rel, symlink=False)
    transport = RcloneTransport(eq)

    result = await transport.push(run, bwlimit_kibps=None)
    assert result.ok and result.files_sent == len(STAND_IN_NAMES)
    assert regular_tree(on_disk / run_rel) == STAND_IN_NAMES, "push returned ok but left files out"
    manifest = await transport.remote_manifest(run)
    assert manifest.hashes == hashes(STAND_IN_NAMES) and manifest.unverifiable == {}


@pytest.mark.parametrize(
    ("run_rel", "files", "refused"),
    [
        (
            RUN_REL,
            {"it\u201bs.txt": b"q", "ok.txt": b"ok"},
            "file name with \u201b (U+201B): rclone cannot find it by its name: it\u201bs.txt",
        ),
        (RUN_REL, {"sub\u201b/a.txt": b"q", "ok.txt": b"ok"}, "rclone cannot find it by its name: sub\u201b/a.txt"),
        (RUN_REL.parent / "Run_\u201bq", {"ok.txt": b"ok"}, "run folder name with \u201b (U+201B): rclone cannot find"),
    ],
    ids=["file", "folder", "run_folder"],
)
async def test_a_name_rclone_cannot_find_is_refused_before_any_write(tmp_path, s3_place, run_rel, files, refused):
    """rclone lists ``a‛b`` as ``a‛‛b`` and looks for ``a‛‛b`` when told either: it never finds the file."""
    make_eq, on_disk = s3_place
    eq = make_eq()
    run = make_run(eq.local_root, files, rel=run_rel, symlink=False)
    with pytest.raises(TransportError) as caught:
        await RcloneTransport(eq).push(run, bwlimit_kibps=None, owner="job1")
    assert caught.value.kind == K.REMOTE_WRITE_REFUSED, caught.value.message
    assert refused in caught.value.message
    assert not on_disk.exists()  # nothing written, not even a claim


async def test_a_listed_file_rclone_does_not_find_fails_the_push(tmp_path, s3_place, monkeypatch):
    """rclone skips a ``--files-from0`` name it does not find, exit 0: its ``--combined`` report shows it.

    Here the list is written in a notation rclone no longer reads (the old
    quoting of ``／``), as after an rclone upgrade that changed its own.
    """
    make_eq, on_disk = s3_place
    eq = make_eq()
    run = make_run(eq.local_root, {"試料Ａ／Ｂ.csv": b"m", "ok.txt": b"ok"}, symlink=False)
    current = rclone_mod.encode_name
    monkeypatch.setattr(rclone_mod, "encode_name", lambda path: current(path).replace("\uff0f", "\u201b\uff0f"))
    monkeypatch.setattr(rclone_mod, "rclone_can_name", lambda path: True)  # a change the check did not foresee
    with pytest.raises(TransportError) as caught:
        await RcloneTransport(eq).push(run, bwlimit_kibps=None)
    assert caught.value.kind == K.REMOTE_WRITE_REFUSED, caught.value.message
    assert "rclone did not find 試料Ａ／Ｂ.csv in the run: not sent" in caught.value.message


async def test_a_file_deleted_right_before_the_copy_is_local_file_vanished(tmp_path, s3_place, monkeypatch):
    """Listed, then deleted before rclone looks: rclone skips it without an error; the push must not pass."""
    make_eq, _ = s3_place
    eq = make_eq()
    run = make_run(eq.local_root, {"a.txt": b"a", "gone.txt": b"g"}, symlink=False)
    fired = act_once_in(
        monkeypatch,
        rclone_mod,
        "run_tool",
        lambda *a, **kw: kw.get("step") == "push",
        lambda: (run / "gone.txt").unlink(),
    )
    with pytest.raises(TransportError) as caught:
        await RcloneTransport(eq).push(run, bwlimit_kibps=None)
    assert fired
    assert caught.value.kind == K.LOCAL_FILE_VANISHED, caught.value.message
    assert "gone.txt" in caught.value.message


async def test_download_hashing_skips_oversize_files(tmp_path, s3_place):
    make_eq, _ = s3_place
    eq = make_eq()
    files = {"small.txt": b"s" * 100, "big.bin": os.urandom(5000), "edge.bin": b"e" * 1000}
    run = make_run(eq.local_root, files, symlink=False)
    await RcloneTransport(eq).push(run, bwlimit_kibps=None)
    manifest = await RcloneTransport(eq, verify_max_stream_bytes=1000).remote_manifest(run)
    assert manifest.hashes == hashes({k: v for k, v in files.items() if len(v) <= 1000})
    assert manifest.unverifiable == {"big.bin": "verify_skipped_oversize"}


async def test_missing_run_folder_is_an_empty_manifest(tmp_path, sshd, remote_dir, rclone_sftp_config):
    eq = rclone_equipment(tmp_path, "labsftp", str(remote_dir), rclone_sftp_config(sshd))
    run = make_run(eq.local_root, {"a.txt": b"a"}, symlink=False)
    assert (await RcloneTransport(eq).remote_manifest(run)).hashes == {}
    gone = rclone_equipment(tmp_path, "labsftp", str(remote_dir / "no-such-root"), rclone_sftp_config(sshd))
    transport = RcloneTransport(gone)
    with pytest.raises(TransportError) as caught:
        await transport.remote_manifest(run)
    assert caught.value.kind == K.NETWORK
    assert not await transport.reachable(run)


def without_remote_hashes(conf: Path) -> Path:
    """The sftp remote of ``conf`` with no hash at all (rclone would find md5sum on the server)."""
    conf.write_text(conf.read_text() + "md5sum_command = none\nsha1sum_command = none\n")
    return conf


async def test_rewrite_resends_a_damaged_file_with_same_size_and_mtime(tmp_path, sshd, remote_dir, rclone_sftp_config):
    eq = rclone_equipment(tmp_path, "labsftp", str(remote_dir), without_remote_hashes(rclone_sftp_config(sshd)))
    run = make_run(eq.local_root, {"a.bin": os.urandom(5000), "new\nname.bin": os.urandom(100)}, symlink=False)
    transport = RcloneTransport(eq)
    await transport.push(run, bwlimit_kibps=None)
    for name in ("a.bin", "new\nname.bin"):
        damaged = remote_dir / RUN_REL / name
        stat = damaged.stat()
        damaged.write_bytes(b"\0" * stat.st_size)
        os.utime(damaged, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    await transport.push(run, bwlimit_kibps=None)  # no hash on the server: size and time match, not sent
    assert (remote_dir / RUN_REL / "a.bin").read_bytes() == b"\0" * 5000
    result = await transport.push(run, bwlimit_kibps=None, rewrite=frozenset({"a.bin", "new\nname.bin"}))
    assert result.files_sent == 2
    assert tree(remote_dir / RUN_REL) == tree(run)


async def test_bandwidth_timetable_is_passed_to_rclone(tmp_path, sshd, remote_dir, rclone_sftp_config):
    bandwidth = {"upload_mbps": 50, "schedule": [{"days": ["mon", "tue"], "from": "08:00", "to": "18:00"}]}
    eq = rclone_equipment(tmp_path, "labsftp", str(remote_dir), rclone_sftp_config(sshd), bandwidth=bandwidth)
    run = make_run(eq.local_root, {"a.txt": b"a"}, symlink=False)
    await RcloneTransport(eq).push(run, bwlimit_kibps=6103)
    log = "".join(p.read_text() for p in (eq.equipment_root / ".exlab-wizard").glob("wizard.*.log"))
    copy = next(line for line in log.splitlines() if "tool_start" in line and "step=push" in line)
    assert "--bwlimit 'Mon-08:00,6103k Mon-18:00,off Tue-08:00,6103k Tue-18:00,off'" in copy
    assert "--links" not in copy and "--copy-links" not in copy and "-L" not in copy.split()


def counting_rclone(tmp_path: Path, started: Path, sshd_log: Path = Path("/dev/null")) -> str:
    """An rclone that writes each call, quiet ones too, as a line of ``started``.

    The line: the server's logins before the call and after it (as ``sshd_log`` counts them), then the
    call's arguments.
    """
    logins = f'grep -c "Accepted publickey for" {sshd_log}'
    counting = tmp_path / "rclone"
    counting.write_text(
        f'#!/bin/sh\nbefore=$({logins})\n{rclone_mod.rclone_binary()} "$@"\nrc=$?\n'
        f'echo "$before $({logins}) $*" >> {started}\nexit $rc\n'
    )
    counting.chmod(0o755)
    return str(counting)


async def test_a_small_run_takes_one_sftp_connection_for_each_rclone_call(
    tmp_path, sshd_factory, remote_dir, rclone_sftp_config
):
    """Each transfer at once is an ssh login on sftp: a few files go over one, a larger run keeps rclone's defaults."""
    server = sshd_factory()  # its own log: every login of this test and none other
    eq = rclone_equipment(tmp_path, "labsftp", str(remote_dir), without_remote_hashes(rclone_sftp_config(server)))
    files = {f"d/f{i}.bin": os.urandom(4096) for i in range(8)} | {".exlab-wizard/creation.json": b"{}"}
    run = make_run(eq.local_root, files, symlink=False)
    started = tmp_path / "rclone-calls"
    transport = RcloneTransport(eq, rclone=counting_rclone(tmp_path, started, server.log))
    await transport.push(run, bwlimit_kibps=None)
    manifest = await transport.remote_manifest(run)  # downloaded and hashed here: the server offers no hash
    await transport.push_metadata(run)
    assert manifest.hashes == hashes(tree(run)) and manifest.unverifiable == {}

    # Each call that moves files runs alone: the logins during it are its own. One for a copy; two at
    # most for the hashing download, which lists and reads at once. Before, four for each.
    logins = {}
    for line in started.read_text().splitlines():
        before, after, args = line.split(" ", 2)
        for verb in ("--files-from0 - copy", "copy --ignore-times", '"download": true'):
            if verb in args:
                assert "--transfers 1 --checkers 1" in args, args
                logins[verb] = int(after) - int(before)
    assert logins.keys() == {"--files-from0 - copy", '"download": true', "copy --ignore-times"}
    assert logins["--files-from0 - copy"] == logins["copy --ignore-times"] == 1 and logins['"download": true'] <= 2

    many = {f"f{i}.bin": b"x" for i in range(rclone_mod.ONE_CONNECTION_FILES + 1)}
    bigger = make_run(eq.local_root, many, rel=RUN_REL.parent / "Run_more", symlink=False)
    await transport.push(bigger, bwlimit_kibps=None)
    copy = [line for line in _log_text(eq).splitlines() if "tool_start" in line and "step=push " in line][-1]
    assert "--transfers" not in copy and "--checkers" not in copy


@pytest.mark.parametrize("remote_sha256", [False, True], ids=["download_hashing", "server_hashing"])
async def test_a_nas_copy_larger_than_what_is_left_here_is_hashed_on_rclones_connections(
    tmp_path, sshd, remote_dir, rclone_sftp_config, remote_sha256
):
    """After the reaper deleted the data here, an audit or the last metadata push hashes the whole NAS copy."""
    conf = rclone_sftp_config(sshd, remote_sha256=remote_sha256)
    eq = rclone_equipment(tmp_path, "labsftp", str(remote_dir), conf if remote_sha256 else without_remote_hashes(conf))
    many = {f"f{i}.bin": b"x" * i for i in range(rclone_mod.ONE_CONNECTION_FILES + 8)}
    run = make_run(eq.local_root, many | {".exlab-wizard/creation.json": b"{}"}, symlink=False)
    started = tmp_path / "rclone-calls"
    transport = RcloneTransport(eq, rclone=counting_rclone(tmp_path, started))
    await transport.push(run, bwlimit_kibps=None)
    for name in many:
        (run / name).unlink()  # cleaned here, as the reaper does once the copy is verified
    started.unlink()
    manifest = await transport.remote_manifest(run)
    assert len(manifest.hashes) == len(many) + 1 and manifest.unverifiable == {}
    hashing = [line for line in started.read_text().splitlines() if "operations/hashsum" in line]
    assert hashing and all("--transfers" not in line and "--checkers" not in line for line in hashing), hashing


def test_one_connection_only_for_a_small_copy_on_sftp():
    flags = rclone_mod.connection_flags
    assert flags(1, 0, sftp=True) == ["--transfers", "1", "--checkers", "1"]
    assert flags(rclone_mod.ONE_CONNECTION_FILES, rclone_mod.ONE_CONNECTION_BYTES, sftp=True)
    assert flags(rclone_mod.ONE_CONNECTION_FILES + 1, 0, sftp=True) == []
    assert flags(1, rclone_mod.ONE_CONNECTION_BYTES + 1, sftp=True) == []
    assert flags(1, 0, sftp=False) == []  # an object store's connections cost little: rclone's defaults


# ---------------------------------------------------------- error classes


async def test_sftp_key_refused_is_auth(tmp_path, sshd, remote_dir, rclone_sftp_config):
    conf = rclone_sftp_config(sshd, key=sshd.env.stranger_key)
    eq = rclone_equipment(tmp_path, "labsftp", str(remote_dir), conf)
    run = make_run(eq.local_root, {"a.txt": b"a"}, symlink=False)
    transport = RcloneTransport(eq)
    with pytest.raises(TransportError) as caught:
        await transport.push(run, bwlimit_kibps=None)
    assert caught.value.kind == K.AUTH
    assert "unable to authenticate" in caught.value.message
    assert not await transport.reachable(run)
    assert list(remote_dir.iterdir()) == []


async def test_s3_wrong_secret_is_auth(tmp_path, s3_server, s3_place):
    make_eq, on_disk = s3_place
    eq = make_eq()
    conf = Path(eq.transport.rclone_config)
    conf.write_text(conf.read_text().replace("secret_access_key = ", "secret_access_key = wrong"))
    run = make_run(eq.local_root, {"a.txt": b"a"}, symlink=False)
    with pytest.raises(TransportError) as caught:
        await RcloneTransport(eq).push(run, bwlimit_kibps=None)
    assert caught.value.kind == K.AUTH, caught.value.message
    with pytest.raises(TransportError) as caught:
        await RcloneTransport(eq).remote_manifest(run)
    assert caught.value.kind == K.AUTH, caught.value.message
    assert not on_disk.exists()


async def test_sftp_server_down_is_network(tmp_path, sshd_factory, remote_dir, rclone_sftp_config):
    server = sshd_factory()
    eq = rclone_equipment(tmp_path, "labsftp", str(remote_dir), rclone_sftp_config(server))
    run = make_run(eq.local_root, {"a.txt": b"a"}, symlink=False)
    transport = RcloneTransport(eq)
    assert await transport.reachable(run)
    server.stop()
    with pytest.raises(TransportError) as caught:
        await transport.push(run, bwlimit_kibps=None)
    assert caught.value.kind == K.NETWORK
    assert "connection refused" in caught.value.message.lower()
    assert not await transport.reachable(run)
    server.start()
    assert (await transport.push(run, bwlimit_kibps=None)).ok


# An S3 store that is down: test_conformance.py::test_reachable_and_an_unreachable_remote_is_never_empty


async def test_read_only_remote_folder_is_remote_write_refused(tmp_path, sshd, remote_dir, rclone_sftp_config):
    locked = remote_dir / "locked"
    locked.mkdir()
    locked.chmod(0o555)  # owned by root; the login user is unprivileged
    eq = rclone_equipment(tmp_path, "labsftp", str(locked), rclone_sftp_config(sshd))
    run = make_run(eq.local_root, {"a.txt": b"a"}, symlink=False)
    with pytest.raises(TransportError) as caught:
        await RcloneTransport(eq).push(run, bwlimit_kibps=None)
    assert caught.value.kind == K.REMOTE_WRITE_REFUSED, caught.value.message
    assert list(locked.iterdir()) == []


async def test_local_file_removed_during_transfer_is_local_file_vanished(
    tmp_path, sshd, remote_dir, rclone_sftp_config
):
    eq = rclone_equipment(tmp_path, "labsftp", str(remote_dir), rclone_sftp_config(sshd))
    files = {f"f{i}.bin": os.urandom(60_000) for i in range(6)}
    run = make_run(eq.local_root, files, symlink=False)
    push = asyncio.create_task(RcloneTransport(eq).push(run, bwlimit_kibps=100))
    await wait_until(lambda: bool(partials(remote_dir)), what="rclone uploading")
    for name in ("f4.bin", "f5.bin"):
        (run / name).unlink()
    with pytest.raises(TransportError) as caught:
        await push
    assert caught.value.kind == K.LOCAL_FILE_VANISHED, caught.value.message


async def test_s3_conflict_and_own_partials(tmp_path, s3_server, s3_place, sshd, remote_dir, rclone_sftp_config):
    make_eq, on_disk = s3_place
    eq = make_eq()
    run = make_run(eq.local_root, {"a.txt": b"a"}, symlink=False)
    (on_disk / RUN_REL).mkdir(parents=True)
    (on_disk / RUN_REL / "someone.raw").write_bytes(b"theirs")
    s3_server.settle()
    with pytest.raises(TransportError) as caught:
        await RcloneTransport(eq).push(run, bwlimit_kibps=None)
    assert caught.value.kind == K.REMOTE_CONFLICT
    assert regular_tree(on_disk / RUN_REL) == {"someone.raw": b"theirs"}

    # rclone's own leftover of an interrupted upload is no conflict and is removed
    sftp_eq = rclone_equipment(tmp_path / "sftp", "labsftp", str(remote_dir), rclone_sftp_config(sshd))
    sftp_run = make_run(sftp_eq.local_root, {"a.txt": b"a", "new\nline": b"n"}, symlink=False)
    remote_run = remote_dir / RUN_REL
    remote_run.mkdir(parents=True)
    (remote_run / "a.txt.0123abcd.partial").write_bytes(b"half")
    (remote_run / "new\nline.89abcdef.partial").write_bytes(b"half")
    shutil.chown(remote_run, RW_USER, RW_USER)
    await RcloneTransport(sftp_eq).push(sftp_run, bwlimit_kibps=None)
    assert tree(remote_run) == {"a.txt": b"a", "new\nline": b"n"}


def test_bulk_hash_output_is_matched_to_the_listing():
    ok = "a" * 64
    out = json.dumps(
        {
            "hashsum": [
                f"{ok}  two  spaces.txt",
                f"{'B' * 64}   leading space.txt",
                f"{ok}  new\nline.txt",
                "UNSUPPORTED  unhashable.bin",
                "ERROR  failed.bin",
                f"{ok}  appeared later.txt",
            ]
        }
    ).encode()
    listed = {
        "two  spaces.txt": 1,
        " leading space.txt": 1,
        "new\nline.txt": 1,
        "unhashable.bin": 1,
        "failed.bin": 1,
        "never hashed.bin": 1,
    }
    hashes, unverifiable = rclone_mod._hashed_listing(out, listed)
    assert hashes == {
        "two  spaces.txt": ok,
        " leading space.txt": "b" * 64,
        "new\nline.txt": ok,
        "appeared later.txt": ok,
    }
    assert unverifiable == dict.fromkeys(["unhashable.bin", "failed.bin", "never hashed.bin"], "remote_read_error")


# ------------------------------------------------- large files hashed by openssl on an sftp NAS

T = rclone_mod.FAST_SHA256_MIN_BYTES
#: large files under hostile names (one of exactly the limit, one a byte short of it), and small ones
LARGE_AND_SMALL = {
    **{name: os.urandom(T + i) for i, name in enumerate(n for n in HOSTILE if n != "empty.bin" and "/" not in n)},
    "exactly the limit.bin": os.urandom(T),
    "one byte short.bin": os.urandom(T - 1),
    "small/a.txt": b"a",
    "empty.bin": b"",
}


def _rclone_escaped(path: str) -> str:
    """A path as rclone's sftp backend appends it to a hash command for a unix shell."""
    return re.sub(r"[^A-Za-z0-9_.,:/@\u0080-\U0010ffff\n-]", lambda m: "\\" + m.group(0), path).replace("\n", "'\n'")


@pytest.mark.parametrize("openssl", [True, False], ids=["openssl", "no_openssl"])
def test_the_fast_command_prints_each_hostile_names_sha256_first(tmp_path, openssl):
    """As rclone runs it: its path appended, escaped; the digest is the first word (also without openssl)."""
    folder = tmp_path / "nas"
    folder.mkdir()
    path_dirs = tmp_path / "bin"
    path_dirs.mkdir()
    for tool in ["sh", "sha256sum", *(["openssl"] if openssl else [])]:
        (path_dirs / tool).symlink_to(shutil.which(tool))
    for name in (n for n in HOSTILE if "/" not in n):
        (folder / name).write_bytes(HOSTILE[name])
        for shown in (name, str(folder / name)):  # relative (a leading dash) and absolute
            done = subprocess.run(
                f"{rclone_mod.FAST_SHA256_COMMAND} {_rclone_escaped(shown)}",
                shell=True,
                cwd=folder,
                capture_output=True,
                env={"PATH": str(path_dirs)},
            )
            assert done.returncode == 0, (name, done.stderr)
            first = done.stdout.decode().lstrip("\\").split(" ")[0]
            assert first == hashlib.sha256(HOSTILE[name]).hexdigest(), (name, done.stdout)
    assert not list(folder.glob("PWNED*"))


async def _large_and_small_verified(tmp_path, sshd, remote_dir, rclone_sftp_config):
    """LARGE_AND_SMALL pushed to the test sshd over rclone sftp (sha256sum_command = sha256sum) and its
    manifest taken, every file hashed: (equipment, transport, run, manifest)."""
    eq = rclone_equipment(tmp_path, "labsftp", str(remote_dir), rclone_sftp_config(sshd, remote_sha256=True))
    run = make_run(eq.local_root, LARGE_AND_SMALL, symlink=False)
    transport = RcloneTransport(eq)
    await transport.push(run, bwlimit_kibps=None)
    manifest = await transport.remote_manifest(run)
    assert manifest.hashes == hashes(LARGE_AND_SMALL) and manifest.unverifiable == {}
    return eq, transport, run, manifest


async def test_large_files_are_hashed_by_openssl_on_an_sftp_nas_and_the_others_by_sha256sum(
    tmp_path, sshd, remote_dir, rclone_sftp_config, openssl_calls
):
    eq, _transport, _run, _manifest = await _large_and_small_verified(tmp_path, sshd, remote_dir, rclone_sftp_config)
    assert f"remote_manifest tool=rclone_hashsum files={len(LARGE_AND_SMALL)}" in _log_text(eq)
    large = sum(len(data) >= T for data in LARGE_AND_SMALL.values())
    assert openssl_calls.read_text().count("call") == large  # each large file once, by openssl; no other
    assert "rclone_fast_sha256_off" not in _log_text(eq)


@pytest.mark.parametrize(
    "command", ["false", "echo not-a-digest", "sh -c 'exit 0'"], ids=["fails", "garbage", "silent"]
)
async def test_a_fast_command_that_does_not_hash_leaves_rclones_way_to_hash_them(
    tmp_path, sshd, remote_dir, rclone_sftp_config, monkeypatch, command
):
    monkeypatch.setattr(rclone_mod, "FAST_SHA256_COMMAND", command)
    eq, transport, run, manifest = await _large_and_small_verified(tmp_path, sshd, remote_dir, rclone_sftp_config)
    assert "rclone_fast_sha256_off" in _log_text(eq)
    assert _remote_hashing_logged(eq) == "true"  # never taken for a server that cannot hash
    asked: list[list[str]] = []
    real = rclone_mod._hashsum

    async def noted(base, fs, **kwargs):  # the real hashsum; its argv noted (a quiet call is not logged)
        asked.append(list(base))
        return await real(base, fs, **kwargs)

    monkeypatch.setattr(rclone_mod, "_hashsum", noted)
    again = await transport.remote_manifest(run)
    assert again.hashes == manifest.hashes
    assert asked and not any("--sftp-sha256sum-command" in base for base in asked)  # not asked again


@pytest.mark.parametrize(
    ("lines", "env", "allowed"),
    [
        (["sha256sum_command = sha256sum"], {}, True),
        ([], {}, True),
        (["sha256sum_command = sha256sum", "shell_type = unix"], {}, True),
        (["sha256sum_command = /opt/bin/sha256sum"], {}, False),
        (["sha256sum_command = none"], {}, False),
        (["shell_type = powershell"], {}, False),
        (["sha256sum_command = sha256sum"], {"RCLONE_CONFIG_LABSFTP_SHA256SUM_COMMAND": "mysum"}, False),
        (["sha256sum_command = sha256sum"], {"RCLONE_SFTP_SHA256SUM_COMMAND": "mysum"}, False),
        (["sha256sum_command = sha256sum"], {"RCLONE_SFTP_SHELL_TYPE": "cmd"}, False),
    ],
)
def test_the_fast_command_only_stands_in_for_a_plain_sha256sum(tmp_path, monkeypatch, lines, env, allowed):
    conf = tmp_path / "rclone.conf"
    conf.write_text("\n".join(["[labsftp]", "type = sftp", "host = 127.0.0.1", *lines, ""]))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    transport = RcloneTransport(rclone_equipment(tmp_path, "labsftp", "/nas", conf))
    transport._sftp = True  # as probe() finds for this remote
    assert transport._fast_sha256_allowed() is allowed
    other = RcloneTransport(rclone_equipment(tmp_path, "labsftp", "/nas", conf))
    assert other._fast_sha256_allowed() is False  # not an sftp backend (probe found another)
    conf.write_text("# Encrypted rclone configuration File\n\nRCLONE_ENCRYPT_V0:\nabc\n")
    unknown = RcloneTransport(rclone_equipment(tmp_path, "labsftp", "/nas", conf))
    unknown._sftp = True
    assert unknown._fast_sha256_allowed() is False
