"""The ``rsync_ssh`` transport: rsync over ssh with key authentication.

Push: ``rsync -a --no-links --no-D --partial --partial-dir=.rsync-partial``
(no partial-dir for a run that has a ``.rsync-partial`` folder of its own)
over ``ssh -i KEY -p PORT -o BatchMode=yes -o StrictHostKeyChecking=yes``
(``--inplace`` instead of the partial options into a run folder the push
itself made, where no NAS copy exists to keep whole). Before anything is
written, the remote run folder is listed (``rsync --list-only``) and compared
with the local run: a file that is neither in the run, nor under
``.exlab-wizard/``, nor rsync's own leftover of an interrupted push (a
``.rsync-partial/`` folder the run does not have, or a ``.<name>.<6 random>``
temporary) is someone else's data and the push raises ``REMOTE_CONFLICT``.
Two entries of the run whose names differ only in letter case or Unicode
form, or a path the NAS folder holds only under another spelling, are refused
(``REMOTE_WRITE_REFUSED``) on a NAS that folds names, which would take one for
the other (:meth:`RsyncSshTransport._check_folding`).
Every remote path is given to rsync with its wildcard characters bracketed
(:func:`remote_path_arg`): the remote side expands them, in a source and a
destination alike.
The run folder and its parents are created below the remote root only, never
the root itself (see :meth:`RsyncSshTransport._make_run_folder`): a missing
root is a NAS volume not mounted, ``NETWORK``. A root that is the volume's own
mount point is never missing: with ``remote_marker`` set, every write and
every look at the NAS needs that file in the root
(:meth:`RsyncSshTransport._require_marker`), as the mount transport's marker.
Leftovers are removed once a push completes. Files named in ``rewrite`` are
sent whole first (``--ignore-times --whole-file``), whatever their size and
mtime. rsync has no bandwidth timetable: each rsync starts with the limit in
force as it starts, and at the next edge of the equipment's schedule where the
limit changes it is stopped and started again with the new ``--bwlimit``;
``--partial-dir`` keeps what was sent. The push's one listing of the local run
also gives the progress total and the local manifest: the listed data
files are hashed here beside the transfer (``hashes_while_sending``).

Remote manifest: the fastest SHA-256 tool of the host (probed once per host:
``python3`` with OpenSSL's hashlib, ``openssl``, ``sha256sum -z``) runs over
the remote run folder through ssh, every path shell-quoted and every output
record NUL-separated. Where the remote has python3, the large files a push
sends are hashed there while the push still runs, each once rsync has renamed
it into place; the verify pass reuses such a hash only when the file's inode
(device, inode, size, mtime and ctime) is unchanged since it was read, and
hashes everything else itself. When this CPU has AES instructions and no
ssh_config chose the ciphers, AES-GCM is put first in ssh's own list (the
bulk encryption is a large part of a push's CPU; see
:func:`preferred_ciphers`). A remote that refuses commands (an rrsync or
``internal-sftp`` account) is read back instead -- with rsync, else over sftp
(rclone's sftp backend) -- and hashed here, each file up to
``verify_max_stream_bytes``; larger files are reported ``verify_skipped_oversize``.

One module, though long: it is one transport, and its parts (the ssh
connection and cipher choice, the parallel streams, the remote watcher, the
fallbacks for a host that refuses commands) share one ssh setup and one way
of reading rsync's output. The programs it runs remotely are in
``remote_programs/``.
"""

from __future__ import annotations

import asyncio
import atexit
import calendar
import contextlib
import datetime as dt
import errno
import hashlib
import logging
import os
import re
import shlex
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from exlab_wizard.config.models import EquipmentConfig, RsyncSshTransportConfig
from exlab_wizard.fileio import METADATA_DIR, REAPING_PREFIX, hash_file
from exlab_wizard.sync.equipment_log import EquipmentLog
from exlab_wizard.sync.failures import UNVERIFIABLE_OVERSIZE, UNVERIFIABLE_READ_ERROR
from exlab_wizard.sync.manifest_format import ManifestFormatError, read_manifest
from exlab_wizard.sync.policy.bandwidth import limit_kibps, next_change
from exlab_wizard.sync.transports._process import (
    LocalTree,
    ToolResult,
    _stop,
    checked_rewrite,
    gather_or_cancel,
    hashed_beside,
    local_metadata_folder,
    local_run_folder,
    local_tree,
    log_tool_exit,
    new_failure,
    run_tool,
    spawn,
)
from exlab_wizard.sync.transports.base import (
    NAS_TIME_ENDS_NS,
    PREVIOUS_DIR,
    Clock,
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
    clamped_times,
    local_now,
    previous_stamps,
    remote_relpath,
    report_total,
)
from exlab_wizard.sync.transports.classify import REFUSES_RSYNC as _REFUSES_RSYNC
from exlab_wizard.sync.transports.classify import classify, pull_error, push_error, transport_error
from exlab_wizard.sync.transports.conflict import (
    DIR,
    FILE,
    NAS_MANIFEST,
    OTHER,
    RemoteExtras,
    check_owner,
    claim_body,
    claim_markers,
    claim_path,
    clash_lookup,
    clash_refused,
    conflict_error,
    fold_clash,
    folded_name,
    ownership_error,
    sort_remote,
    tree_fold_twins,
    twins_refused,
)
from exlab_wizard.sync.transports.remote_programs import remote_program

__all__ = ["PARTIAL_DIR", "RsyncSshTransport", "remote_path_arg"]

K = TransportErrorKind
#: rsync's partial-dir, relative: ``D/.rsync-partial/N`` holds the partial upload of ``D/N``. rsync
#: takes such a file for one (its basis, then deleted) and leaves such folders out of what it
#: sends, so a run that has a folder of this name is pushed without a partial-dir
#: (:func:`_partial_args`). An absolute partial-dir would hold the partials of all folders under
#: their names alone: rsync deleted one file's partial while it sent another of the same name from
#: it (a protocol error, code 2), as in a run of ``pos1/img.tif`` and ``pos2/img.tif``.
PARTIAL_DIR = ".rsync-partial"
OVERSIZE = UNVERIFIABLE_OVERSIZE
#: Bytes pulled into one temporary folder before hashing and deleting it
#: (the fallback for a remote that refuses commands).
STREAM_BATCH_BYTES = 256 << 20
STREAM_BATCH_FILES = 2000
#: rsyncs sent side by side for one push (see RsyncSshTransport._send); runs smaller
#: than both thresholds below go in one.
PUSH_STREAMS = 2
STREAMS_MIN_BYTES = 16 << 20
STREAMS_MIN_FILES = 1000
#: What one more file costs a stream, in bytes of transfer (a round of file-list,
#: create, rename): used to balance many small files against a few large ones.
STREAM_FILE_COST = 64 << 10
#: Runs whose files average less than this go as one rsync: per-file round trips bind them,
#: and two rsyncs would only share the CPU both need.
STREAMS_MIN_AVERAGE_BYTES = 64 << 10
#: Streams over the top-level entries only when no stream gets more than this share of the run.
STREAMS_MAX_SHARE = 0.7
#: Files at least this large are hashed on the remote while the rest of the push is sent
#: (smaller ones cost more to watch than to hash in the verify pass).
HASH_WHILE_SENDING_MIN_BYTES = 1 << 20
#: A push sending at least this many bytes at full speed has the NAS start writing them to its disks
#: while it runs (a plain ``sync`` every FLUSH_WHILE_SENDING_S, see remote_watch.py): the verify
#: pass's flush then finds little left. Under a bandwidth limit the kernel's own writeback keeps up.
FLUSH_WHILE_SENDING_MIN_BYTES = 16 << 20
FLUSH_WHILE_SENDING_S = 0.5
#: A push's progress (rsync prints a line a file) is read this often, from a file, not line by line.
PROGRESS_READ_S = 0.25
#: Should the schedule name a window edge already past, rsync runs on and the schedule is read again after this.
EDGE_RECHECK_S = 300.0
#: While rsync runs, the limit is read again by the wall clock this often, in seconds: a clock stepped into
#: (or out of) a window meanwhile restarts rsync with the new limit; the edge it waits for by the monotonic
#: clock would be hours late.
SCHEDULE_CHECK_S = 5.0

# rsync's temporary name for ``name`` while receiving it: ".name." and 6 random letters or digits.
_RSYNC_TMP_RE = re.compile(r"\.(?P<base>.+)\.[A-Za-z0-9]{6}", re.DOTALL)  # fullmatch; a name may hold a newline
_LIST_RE = re.compile(rb"^(?P<mode>\S+)\s+(?P<size>\d+) (?P<when>\d{4}/\d\d/\d\d \d\d:\d\d:\d\d) (?P<name>.*)$")
_ESCAPE_RE = re.compile(rb"\\#([0-7]{3})")
_WILDCARD_RE = re.compile(r"[*?\[\\]")
_GLOB_RE = re.compile(r"[*?\[]")
_PROGRESS_RE = re.compile(rb"^\s*(\d+)\s+\d+%")
_MISSING_DIR_RE = re.compile(
    r"change_dir .* failed: No such file or directory|link_stat .* failed: No such file or directory"
)


def _listing_error(result: ToolResult, remote_path: str) -> TransportError:
    """The error of a failed ``--list-only`` run, whose sender is the NAS.

    rsync's "[sender] ... No such file" or "file has vanished" then speak of
    the NAS, never of a local file: such a listing cut short (exit 255, the
    connection dropped after it) is ``NETWORK`` and retried, not
    ``local_file_vanished``, which fails the job at once.
    """
    error = transport_error("rsync", result.returncode, result.stderr_text, f"listing {remote_path}")
    if error.kind == K.LOCAL_FILE_VANISHED:
        return TransportError(K.NETWORK, error.message)
    return error


# Programs run on the remote host, kept in remote_programs/ (each file's opening comment
# is its contract): hashing a run, hashing while a push sends, keeping replaced files.
_PY_HASH = remote_program("remote_hash.py")
_PY_WATCH = remote_program("remote_watch.py")
_SH_KEEP_PREVIOUS = remote_program("keep_previous.sh")


def _sh_sync(where: str) -> str:
    """sh: ``sync -f <where>``, a whole ``sync`` only where that ``sync`` has no ``-f``; else exit 6.

    A whole ``sync`` reports no error, so it stands in only for a ``sync`` that
    does not know ``-f`` (coreutils before 8.24, an old BusyBox: "invalid
    option") or a kernel without syncfs; any other failure of ``sync -f`` (EIO,
    ENOSPC: a thin volume whose pool is full, its bytes only in the NAS's memory)
    is exit 6 with its message on stderr, as is no ``sync`` at all.
    """
    return (
        f"_e=$(LC_ALL=C sync -f {where} 2>&1) || case $_e in "
        '*option*|*"not implemented"*|*"Invalid argument"*) sync || exit 6;; '
        '*) printf "%s\\n" "$_e" >&2; exit 6;; esac; '
    )


# Every hashing program first makes the run's filesystem durable on the NAS (``sync -f``, see
# _sh_sync): VERIFIED means the bytes are on its disks. No sync that worked is exit 6: never
# hashes taken for durable ones.
_SH_CD = 'cd -- "$1" 2>/dev/null || { [ -d "$2" ] && exit 0; exit 3; }; '
_SH_SYNC = _sh_sync(".")
_SH_ENTER = _SH_CD + _SH_SYNC
_SYNC_FAILED = 6
_SH_SHA256SUM = _SH_ENTER + "find . -type f -print0 | xargs -0 -r sha256sum -z --"


def _sh_each_file(hasher: str) -> str:
    """The run's regular files, each as ``<path>\\0`` then ``hasher``'s line for its bytes on stdin."""
    loop = f'for f do printf "%s\\0" "$f"; {hasher} < "$f" || echo ERR; done'
    return _SH_ENTER + "find . -type f -exec sh -c " + shlex.quote(loop) + " sh {} +"


_SH_OPENSSL = _sh_each_file("openssl dgst -sha256 -r")
# BusyBox (QNAP, older DSM, appliances): its sha256sum has no -z, but hashes stdin ("<hex>  -").
_SH_SHA256SUM_STDIN = _sh_each_file("sha256sum")
#: The probe's answer for a NAS that runs commands but has no SHA-256 tool that works: the run is
#: flushed there with ``sync`` over ssh, then read back with rsync and hashed here.
SYNC_THEN_STREAM = "sync-then-stream"
#: fastest first: OpenSSL's SHA-256 (through python3 or the CLI), then coreutils, then BusyBox
_TOOL_RANK = ("python3-openssl", "openssl", "sha256sum", "python3-builtin", "sha256sum-stdin")
# The probe runs every hashing program on a folder of one empty file (see _probe_script).
_PROBE_FILE = "e"
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_PYTHON_VARIANT = (
    "import hashlib; print('python3-' + ('openssl' if hashlib.sha256.__name__.startswith('openssl') else 'builtin'))"
)
# Bytes a word may hold as is in a remote_line (inside csh's or sh's single quotes, and printf's format).
_LINE_SAFE = frozenset(b'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 "#$&()*+,-./:;<=>?@[]_`{|}~')


def _line_text(command: str) -> str:
    """``command``'s bytes as a printf format: every byte outside :data:`_LINE_SAFE` as ``\\ooo``."""
    return "".join(chr(b) if b in _LINE_SAFE else f"\\{b:03o}" for b in os.fsencode(command))


def remote_line(command: str) -> str:
    """``command`` (POSIX sh text: many lines, any names) as one line every login shell passes to sh unchanged.

    sshd hands a command to the account's login shell; a csh or tcsh
    (FreeBSD, TrueNAS CORE) refuses a newline inside quotes and runs the
    lines after it as csh commands. The line is ``sh -c '_c=$(printf "$1")
    && shift && eval "$_c"' sh '<text>'``: the text in single quotes holds only printable
    ASCII other than ``'``, ``\\``, ``%`` and ``!`` (each other byte as an
    octal escape that printf turns back), which csh, sh, bash and BusyBox
    ash all pass on as is. It needs nothing on the NAS beyond sh's printf.
    """
    return f"sh -c '_c=$(printf \"$1\") && shift && eval \"$_c\"' sh '{_line_text(command)}'"


def _hash_command(tool: str, args: str, *, flush: bool = True) -> str:
    """The sh command that hashes a run with ``tool``; ``args`` are two sh words: run folder, remote root.

    ``flush=False`` (the probe only, which checks ``sync`` on its own): the
    sh programs without their ``sync``, so a NAS lacking it still shows its tool.
    """
    if tool.startswith("python3"):
        return f"python3 -c {shlex.quote(_PY_HASH)} {args}"
    script = {"openssl": _SH_OPENSSL, "sha256sum": _SH_SHA256SUM, "sha256sum-stdin": _SH_SHA256SUM_STDIN}[tool]
    if not flush:
        script = script.replace(_SH_SYNC, "", 1)
    return f"sh -c {shlex.quote(script)} sh {args}"


def _parse_hashes(tool: str, stdout: bytes) -> RemoteManifest:
    return _parse_openssl(stdout) if tool in ("openssl", "sha256sum-stdin") else _parse_nul_records(stdout)


def _probe_script() -> str:
    """Which hashing programs work here: each is run on a fresh folder holding one empty file.

    Prints ``exlab-probe`` (our shell answered, not a forced command), the
    python3 variant, ``exlab-sync`` when ``sync`` works there, then per program ``\\nexlab-tool <name>\\n<output>\\nexlab-rc
    <exit>\\n``: only a program whose output gives the empty file's hash is used.
    """
    lines = [
        "echo exlab-probe",
        'd=$(mktemp -d "${TMPDIR:-/tmp}/exlab-probe.XXXXXX" 2>/dev/null) || exit 0',
        f': > "$d/{_PROBE_FILE}" || {{ rm -rf "$d"; exit 0; }}',
        f"python3 -c {shlex.quote(_PYTHON_VARIANT)} 2>/dev/null",
        "( " + _sh_sync('"$d"') + ") >/dev/null 2>&1 && echo exlab-sync",
    ]
    for tool in ("python3", "openssl", "sha256sum", "sha256sum-stdin"):
        run = _hash_command(tool, '"$d" "$d"', flush=False)
        lines.append(f"printf '\\nexlab-tool {tool}\\n'; {run} </dev/null 2>/dev/null; printf '\\nexlab-rc %s\\n' $?")
    lines.append('rm -rf "$d"')
    return "\n".join(lines)


def _probed_tool(stdout: bytes) -> tuple[str | None, bool]:
    """The fastest working tool in a probe's output (None: our shell did not answer, commands refused),
    and whether ``sync`` works there."""
    head, *segments = stdout.split(b"\nexlab-tool ")
    lines = head.decode(errors="replace").split()
    if "exlab-probe" not in lines:
        return None, False  # a forced command (rrsync, internal-sftp) answered instead of our shell
    working = set()
    for segment in segments:
        name, _, rest = segment.partition(b"\n")
        output, _, code = rest.rpartition(b"\nexlab-rc ")
        tool = name.decode(errors="replace")
        if tool == "python3":
            tool = "python3-openssl" if "python3-openssl" in lines else "python3-builtin"
        if tool in _TOOL_RANK and code.strip() == b"0":
            found = _parse_hashes(tool, output)
            if found.hashes == {_PROBE_FILE: _EMPTY_SHA256} and not found.unverifiable:
                working.add(tool)
    return next((name for name in _TOOL_RANK if name in working), SYNC_THEN_STREAM), "exlab-sync" in lines


# One probe per host for the whole process: (target, port, key, known_hosts) -> tool or None.
_HOST_TOOLS: dict[tuple[str, int, str, str], str | None] = {}
#: Does the NAS take names differing only in letter case for one? Per host and remote root, asked once
#: (:meth:`RsyncSshTransport._nas_folds_case`).
_HOST_FOLDS_CASE: dict[tuple[str, int, str, str, str], bool] = {}
_RSYNC_VERSIONS: dict[str, tuple[int, ...]] = {}
# Cipher list per host, decided once: (target, port, key, known_hosts) -> "-o Ciphers" value or None.
_CIPHERS: dict[tuple[str, int, str, str], str | None] = {}
_AES_GCM = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
# ssh master sockets: this process's own folder, made when the shared one was refused, and the
# (folder, problem) pairs already warned about (see _control_folder).
_OWN_CONTROL_DIR: Path | None = None
_REFUSED_CONTROL_DIRS: set[tuple[str, str]] = set()
_CONTROL_LOCK = threading.Lock()

_log = logging.getLogger(__name__)


def _cpu_has_aes() -> bool:
    """Does this CPU have AES instructions (x86 ``aes`` flag, ARM ``aes`` feature)?"""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() in ("flags", "Features") and "aes" in value.split():
            return True
    return False


def _ssh_ciphers(argv: list[str]) -> list[str]:
    import subprocess

    out = subprocess.run(argv, capture_output=True, text=True, timeout=15).stdout
    for line in out.splitlines():
        if line.startswith("ciphers "):
            return line.split(None, 1)[1].strip().split(",")
    return []


def preferred_ciphers(ssh_argv: list[str], target: str) -> str | None:
    """ssh's own cipher list with AES-GCM moved first, or None to leave ssh's choice alone.

    Only when this CPU has AES instructions and the list in force for ``target``
    is ssh's built-in default (nobody chose one in an ssh_config). On such CPUs
    AES-GCM costs a fraction of the default chacha20-poly1305, and the bulk
    transfer's encryption is a large share of a push's CPU; every cipher of the
    default list stays in it, so a server without AES-GCM still connects.
    """
    if not _cpu_has_aes():
        return None
    try:
        default = _ssh_ciphers([ssh_argv[0], "-F", os.devnull, "-G", "localhost"])
        effective = _ssh_ciphers([*ssh_argv, "-G", target])
    except Exception:
        return None
    if not default or effective != default or not all(c in default for c in _AES_GCM):
        return None
    return ",".join([*_AES_GCM, *(c for c in default if c not in _AES_GCM)])


def rsync_version(rsync: str) -> tuple[int, ...]:
    """The local rsync's version, e.g. ``(3, 2, 7)`` (read once per binary)."""
    if rsync not in _RSYNC_VERSIONS:
        import subprocess

        out = subprocess.run([rsync, "--version"], capture_output=True, text=True, timeout=30).stdout
        match = re.search(r"version\s+(\d+)\.(\d+)\.(\d+)", out)
        _RSYNC_VERSIONS[rsync] = tuple(int(x) for x in match.groups()) if match else (0, 0, 0)
    return _RSYNC_VERSIONS[rsync]


def _control_path(key: tuple[str, int, str, str]) -> str:
    """The ssh ControlPath of one master connection per (target, port, key, known_hosts).

    ssh hands every command to whatever listens on a ControlPath without asking
    whose it is, so the socket lives only in a folder no other user made or can
    write into (see :func:`_control_folder`). Its name is a digest of the key
    (the path stays far below the 108 bytes of a Unix socket's name).
    """
    digest = hashlib.sha256("\0".join(map(str, key)).encode()).hexdigest()[:20]
    return str(_control_folder() / digest)


def _not_private(folder: Path) -> str | None:
    """None when ``folder`` is a real folder of this uid that nobody else may enter; else what it is."""
    try:
        info = os.lstat(folder)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    mode = stat.S_IMODE(info.st_mode)
    what = "a symlink" if stat.S_ISLNK(info.st_mode) else "a folder" if stat.S_ISDIR(info.st_mode) else "not a folder"
    if what != "a folder" or info.st_uid != os.getuid() or mode & 0o077:
        return f"{what}, owner uid {info.st_uid}, mode {mode:04o}"
    return None


def _control_folder() -> Path:
    """The folder of this uid's ssh master sockets, shared by its processes where that is safe.

    ``$XDG_RUNTIME_DIR/exlab-ssh`` when the runtime folder is ours and private,
    else ``<tempdir>/exlab-ssh-<uid>``. Such a folder is used only when, after
    ``mkdir``, it is a real folder of this uid with no group or other access:
    in a shared ``/tmp`` another user may have made it first, or made it a
    symlink, and listen there as a fake master. Otherwise this process keeps
    its masters in a fresh folder of its own (removed at exit) and logs one
    warning naming the folder refused.
    """
    global _OWN_CONTROL_DIR
    candidates = []
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime) and _not_private(Path(runtime)) is None:
        candidates.append(Path(runtime) / "exlab-ssh")
    candidates.append(Path(tempfile.gettempdir()) / f"exlab-ssh-{os.getuid()}")
    with _CONTROL_LOCK:
        refused = []
        for folder in candidates:
            with contextlib.suppress(OSError):  # there already (checked below), or cannot be made
                folder.mkdir(mode=0o700)
            problem = _not_private(folder)
            if problem is None:
                return folder
            refused.append((folder, problem))
        if _OWN_CONTROL_DIR is None or _not_private(_OWN_CONTROL_DIR) is not None:
            _OWN_CONTROL_DIR = Path(tempfile.mkdtemp(prefix="exlab-ssh-"))
            atexit.register(shutil.rmtree, _OWN_CONTROL_DIR, True)
        for folder, problem in refused:
            if (str(folder), problem) not in _REFUSED_CONTROL_DIRS:
                _REFUSED_CONTROL_DIRS.add((str(folder), problem))
                _log.warning(
                    "ssh master folder %s is not private to uid %d (%s): not used; "
                    "this process keeps its ssh masters in %s",
                    folder,
                    os.getuid(),
                    problem,
                    _OWN_CONTROL_DIR,
                )
        return _OWN_CONTROL_DIR


@dataclass(frozen=True)
class _Entry:
    kind: str  # "f" file, "d" folder, "l" symlink, "o" other
    size: int
    #: whole seconds since the epoch, as listed when asked for (rsync prints the listing's times
    #: in its local time zone: every listing runs with ``TZ=UTC``, see :func:`_listing_env`)
    mtime_s: int = 0


def _unescape(name: bytes) -> str:
    """Undo rsync's ``\\#ooo`` escaping of a listed name."""
    return os.fsdecode(_ESCAPE_RE.sub(lambda m: bytes([int(m.group(1), 8)]), name))


def _listing_env() -> dict[str, str]:
    """The environment of an rsync listing: this one, with the listed times printed in UTC."""
    return {**os.environ, "TZ": "UTC"}


def parse_listing(stdout: bytes, *, times: bool = False) -> dict[str, _Entry]:
    """``rsync --list-only -r --no-h`` output -> {relative path: entry}; ``times``: with their mtimes."""
    entries: dict[str, _Entry] = {}
    for line in stdout.split(b"\n"):
        match = _LIST_RE.match(line)
        if not match:
            continue
        mode = match.group("mode")[:1]
        name = match.group("name")
        kind = {b"-": "f", b"d": "d", b"l": "l"}.get(mode, "o")
        if kind == "l" and b" -> " in name:
            name = name.split(b" -> ", 1)[0]
        path = _unescape(name)
        if path == ".":
            continue
        entries[path] = _Entry(kind, int(match.group("size")), _listed_time(match.group("when")) if times else 0)
    return entries


def _listed_time(when: bytes) -> int:
    """``YYYY/MM/DD hh:mm:ss`` (UTC) -> seconds since the epoch."""
    return calendar.timegm(
        (int(when[0:4]), int(when[5:7]), int(when[8:10]), int(when[11:13]), int(when[14:16]), int(when[17:19]), 0, 0, 0)
    )


def remote_path_arg(path: str, *, protected: bool = False) -> str:
    """``path`` as rsync's remote side reads it literally: each wildcard character bracketed (``[[]``).

    The remote side expands wildcards in a remote path, a source and a
    destination alike: the remote shell (rsync 3.2.4 and later escapes every
    other special character for it, not ``*?[]``), rrsync (Python's glob), or,
    with ``-s`` (``protected``), the remote rsync itself (glob(3), where a
    backslash escapes too). ``Runs/Run_[1]`` named ``Runs/Run_1`` whenever that
    existed. ``[c]`` matches ``c`` alone in all three; a pattern that matches
    nothing is taken as it is, so a destination must exist before it is
    written to (see :meth:`RsyncSshTransport._list_or_make`). Without ``-s``,
    rsync passes a backslash before a wildcard character on unescaped (an
    escape the remote side honours): such a path cannot be named and raises
    ``UNKNOWN``.
    """
    if protected:
        return re.sub(r"[*?\[\\]", lambda m: "[\\\\]" if m.group() == "\\" else f"[{m.group()}]", path)
    if re.search(r"\\[*?\[\]]", path):
        raise TransportError(
            K.UNKNOWN, f"cannot name {path!r} to rsync's remote side exactly (a backslash before a wildcard character)"
        )
    return _GLOB_RE.sub(lambda m: f"[{m.group()}]", path)


def _rsh_word(arg: str) -> str:
    """Quote one word of rsync's ``-e`` command (rsync splits it itself, no shell)."""
    if arg and not re.search(r"[\s'\"\\]", arg):
        return arg
    if "'" not in arg and "\\" not in arg:
        return f"'{arg}'"
    if '"' not in arg and "\\" not in arg:
        return f'"{arg}"'
    raise TransportError(K.UNKNOWN, f"cannot pass {arg!r} to ssh through rsync -e (quotes and backslashes)")


def _ssh_path(path: Path) -> str:
    # ssh expands %-tokens and ~ in key and known_hosts paths
    return str(path).replace("%", "%%")


def _hash_files(scratch: str, paths: list[str]) -> dict[str, str]:
    """``{path: sha256}`` of the files pulled into ``scratch``; a path not there as a regular file is left out."""

    def one(path: str) -> tuple[str, str | None]:
        try:
            return path, hash_file(os.path.join(scratch, path))
        except (FileNotFoundError, NotADirectoryError):
            return path, None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EINVAL):  # not a regular file: not pulled as one
                return path, None
            raise

    with ThreadPoolExecutor(max_workers=4) as pool:
        return {path: digest for path, digest in pool.map(one, paths) if digest is not None}


def _watch_header(run_path: Path, local: LocalTree, remote: dict[str, _Entry]) -> tuple[bytes, int]:
    """The remote watcher's file list: each large file this push will probably send (blocking: lstat);
    and the bytes of every file it will probably send."""
    header = bytearray()
    sending = 0
    for rel, size in local.files.items():
        entry = remote.get(rel)
        if entry is not None and entry.size == size:
            continue  # probably not sent again (same size): left to the verify pass
        sending += size
        if size < HASH_WHILE_SENDING_MIN_BYTES:
            continue  # small: cheaper to hash in the verify pass than to watch
        try:
            mtime = os.lstat(run_path / rel).st_mtime_ns // 1_000_000_000
        except OSError:
            continue
        header += os.fsencode(rel) + b"\0%d\0%d\0" % (size, mtime)
    return bytes(header), sending


def _tree_and_twins(run_path: Path) -> tuple[LocalTree, tuple[str, str] | None]:
    """The run's :func:`local_tree` and its :func:`tree_fold_twins` (blocking: one walk)."""
    local = local_tree(run_path)
    return local, tree_fold_twins(local.files, local.dirs)


def _regular_files(fetched: dict[str, Path]) -> dict[str, Path]:
    return {p: path for p, path in fetched.items() if path.is_file() and not path.is_symlink()}


#: rsync's rule for a push of the whole run: a file the reaper set aside for its unlink
#: (``fileio.reaping_name``, left by a pass killed before the unlink) is no data. Every local listing
#: leaves it out; rsync recursing the run folder by itself must as well. (Inside ``.exlab-wizard/``
#: such a name is metadata: the metadata push, which does not use this rule, sends it.)
_NOT_DATA = f"--exclude={REAPING_PREFIX}{'[0-9a-f]' * 20}"


class RsyncSshTransport(Transport):
    """rsync over ssh to ``<ssh_target>:<remote_path>/<run relative path>``.

    ``log``: where tool output goes (default: the equipment log).
    ``now``: the clock for the bandwidth schedule (aware local time).
    ``verify_max_stream_bytes``: largest file read back for hashing when the
    remote refuses commands.
    ``prefer_aes_gcm``: put AES-GCM first in ssh's default cipher list where
    this CPU has AES instructions (see :func:`preferred_ciphers`).
    """

    capabilities = TransportCapabilities(hashes_while_sending=True, metadata_push=True, reports_total=True)

    def __init__(
        self,
        equipment: EquipmentConfig,
        *,
        log: EquipmentLog | None = None,
        now: Clock = local_now,
        verify_max_stream_bytes: int = 1 << 30,
        connect_timeout_s: float = 10.0,
        io_timeout_s: int = 120,
        multiplex: bool = True,
        prefer_aes_gcm: bool = True,
    ):
        super().__init__(equipment)
        if not isinstance(equipment.transport, RsyncSshTransportConfig):
            raise TypeError(f"{equipment.id}: transport is {equipment.transport.type}, not rsync_ssh")
        self.config: RsyncSshTransportConfig = equipment.transport
        self.log = log if log is not None else EquipmentLog(equipment)
        self.now = now
        self.verify_max_stream_bytes = verify_max_stream_bytes
        self.connect_timeout_s = connect_timeout_s
        self.io_timeout_s = io_timeout_s
        self.multiplex = multiplex
        self.prefer_aes_gcm = prefer_aes_gcm
        #: run path -> hashes the remote took while the last push of that run was sent
        self._sent_hashes: dict[str, bytes] = {}

    # ----------------------------------------------------------------- tools

    def _tool(self, name: str) -> str:
        found = shutil.which(name)
        if found is None:
            raise TransportError(K.UNKNOWN, f"{name} is not installed (not found on PATH)")
        return found

    def _ssh_argv(self, connect_timeout_s: float | None = None) -> list[str]:
        cfg = self.config
        argv = [
            self._tool("ssh"),
            "-i",
            _ssh_path(cfg.ssh_key_path),
            "-p",
            str(cfg.ssh_port),
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"ConnectTimeout={max(1, round(connect_timeout_s or self.connect_timeout_s))}",
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "ServerAliveCountMax=4",
        ]
        if cfg.ssh_known_hosts is not None:
            known = _ssh_path(cfg.ssh_known_hosts)
            argv += ["-o", f'UserKnownHostsFile="{known}"' if " " in known else f"UserKnownHostsFile={known}"]
        if self.prefer_aes_gcm:
            key = self._host_key()
            if key not in _CIPHERS:
                _CIPHERS[key] = preferred_ciphers(argv, cfg.ssh_target)
            if _CIPHERS[key]:
                argv += ["-o", f"Ciphers={_CIPHERS[key]}"]
        if self.multiplex:
            # Reuse one authenticated connection for the listing, the transfer
            # and the hashing of a run (a handshake costs ~0.1-0.3 s each).
            control = _control_path(self._host_key()).replace("%", "%%")
            argv += ["-o", "ControlMaster=auto", "-o", f"ControlPath={control}", "-o", "ControlPersist=20"]
        return argv

    def _rsync_base(self) -> list[str]:
        rsync = self._tool("rsync")
        version = rsync_version(rsync)
        if version < (3, 2, 3):
            raise TransportError(K.UNKNOWN, f"rsync {'.'.join(map(str, version))} is too old: 3.2.3 or later is needed")
        rsh = " ".join(_rsh_word(word) for word in self._ssh_argv())
        # Remote paths must never be split or expanded by the remote shell:
        # rsync >= 3.2.4 escapes them itself (which restricted servers such as
        # rrsync accept); older ones need -s, which sends them in the protocol.
        protect = ["-s"] if version < (3, 2, 4) else []
        return [rsync, *protect, "--no-h", f"--timeout={self.io_timeout_s}", "-e", rsh]

    def _target(self, remote_path: str) -> str:
        """``host:path/`` for rsync, ``path`` named literally (see :func:`remote_path_arg`)."""
        protected = rsync_version(self._tool("rsync")) < (3, 2, 4)  # -s: see _rsync_base
        return f"{self.config.ssh_target}:{remote_path_arg(remote_path.rstrip('/'), protected=protected)}/"

    def _host_key(self) -> tuple[str, int, str, str]:
        cfg = self.config
        return (cfg.ssh_target, cfg.ssh_port, str(cfg.ssh_key_path), str(cfg.ssh_known_hosts or ""))

    async def _ssh(
        self,
        command: str,
        *,
        run_path: object,
        step: str,
        stdin: bytes | None = None,
        timeout: float | None = None,
        connect_timeout_s: float | None = None,
        quiet: bool = False,
    ) -> ToolResult:
        argv = [*self._ssh_argv(connect_timeout_s), self.config.ssh_target, command]
        return await run_tool(
            argv, stdin=stdin, timeout=timeout, log=self.log, run_path=run_path, step=step, quiet=quiet
        )

    # ------------------------------------------------------------------ push

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
        remote_run = self.remote_run_path(run_path)
        self._sent_hashes.pop(str(run_path), None)
        # The remote listing (a round trip, and the ssh handshake) runs while the local run is walked;
        # a run folder the NAS does not have yet is made right away (nothing can conflict in it).
        listing_task = asyncio.ensure_future(self._list_or_make(run_path, remote_run))
        try:
            # The run's own name twins too (20,000 names folded: 40 ms) while the listing is out.
            local, twins = await asyncio.to_thread(_tree_and_twins, run_path)
            rewrite_paths = sorted(checked_rewrite(local, rewrite))
        except BaseException:
            listing_task.cancel()
            with contextlib.suppress(BaseException):
                await listing_task
            raise
        # The local hashes are taken beside the transfer, from the same listing (one walk of the run).
        report_total(progress, sum(local.files.values()))

        async def send() -> tuple[int, int]:
            try:
                listing = await listing_task
            except BaseException:
                listing_task.cancel()
                raise
            return await self._push_listed(
                run_path,
                remote_run,
                local,
                twins,
                listing,
                rewrite_paths,
                bwlimit_kibps,
                progress,
                cleaned,
                own=own_manifests,
                keep_stamp=previous_stamp,
                fresh=fresh,
                claim=claim,
                owner=owner,
            )

        (files_sent, bytes_sent), local_hashes = await hashed_beside(run_path, local, send)
        self.log.info(
            run_path, "push_done", transport="rsync_ssh", remote=remote_run, files=files_sent, bytes=bytes_sent
        )
        return TransportResult(ok=True, files_sent=files_sent, bytes_sent=bytes_sent, local_hashes=local_hashes)

    async def _push_listed(
        self,
        run_path: Path,
        remote_run: str,
        local: LocalTree,
        twins: tuple[str, str] | None,
        listing: dict[str, _Entry] | None,
        rewrite_paths: list[str],
        bwlimit_kibps: int | None,
        progress: ProgressCallback | None,
        cleaned: frozenset[str],
        *,
        own: Collection[str] | None = None,
        keep_stamp: str | None = None,
        fresh: bool = False,
        claim: Callable[[], None] | None = None,
        owner: str | None = None,
    ) -> tuple[int, int]:
        """The push once both listings are in: the conflict checks, then rsync; (files, bytes) sent."""
        extras = _sort_extras(local, listing or {}, cleaned, fresh=fresh, verified=lambda: _verified_paths(run_path))
        if extras.foreign:
            error = conflict_error(remote_run, extras.foreign)
            self.log.error(run_path, "remote_conflict", remote=remote_run, foreign_files=len(extras.foreign))
            raise error
        if own is not None and listing is not None and NAS_MANIFEST in listing and listing[NAS_MANIFEST].kind == "f":
            try:
                # The listing just showed the manifest: pulled without listing the run again.
                pull = lambda run, paths, into: self._pull(run, remote_run, sorted(paths), into)  # noqa: E731
                await check_owner(run_path, remote_run, pull, own)
            except TransportError as error:
                self.log.error(run_path, "remote_conflict", remote=remote_run, error=error.message)
                raise
        elif (
            error := ownership_error(
                remote_run,
                claimed=extras.claimed,
                markers=claim_markers(path for path, entry in (listing or {}).items() if entry.kind == FILE),
                owner=owner,
                fresh=fresh,
            )
        ) is not None:
            self.log.error(run_path, "remote_conflict", remote=remote_run, error=error.message)
            raise error
        if keep_stamp is not None and listing is not None and keep_stamp in previous_stamps(listing):
            raise PreviousStampTaken(keep_stamp, remote_run)  # --backup-dir would replace what it keeps
        await self._check_folding(run_path, remote_run, local, twins, listing)  # before the claim and any write
        if claim is not None:
            await asyncio.to_thread(claim)  # durably, before anything is written in the NAS folder
        mine = None if owner is None else claim_path(owner)
        made = listing is not None
        if mine is not None and not (listing is not None and mine in listing and listing[mine].kind == FILE):
            await self._send_claim(run_path, remote_run, mine)  # before any file of the run
            made = True  # the claim's rsync made the run folder
        junk = extras.leftovers

        if self._host_key() not in _HOST_TOOLS:
            # Learn the host's SHA-256 tool while rsync runs (the verify pass needs it next);
            # a failed probe is simply asked again by remote_manifest.
            probing = asyncio.ensure_future(self.hash_tool(run_path))
            probing.add_done_callback(lambda task: task.cancelled() or task.exception())

        files_sent = bytes_sent = 0
        # The verified manifest goes only with the metadata push after its VERIFIED is recorded
        # (see MountTransport._push_steps).
        kept = ["-a", "--no-links", "--no-D", f"--exclude=/{NAS_MANIFEST}", _NOT_DATA]
        common = [*kept, *_partial_args(local, cleaned), "--stats"]
        if keep_stamp is not None:
            # A run verified before: rsync itself moves every file it replaces under previous/<stamp>/
            # (relative to the run folder, whatever the stream), deciding from its own look at the
            # files, not from a check made earlier. Its .exlab-wizard/ is left to the metadata push
            # after the verification (it would be kept there too, and it is no data).
            common += [
                f"--exclude=/{METADATA_DIR}/",
                "--backup",
                f"--backup-dir={PREVIOUS_DIR}/{check_previous_stamp(keep_stamp)}",
            ]
        if rewrite_paths:
            result = await self._rsync_following_schedule(
                run_path,
                [*common, "-I", "--whole-file", "--files-from=-", "--from0"],
                remote_run,
                bwlimit_kibps,
                stdin=_files_from(rewrite_paths),
                progress=progress,
                step="rewrite",
            )
            files_sent, bytes_sent = _stats(result.stdout)
        watcher = await self._hash_while_sending(
            run_path, remote_run, local, listing or {}, full_speed=self._limit_now(bwlimit_kibps, self.now()) is None
        )
        # Into a run folder this push has just made, files are written in place: there is no NAS
        # copy to keep whole until the new one is complete, and rsync's temporary file and rename
        # per file cost a fifth of a push of small files. A push cut off leaves partial files
        # under their own names, without their mtimes: the next push, into a folder that exists,
        # sends them again the usual way (temporary file, rename).
        sending = common if listing is not None else [*kept, "--inplace", "--stats"]
        clamped = await asyncio.to_thread(_clamped_on_nas, run_path, local, listing or {})
        try:
            with _excluded(clamped) as excluding:
                files, size = await self._send(
                    run_path,
                    [*sending, *excluding],
                    remote_run,
                    bwlimit_kibps,
                    local,
                    progress,
                    made=made,
                    streams=keep_stamp is None,  # streams would race to make the same backup folders
                )
        except BaseException:
            if watcher is not None:
                await asyncio.shield(watcher.abort())
            raise
        if watcher is not None and (sent := await watcher.finish()):
            self._sent_hashes[str(run_path)] = sent
        files_sent, bytes_sent = files_sent + files, bytes_sent + size
        if junk:
            await self._remove_leftovers(run_path, remote_run, junk)
        return files_sent, bytes_sent

    async def _check_folding(
        self,
        run_path: Path,
        remote_run: str,
        local: LocalTree,
        twins: tuple[str, str] | None,
        listing: dict[str, _Entry] | None,
    ) -> None:
        """Raise ``REMOTE_WRITE_REFUSED`` for a run whose names would meet another name on the NAS.

        rsync looks names up exactly on the NAS, and a NAS that folds letter
        case (SMB, exFAT, macOS) finds its ``A.tif`` for the run's ``a.tif``:
        the late ``a.tif`` lands on the verified ``A.tif``. Two entries of one
        run folder whose names fold alike are refused when the NAS folds case
        (:meth:`_nas_folds_case`); a path of the run the NAS folder does not
        hold by its name while it holds one of another spelling, when the NAS
        finds a file under the run's spelling. A NAS that tells them apart
        takes both. ``twins``: :func:`tree_fold_twins` of ``local``.
        """
        remote = listing or {}
        clash = fold_clash(local.files, local.dirs, remote)
        found = clash is not None and await self._resolves(
            run_path, f"{remote_run.rstrip('/')}/{clash_lookup(clash, remote)}"
        )
        if twins is not None and (found or await self._nas_folds_case(run_path, listing is not None)):
            raise twins_refused(twins)
        if found:
            assert clash is not None
            raise clash_refused(clash)

    async def _nas_folds_case(self, run_path: Path, run_folder_there: bool) -> bool:
        """Does the NAS take names that differ in letter case for one? Asked once per host and remote root.

        As the mount transport asks its share: the deepest folder of the run's
        path below the remote root (the run folder when ``run_folder_there``)
        whose name has a cased (ASCII) letter, listed in its parent, is looked up under
        its name with the case swapped: found while the parent lists only the
        one name, the NAS folds. With rsync's own listing, so an rrsync
        account answers too. No such folder: True, the safe side (not kept).
        """
        key = (*self._host_key(), self.config.remote_root)
        if key in _HOST_FOLDS_CASE:
            return _HOST_FOLDS_CASE[key]
        parts = remote_relpath(self.equipment, run_path).parts
        root = self.config.remote_root.rstrip("/")
        for depth in range(len(parts) if run_folder_there else len(parts) - 1, 0, -1):
            name = parts[depth - 1]
            twin = name.swapcase()
            if twin == name or not name.isascii():  # "ß".swapcase() is "SS": no twin a NAS would fold
                continue
            parent = "/".join([root, *parts[: depth - 1]])
            entries = await self._list_remote(run_path, parent, step="fold_check", recursive=False)
            if entries is None or name not in entries:
                continue
            folds = twin not in entries and await self._resolves(run_path, f"{parent}/{twin}")
            _HOST_FOLDS_CASE[key] = folds
            self.log.info(run_path, "remote_folds_case", host=self.config.ssh_target, folds=folds, asked=name)
            return folds
        return True

    async def _resolves(self, run_path: Path, remote_path: str) -> bool:
        """Does the NAS find an entry at ``remote_path`` (itself listed, not its contents)?"""
        target = self._target(remote_path)[:-1]  # without the slash: the entry itself, a file too
        argv = [*self._rsync_base(), "--list-only", target]
        result = await run_tool(
            argv, log=self.log, run_path=run_path, step="fold_check", quiet=True, env=_listing_env()
        )
        if result.returncode == 0:
            return True
        if result.returncode == 23 and _MISSING_DIR_RE.search(result.stderr_text):
            return False
        raise _listing_error(result, remote_path)

    async def _send_claim(self, run_path: Path, remote_run: str, claim: str) -> None:
        """``claim`` (``.exlab-wizard/claims/<job id>``) into the remote run folder, its folders made as needed.

        One rsync of a file made for it (``--files-from``: the folders on its
        path come along). The run folder itself is made when missing (its
        parent exists: a push's own rsync would make it the same way).
        """
        with tempfile.TemporaryDirectory(prefix="exlab-claim-") as scratch:
            local = Path(scratch) / claim
            local.parent.mkdir(parents=True)
            local.write_bytes(claim_body(self.equipment.id, run_path))
            await self._rsync_following_schedule(
                run_path,
                ["-a", "--no-links", "--no-D", "--files-from=-", "--from0"],
                remote_run,
                None,
                stdin=_files_from([claim]),
                step="claim",
                source=Path(scratch),
            )

    async def _list_or_make(self, run_path: Path, remote_run: str) -> dict[str, _Entry] | None:
        """The remote run folder's entries; None when it is missing, and then the push can make it.

        When its parent was just listed, the push's own rsync makes the run
        folder (one ``mkdir`` in a folder that exists, hence below the root);
        otherwise the folder chain is made here (:meth:`_make_run_folder`). So
        it is for a path holding a wildcard character: rsync is given it as a
        pattern (:func:`remote_path_arg`), which names a folder only once it
        exists. Never before the listing: ``rsync -d`` would replace a file in
        the folder's place on the NAS. A login shell that refuses a pattern
        matching nothing (zsh, csh) refuses the listing of such a folder while
        it is missing: its run waits (``network``), a known limit.
        """
        await self._require_marker(run_path)  # before the listing the push trusts, and any write
        listing, parent_listed = await self._list_run_folder(run_path, remote_run)
        if listing is None and (not parent_listed or _WILDCARD_RE.search(remote_run)):
            await self._make_run_folder(run_path)
        return listing

    async def push_metadata(self, run_path: Path, *, bwlimit_kibps: int | None = None) -> TransportResult:
        """``rsync -a -I`` of ``<run>/.exlab-wizard/`` to the remote run folder's ``.exlab-wizard/``.

        The data files are neither listed nor compared; everything in the
        remote ``.exlab-wizard/`` is ours, so no conflict check. Every file is
        sent (``-I``: rsync's size-and-mtime check compares whole seconds, and
        a rewritten ``checksums.sha256`` keeps its size). rsync writes each
        file to a temporary name and renames it (its partial-dir is in the
        engine's own folder, where no run data are); ssh options, bandwidth
        schedule and error classification as for push(). The remote
        ``.exlab-wizard/`` is made first with the run folder, so the
        destination exists (:func:`remote_path_arg`).
        """
        run_path, source = local_metadata_folder(run_path)
        remote_meta = f"{self.remote_run_path(run_path).rstrip('/')}/{METADATA_DIR}"
        await self._require_marker(run_path)
        await self._make_run_folder(run_path, METADATA_DIR)
        args = ["-a", "-I", "--no-links", "--no-D", "--partial", f"--partial-dir={PARTIAL_DIR}", "--stats"]
        result = await self._rsync_following_schedule(
            run_path, args, remote_meta, bwlimit_kibps, step="push_metadata", source=source
        )
        files_sent, bytes_sent = _stats(result.stdout)
        self.log.info(
            run_path,
            "push_done",
            transport="rsync_ssh",
            remote=remote_meta,
            files=files_sent,
            bytes=bytes_sent,
            scope=METADATA_DIR,
        )
        return TransportResult(ok=True, files_sent=files_sent, bytes_sent=bytes_sent)

    async def _send(
        self,
        run_path: Path,
        common: list[str],
        remote_run: str,
        bwlimit_kibps: int | None,
        local: LocalTree,
        progress: ProgressCallback | None,
        *,
        made: bool = True,
        streams: bool = True,
    ) -> tuple[int, int]:
        """The push proper; (files, bytes) sent. ``made``: the run folder is known to exist on the NAS.

        One rsync for a small run, a run of small files (their per-file round
        trips bind it, and two rsyncs would only share the CPU they need) or one
        sent under a bandwidth limit. Otherwise ``PUSH_STREAMS`` rsyncs run side
        by side over the one ssh connection: one rsync is a pipeline of
        processes that leaves cores idle while it waits on itself. Each stream
        then takes whole top-level entries of the run, recursively (rsync builds
        its file list as it goes, so sending starts at once); see
        :meth:`_send_top_level`. A run whose top level cannot be shared out
        fairly goes as streams given lists of files (:meth:`_send_listed`).
        Should a bandwidth window open meanwhile, each stream gets an equal
        share of its limit. The first stream to fail stops the others.
        """
        if streams and self._limit_now(bwlimit_kibps, self.now()) is None and _wants_streams(local.files):
            units = _split_top_level(run_path, local, PUSH_STREAMS)
            if len(units) >= 2:
                return await self._send_top_level(run_path, common, remote_run, units, progress, made=made)
            groups = _split_for_streams(local.files, PUSH_STREAMS)
            if len(groups) >= 2:
                return await self._send_listed(run_path, common, remote_run, groups, progress)
        result = await self._rsync_following_schedule(
            run_path, [*common, "--info=progress2"], remote_run, bwlimit_kibps, progress=progress, step="push"
        )
        return _stats(result.stdout)

    async def _send_top_level(
        self,
        run_path: Path,
        common: list[str],
        remote_run: str,
        units: list[list[str]],
        progress: ProgressCallback | None,
        *,
        made: bool = True,
    ) -> tuple[int, int]:
        """Streams over the run's top-level entries: the first sends all but the others' entries.

        Each entry (file or folder, with everything below it) belongs to one
        stream, so no folder is written by two streams but the run folder
        itself, which is writable by us (see :func:`_split_top_level`). Names go
        as rsync filter patterns anchored at the run folder (``/name``), NUL-
        separated; a name rsync would read as a wildcard stays with the first
        stream. The run folder's own mtime needs no pass of its own at the end:
        each stream's rsync puts it back once it has written its last entry
        (rsync's touch-up of folder times, which compares them first), so the
        last stream to end does so after every write of either.
        """
        lists, stdins = _top_level_filters(units)
        run_folder_only = [*common, "--no-recursive", "--dirs", "--exclude=*"]
        if not made:  # one rsync makes the run folder, not every stream racing to
            await self._rsync_following_schedule(run_path, run_folder_only, remote_run, None, step="push_run_folder")
        results = await gather_or_cancel(
            *(
                self._rsync_following_schedule(
                    run_path,
                    [*common, "--info=progress2", *args],
                    remote_run,
                    None,
                    stdin=stdin,
                    progress=progress,
                    step=f"push:{number}/{len(units)}",
                    streams=len(units),
                )
                for number, (args, stdin) in enumerate(zip(lists, stdins, strict=True), 1)
            )
        )
        return _sum_stats(results)

    async def _send_listed(
        self,
        run_path: Path,
        common: list[str],
        remote_run: str,
        groups: list[list[str]],
        progress: ProgressCallback | None,
    ) -> tuple[int, int]:
        """Streams given their files by list (``--files-from``), balanced by size.

        A pass that sends only the folders (all of them, the empty ones too)
        runs first, so no two streams race to create one, and again at the end,
        to give the folders their mtimes back after the streams wrote into them.
        """
        # Folders stay writable by us while the streams run (one stream finishing would
        # otherwise give a read-only folder its mode while the other still writes into
        # it); the last pass gives every folder its own mode and mtime.
        writable = "--chmod=Du+rwx"
        folders_only = [*common, "--include=*/", "--exclude=*"]
        await self._rsync_following_schedule(run_path, [*folders_only, writable], remote_run, None, step="push_folders")
        args = [*common, writable, "--info=progress2", "--files-from=-", "--from0"]
        results = await gather_or_cancel(
            *(
                self._rsync_following_schedule(
                    run_path,
                    args,
                    remote_run,
                    None,
                    stdin=_files_from(group),
                    progress=progress,
                    step=f"push:{number}/{len(groups)}",
                    streams=len(groups),
                )
                for number, group in enumerate(groups, 1)
            )
        )
        await self._rsync_following_schedule(run_path, folders_only, remote_run, None, step="push_folders")
        return _sum_stats(results)

    async def _hash_while_sending(
        self, run_path: Path, remote_run: str, local: LocalTree, remote: dict[str, _Entry], *, full_speed: bool
    ) -> _RemoteWatcher | None:
        """Start hashing, on the remote, the large files this push sends, each as soon as it lands;
        and, for a large push at ``full_speed``, flushing the NAS while it runs (``FLUSH_WHILE_SENDING_S``).

        Only where python3 may run remotely (not a host known to refuse commands
        or to lack python3); a remote without it simply yields nothing, and every
        file it did not hash is hashed by the verify pass as before (which
        flushes the run's filesystem itself, whatever was flushed here).
        """
        tool = _HOST_TOOLS.get(self._host_key(), "python3")
        if tool is None or not tool.startswith("python3"):
            return None
        header, sending = await asyncio.to_thread(_watch_header, run_path, local, remote)
        flush = FLUSH_WHILE_SENDING_S if full_speed and sending >= FLUSH_WHILE_SENDING_MIN_BYTES else 0
        if not header and not flush:
            return None
        argv = [
            *self._ssh_argv(),
            self.config.ssh_target,
            remote_line(f"python3 -c {shlex.quote(_PY_WATCH)} {shlex.quote(remote_run)} {flush}"),
        ]
        watcher = _RemoteWatcher()
        try:
            await watcher.start(argv, header + b"\0" if header else b"\0\0")
        except OSError:
            return None
        return watcher

    async def _rsync_following_schedule(
        self,
        run_path: Path,
        args: list[str],
        remote_run: str,
        bwlimit_kibps: int | None,
        *,
        stdin: bytes | None = None,
        progress: ProgressCallback | None = None,
        step: str,
        source: Path | None = None,
        streams: int = 1,
    ) -> ToolResult:
        """Run rsync, restarting it with the new ``--bwlimit`` at each window edge.

        The wait for the next edge runs on the monotonic clock; besides it, the
        limit by the wall clock is read every :data:`SCHEDULE_CHECK_S`, and
        rsync is restarted as soon as it differs from the one it runs with
        (the clock was stepped: NTP, an operator setting the date).

        Sends the contents of ``source`` (default: the run folder) into
        ``remote_run``. ``streams``: how many rsyncs share the limit (each
        gets ``limit / streams``). Each rsync takes the limit in force when it
        starts (:meth:`_limit_now`), not the one ``bwlimit_kibps`` had when the
        push began: a window that opened meanwhile (while the run was listed,
        or a file re-sent) applies from the first byte.
        """
        bandwidth = self.config.bandwidth
        files_total = bytes_total = 0
        reached: dt.datetime | None = None  # the edge last stopped at: its time has come, whatever now() says
        while True:
            now = self.now() if reached is None else max(self.now(), reached)
            limit = self._limit_now(bwlimit_kibps, now)
            edge = next_change(bandwidth, now)
            if edge is not None and edge <= now:
                # next_change never answers so; should it, rsync is not stopped every instant for it
                # but runs on and looks at the schedule again a while later.
                self.log.warning(run_path, "bandwidth_edge_in_past", step=step, edge=edge.isoformat())
                stop_after: float | None = EDGE_RECHECK_S
                edge = None
            else:
                stop_after = max(0.05, (edge - now).total_seconds()) if edge is not None else None
            argv = [*self._rsync_base(), *args]
            if limit is not None:
                argv.append(f"--bwlimit={max(1, int(limit / streams))}")
            argv += [f"{source or run_path}/", self._target(remote_run)]
            stepped: list[dt.datetime] = []  # the wall-clock time at which the limit was seen to differ

            def limit_moved(limit: int | None = limit, stepped: list[dt.datetime] = stepped) -> bool:
                wall = self.now()
                if self._limit_now(bwlimit_kibps, wall) == limit:
                    return False
                stepped.append(wall)
                return True

            result = await run_tool(
                argv,
                stdin=stdin,
                stop_after=stop_after,
                stop_if=limit_moved,
                check_every=SCHEDULE_CHECK_S,
                on_stdout=_ProgressParser(progress),
                stdout_every=None if progress is None else PROGRESS_READ_S,
                log=self.log,
                run_path=run_path,
                step=step,
            )
            if result.stopped and not result.timed_out:
                # Stopped at the edge: its time has come. Stopped on a changed limit: the wall clock rules again.
                reached = None if stepped else edge
                at = stepped[-1] if stepped else (self.now() if edge is None else max(self.now(), edge))
                self.log.info(
                    run_path,
                    "bandwidth_window_edge",
                    step=step,
                    old_kibps=limit or "unlimited",
                    new_kibps=self._limit_now(bwlimit_kibps, at) or "unlimited",
                    **({"clock_stepped": at.isoformat()} if stepped else {}),
                )
                files, size = _stats(result.stdout)
                files_total, bytes_total = files_total + files, bytes_total + size
                continue
            if result.returncode != 0:
                await self._raise_if_root_missing(run_path)
                raise push_error("rsync", result.returncode, result.stderr_text, f"rsync {step} to {remote_run}")
            if files_total or bytes_total:
                files, size = _stats(result.stdout)
                result.stdout += (
                    f"\nNumber of regular files transferred: {files + files_total}\n"
                    f"Total transferred file size: {size + bytes_total} bytes\n"
                ).encode()
            return result

    def _limit_now(self, given: int | None, now: dt.datetime) -> int | None:
        """The limit (KiB/s, None: unlimited) for an rsync starting at ``now``: the equipment's schedule's,
        when it has a limit; else ``given`` (a push asked to go slow by its caller)."""
        bandwidth = self.config.bandwidth
        return given if bandwidth.upload_mbps is None else limit_kibps(bandwidth, now)

    async def _make_run_folder(self, run_path: Path, *inside: str) -> None:
        """Create the remote run folder and its missing parents below the remote root, never the root.

        ``inside``: folders of the run (relative, local ones) made with it.

        rsync's ``--mkpath`` would create every missing folder of the destination,
        the root too: on a NAS whose data volume is not mounted that is a fresh,
        empty folder on the NAS's system disk, which a push would fill and the
        verify pass then accept, and cleanup would delete the only other copy
        (rule 3). So no rsync of a push has ``--mkpath``. This one sends the run's
        folder chain alone (``-d --files-from``: folders, no files, no attributes)
        to ``<root>/.``: rsync creates a missing destination with one ``mkdir``,
        and ``mkdir <root>/.`` fails (ENOENT) when the root is missing, so the
        check and the creation are one step, with no window between them, and it
        needs no remote command (an rrsync account works too). The rsyncs that
        follow create at most the run folder itself, whose parent exists only
        below the root. A missing root raises ``NETWORK``.
        """
        rel = remote_relpath(self.equipment, run_path).as_posix()
        root = self.config.remote_root.rstrip("/")
        argv = [
            *self._rsync_base(),
            "-d",
            "--files-from=-",
            "--from0",
            f"{os.path.abspath(self.equipment.equipment_root)}/",
            self._target(f"{root}/."),
        ]
        chain = [rel, *(f"{rel}/{folder}" for folder in inside)]
        result = await run_tool(argv, stdin=_files_from(chain), log=self.log, run_path=run_path, step="make_run_folder")
        if result.returncode != 0:
            await self._raise_if_root_missing(run_path)
            raise push_error("rsync", result.returncode, result.stderr_text, f"creating {rel} under {root}")

    def _marker_path(self) -> str | None:
        """``<remote_path>/<remote_marker>``; None when no marker is configured."""
        marker = self.config.remote_marker
        return None if marker is None else f"{self.config.remote_root.rstrip('/')}/{marker}"

    async def _require_marker(self, run_path: object) -> None:
        """``NETWORK`` unless ``remote_marker`` (when configured) is in ``remote_path``.

        As the mount transport's ``mount_marker``: a ``remote_path`` that is
        the NAS data volume's own mount point is there, empty, while the volume
        is not mounted (``test -d`` answers); only the marker touched on the
        mounted volume tells them apart. Checked before anything is written and
        after every look at the NAS (listing, manifest, fetch), so that a bare
        mount point is never taken for an empty NAS. rsync's own listing of the
        marker (no remote command: an rrsync account answers too), over sftp
        where the account may not run rsync. Never created here.
        """
        marker = self._marker_path()
        if marker is None:
            return
        result = await run_tool(
            [*self._rsync_base(), "--list-only", self._target(marker)[:-1]],
            log=self.log,
            run_path=run_path,
            step="marker_check",
            quiet=True,
            env=_listing_env(),
        )
        if result.returncode == 0:
            return
        if not (result.returncode == 23 and _MISSING_DIR_RE.search(result.stderr_text)):
            found = classify("rsync", result.returncode, result.stderr_text)
            if found.rule is None or found.rule.why != _REFUSES_RSYNC:
                raise _listing_error(result, marker)
            if await self._sftp_marker(run_path, marker):
                return
        raise TransportError(
            K.NETWORK,
            f"remote unreachable: {self.config.remote_root} on {self.config.ssh_target} is not mounted "
            f"(no {self.config.remote_marker})",
        )

    def _sftp_fs(self, path: str) -> str:
        """rclone's on-the-fly sftp remote for ``path`` on this host, with this key and known_hosts."""
        from exlab_wizard.sync.transports.rclone import sftp_connection_string

        cfg = self.config
        user, _, host = cfg.ssh_target.rpartition("@")
        known = cfg.ssh_known_hosts or Path("~/.ssh/known_hosts").expanduser()
        return sftp_connection_string(
            host=host, port=cfg.ssh_port, user=user, key_file=cfg.ssh_key_path, known_hosts_file=known, path=path
        )

    async def _sftp_marker(self, run_path: object, marker: str) -> bool:
        from exlab_wizard.sync.transports.rclone import marker_present, rclone_binary

        fs = self._sftp_fs(marker)
        return await marker_present([rclone_binary(), "--config", os.devnull], fs, log=self.log, run_path=run_path)

    async def _raise_if_root_missing(self, run_path: Path) -> None:
        """``NETWORK`` when the remote root does not exist (asked after a write failed)."""
        root = self.config.remote_root
        try:
            missing = await self._list_remote(run_path, root, step="root_check", recursive=False) is None
        except TransportError:
            return  # the write's own error says more
        if missing:
            raise TransportError(K.NETWORK, f"remote root {root} is missing: the NAS volume may not be mounted")

    async def _list_run_folder(self, run_path: Path, remote_run: str) -> tuple[dict[str, _Entry] | None, bool]:
        """The run folder's entries (None when it is missing), found through its parent; and was the parent listed.

        A listing of a missing folder is an rsync error, and an rsync server
        pauses 0.1 s before it exits with one: every new run would pay it.
        Listing the parent's own entries (``-d``, not recursive) answers
        "missing" without an error when the parent exists; a run folder that
        is there is then listed itself. The run's own entry, of any kind, is
        looked at: a file or symlink in its place on the NAS is a conflict,
        never a missing folder to make (a symlink would lead the push
        elsewhere). A sibling whose name differs from the run's only in letter
        case or Unicode form is the run's own folder on a NAS that folds
        names (SMB, exFAT, macOS), another run's: the run's path is then
        listed as the NAS resolves it, never taken for missing. A name holding
        a line break is listed directly, as before.
        """
        parent, _sep, name = remote_run.rstrip("/").rpartition("/")
        if not parent or not name or "\n" in name or "\r" in name:
            return await self._list_remote(run_path, remote_run, step="conflict_check", times=True), False
        entries = await self._list_remote(run_path, parent, step="conflict_check", recursive=False)
        if entries is None:
            return None, False  # the parent is missing too
        top = entries.get(name)
        if top is None:
            folded = folded_name(name)
            if not any(folded_name(other) == folded for other in entries):
                return None, True
            return await self._list_remote(run_path, remote_run, step="conflict_check", times=True), False
        if top.kind != "d":
            raise conflict_error(remote_run, ["."])
        return await self._list_remote(run_path, remote_run, step="conflict_check", times=True), True

    async def _list_remote(
        self, run_path: Path, remote_path: str, *, step: str, recursive: bool = True, times: bool = False
    ) -> dict[str, _Entry] | None:
        """The remote folder's entries, or None when the folder does not exist; ``times``: with their mtimes."""
        result = await self._list_remote_raw(run_path, remote_path, step=step, recursive=recursive)
        if result.returncode == 0:
            return parse_listing(result.stdout, times=times)
        if result.returncode == 23 and _MISSING_DIR_RE.search(result.stderr_text):
            return None
        raise _listing_error(result, remote_path)

    async def _list_remote_raw(
        self, run_path: Path, remote_path: str, *, step: str, recursive: bool = True
    ) -> ToolResult:
        argv = [*self._rsync_base(), "--list-only", *(["-r"] if recursive else []), self._target(remote_path)]
        return await run_tool(argv, log=self.log, run_path=run_path, step=step, quiet=True, env=_listing_env())

    async def _remove_leftovers(self, run_path: Path, remote_run: str, junk: list[str]) -> None:
        """Delete rsync's leftovers of interrupted pushes (exact paths, never a pattern).

        Each is named, missing, from an empty folder that holds only the
        folders above it: ``--delete-missing-args`` needs those on the sending
        side, and a ``.rsync-partial/`` may be left in a folder the run no
        longer has (rsync then failed "file has vanished" after the push).
        """
        with tempfile.TemporaryDirectory(prefix="exlab-leftovers-") as scratch:
            for path in junk:
                os.makedirs(os.path.join(scratch, os.path.dirname(path)), exist_ok=True)
            argv = [
                *self._rsync_base(),
                "-r",
                "--no-links",
                "--delete-missing-args",
                "--force",
                "--files-from=-",
                "--from0",
                f"{scratch}/",
                self._target(remote_run),
            ]
            result = await run_tool(
                argv, stdin=_files_from(junk), log=self.log, run_path=run_path, step="remove_leftovers"
            )
        if result.returncode != 0:
            raise push_error("rsync", result.returncode, result.stderr_text, f"removing leftovers in {remote_run}")
        self.log.info(run_path, "leftovers_removed", remote=remote_run, count=len(junk))

    # ------------------------------------------------------- remote manifest

    async def remote_manifest(self, run_path: Path) -> RemoteManifest:
        run_path = Path(os.path.abspath(run_path))
        manifest = await self._remote_manifest(run_path)
        await self._require_marker(run_path)  # hashes of a bare mount point are no NAS copy
        return manifest

    async def _remote_manifest(self, run_path: Path) -> RemoteManifest:
        remote_run = self.remote_run_path(run_path)
        tool = await self.hash_tool(run_path)
        if tool is None:
            return await self._streamed_manifest(run_path, remote_run)  # refuses commands: nothing to flush with
        args = f"{shlex.quote(remote_run)} {shlex.quote(self.config.remote_root)}"
        if tool == SYNC_THEN_STREAM:
            # Runs commands but has no hashing tool: flush the run there, then read it back.
            command = remote_line(f"sh -c {shlex.quote(_SH_ENTER + 'exit 0')} sh {args}")
            result = await self._ssh(command, run_path=run_path, step="remote_sync")
            self._raise_for_enter(result, remote_run, "flushing")
            if result.returncode != 0:
                raise transport_error("ssh", result.returncode, result.stderr_text, f"flushing {remote_run}")
            return await self._streamed_manifest(run_path, remote_run)
        sent = self._sent_hashes.pop(str(run_path), b"")
        stdin = sent if tool.startswith("python3") else None
        command = remote_line(_hash_command(tool, args))
        result = await self._ssh(command, run_path=run_path, step=f"remote_hash:{tool}", stdin=stdin)
        self._raise_for_enter(result, remote_run, "hashing")
        if result.returncode == 255 or (result.returncode != 0 and (not result.stdout or tool.startswith("python3"))):
            # remote_hash.py ends non-zero only when it failed part way (a traceback): none of it is read
            raise transport_error("ssh", result.returncode, result.stderr_text, f"hashing {remote_run}")
        manifest = _parse_hashes(tool, result.stdout)
        if result.returncode != 0:
            # some files could not be read (the sh programs' xargs 123): they are absent, hence never verified
            self.log.warning(run_path, "remote_hash_incomplete", rc=result.returncode, hashed=len(manifest.hashes))
        self.log.info(
            run_path,
            "remote_manifest",
            tool=tool,
            files=len(manifest.hashes),
            hashed_while_sending=sent.count(b"\0") if tool.startswith("python3") else 0,
            unverifiable=len(manifest.unverifiable),
        )
        return manifest

    def _raise_for_enter(self, result: ToolResult, remote_run: str, doing: str) -> None:
        """The exits of :data:`_SH_ENTER`: 3, the remote root missing; 6, no ``sync`` that worked."""
        host = self.config.ssh_target
        if result.returncode == 3:
            raise TransportError(K.NETWORK, f"remote root {self.config.remote_root} does not exist on {host}")
        if result.returncode == _SYNC_FAILED:
            raise TransportError(
                K.REMOTE_WRITE_REFUSED,
                f"sync not found or failed on {host} while {doing} {remote_run}: the copy cannot be made "
                f"durable there, so it is not verified ({result.stderr_text.strip()[:200]})",
            )

    async def hash_tool(self, run_path: object = None) -> str | None:
        """The SHA-256 tool used on this host, probed once per host.

        None: the host refuses commands (a forced rrsync or sftp answered);
        :data:`SYNC_THEN_STREAM`: it runs them but no hashing program worked there.
        """
        key = self._host_key()
        if key in _HOST_TOOLS:
            return _HOST_TOOLS[key]
        result = await self._ssh(remote_line(_probe_script()), run_path=run_path, step="probe_hash_tool", timeout=60)
        if result.returncode == 255:
            raise transport_error(
                "ssh", result.returncode, result.stderr_text, f"connecting to {self.config.ssh_target}"
            )
        tool, syncs = _probed_tool(result.stdout)
        if tool is not None and not syncs:
            self.log.warning(
                run_path,
                "remote_sync_missing",
                host=self.config.ssh_target,
                detail="sync not found or failing there: no run can be verified on this NAS until it works",
            )
        shown = {
            None: "none (commands refused: read back and hashed here, no flush on the NAS)",
            SYNC_THEN_STREAM: "none that works (runs commands: flushed with sync, read back and hashed here)",
        }.get(tool, tool)
        self.log.info(run_path, "remote_hash_tool", host=self.config.ssh_target, tool=shown)
        _HOST_TOOLS[key] = tool
        return tool

    async def _streamed_manifest(self, run_path: Path, remote_run: str) -> RemoteManifest:
        """Hash the remote copy here, reading it back with rsync or, failing that, sftp."""
        probe = await self._list_remote_raw(run_path, remote_run, step="stream_list")
        listing: dict[str, _Entry] | None = None
        if probe.returncode == 0:
            listing = parse_listing(probe.stdout)
        elif not (probe.returncode == 23 and _MISSING_DIR_RE.search(probe.stderr_text)):
            found = classify("rsync", probe.returncode, probe.stderr_text)
            if found.rule is not None and found.rule.why == _REFUSES_RSYNC:
                return await self._sftp_manifest(run_path, remote_run)
            raise _listing_error(probe, remote_run)
        if listing is None:
            if (
                await self._list_remote(run_path, self.config.remote_root, step="stream_list_root", recursive=False)
                is None
            ):
                raise TransportError(K.NETWORK, f"remote root {self.config.remote_root} does not exist")
            return RemoteManifest(hashes={})
        hashes: dict[str, str] = {}
        unverifiable: dict[str, str] = {}
        wanted = []
        for path, entry in sorted(listing.items()):
            if entry.kind != "f":
                continue
            if entry.size > self.verify_max_stream_bytes:
                unverifiable[path] = OVERSIZE
            else:
                wanted.append((path, entry.size))
        for batch in _batches(wanted):
            scratch = await asyncio.to_thread(tempfile.mkdtemp, prefix="exlab-verify-")
            try:
                argv = [
                    *self._rsync_base(),
                    "--files-from=-",
                    "--from0",
                    "--no-links",
                    "--no-D",
                    self._target(remote_run),
                    f"{scratch}/",
                ]
                result = await run_tool(
                    argv,
                    stdin=b"\0".join(os.fsencode(p) for p, _ in batch) + b"\0",
                    log=self.log,
                    run_path=run_path,
                    step="stream_pull",
                    quiet=True,
                )
                if result.returncode not in (0, 23, 24):
                    raise pull_error("rsync", result.returncode, result.stderr_text, f"reading back {remote_run}")
                hashes.update(await asyncio.to_thread(_hash_files, scratch, [p for p, _ in batch]))
            finally:
                await asyncio.to_thread(shutil.rmtree, scratch, ignore_errors=True)
            for path, _ in batch:
                if path not in hashes:
                    unverifiable[path] = UNVERIFIABLE_READ_ERROR
        self.log.info(
            run_path, "remote_manifest", tool="rsync_stream", files=len(hashes), unverifiable=len(unverifiable)
        )
        return RemoteManifest(hashes=hashes, unverifiable=unverifiable)

    async def _sftp_manifest(self, run_path: Path, remote_run: str) -> RemoteManifest:
        from exlab_wizard.sync.transports.rclone import download_manifest, rclone_binary

        fs, root_fs = self._sftp_fs(remote_run), self._sftp_fs(self.config.remote_root)
        manifest = await download_manifest(
            [rclone_binary(), "--config", os.devnull],
            fs,
            root_fs,
            self.verify_max_stream_bytes,
            log=self.log,
            run_path=run_path,
            sftp=True,
        )
        self.log.info(
            run_path,
            "remote_manifest",
            tool="sftp_stream",
            files=len(manifest.hashes),
            unverifiable=len(manifest.unverifiable),
        )
        return manifest

    # ------------------------------------------------------- remote listing

    async def remote_listing(self, run_path: Path) -> dict[str, int]:
        """Every regular file of the remote run folder -> its size: ``rsync --list-only -r``.

        rsync escapes every name it lists (a newline, a byte that is not
        UTF-8: ``\\#ooo``), so any name survives; rsync lists, it runs no remote
        command, so a command-refusing (rrsync) account answers too. An account
        that may not run rsync at all (``internal-sftp``) is listed over sftp
        instead. A missing run folder lists nothing when the remote root
        exists; a missing root is ``NETWORK``.
        """
        return {path: info.size for path, info in (await self.remote_stats(run_path)).items()}

    async def remote_stats(self, run_path: Path) -> dict[str, RemoteFile]:
        """As :meth:`remote_listing`, each file with its mtime in whole seconds (as rsync and sftp list it)."""
        run_path = Path(os.path.abspath(run_path))
        stats = await self._remote_stats(run_path)
        await self._require_marker(run_path)  # a listing of a bare mount point is no empty NAS
        return stats

    async def _remote_stats(self, run_path: Path) -> dict[str, RemoteFile]:
        remote_run = self.remote_run_path(run_path)
        result = await self._list_remote_raw(run_path, remote_run, step="remote_listing")
        if result.returncode == 0:
            listing = parse_listing(result.stdout, times=True)
            return {
                path: RemoteFile(entry.size, entry.mtime_s * 1_000_000_000)
                for path, entry in listing.items()
                if entry.kind == "f"
            }
        # The sender of a listing is the NAS: its "change_dir ... No such file" says the run folder
        # is missing there, whatever the exit code (23, or 255 when the connection then dropped),
        # never that a local file vanished. The root is checked below.
        if not _MISSING_DIR_RE.search(result.stderr_text):
            found = classify("rsync", result.returncode, result.stderr_text)
            if found.rule is not None and found.rule.why == _REFUSES_RSYNC:
                return await self._sftp_listing(run_path, remote_run)
            raise _listing_error(result, remote_run)
        root = self.config.remote_root
        if await self._list_remote(run_path, root, step="remote_listing_root", recursive=False) is None:
            raise TransportError(K.NETWORK, f"remote root {root} does not exist on {self.config.ssh_target}")
        return {}

    async def _sftp_listing(self, run_path: Path, remote_run: str) -> dict[str, RemoteFile]:
        from exlab_wizard.sync.transports.rclone import list_stats, rclone_binary

        fs, root_fs = self._sftp_fs(remote_run), self._sftp_fs(self.config.remote_root)
        return await list_stats([rclone_binary(), "--config", os.devnull], fs, root_fs, log=self.log, run_path=run_path)

    # ------------------------------------------------------- fetch, keep previous

    async def fetch(self, run_path: Path, paths: Collection[str], into: Path) -> dict[str, Path]:
        """Pull the named files with rsync (``--files-from``, NUL-separated) into ``into``.

        The remote run folder is listed first: only paths it holds as regular
        files (not below a symlink) are pulled.
        """
        run_path = Path(os.path.abspath(run_path))
        remote_run = self.remote_run_path(run_path)
        wanted = sorted({check_relpath(p) for p in paths}, key=os.fsencode)
        listing = await self._list_remote(run_path, remote_run, step="fetch_list")
        root = self.config.remote_root
        if listing is None and await self._list_remote(run_path, root, step="fetch_root", recursive=False) is None:
            raise TransportError(K.NETWORK, f"remote root {root} does not exist")
        await self._require_marker(run_path)  # before the listing is trusted
        if listing is None:
            return {}
        present = [p for p in wanted if listing.get(p, _Entry("", 0)).kind == "f"]
        return await self._pull(run_path, remote_run, present, into)

    async def _pull(self, run_path: Path, remote_run: str, present: list[str], into: Path) -> dict[str, Path]:
        """Pull ``present`` (regular files a listing just showed) into ``into``; those that arrived."""
        if not present:
            return {}
        argv = [
            *self._rsync_base(),
            "--files-from=-",
            "--from0",
            "--no-links",
            "--no-D",
            self._target(remote_run),
            f"{into}/",
        ]
        result = await run_tool(argv, stdin=_files_from(present), log=self.log, run_path=run_path, step="fetch")
        if result.returncode not in (0, 23, 24):  # 23/24: a file gone meanwhile is simply not fetched
            raise pull_error("rsync", result.returncode, result.stderr_text, f"fetching from {remote_run}")
        return await asyncio.to_thread(_regular_files, {p: Path(into) / p for p in present})

    async def keep_previous(
        self, run_path: Path, paths: Collection[str], stamp: str, *, new: bool = False
    ) -> list[str]:
        """Move the named files on the NAS with ``mv`` through ssh (every path shell-quoted), then ``sync``.

        Needs a remote that runs commands: one that refuses them (rrsync,
        ``internal-sftp``) raises ``REMOTE_WRITE_REFUSED``.
        """
        run_path = Path(os.path.abspath(run_path))
        remote_run = self.remote_run_path(run_path).rstrip("/")
        wanted = sorted({check_relpath(p) for p in paths}, key=os.fsencode)
        keep = f"{remote_run}/{PREVIOUS_DIR}/{check_previous_stamp(stamp)}"
        if not wanted:
            return []
        await self._require_marker(run_path)
        kept_set: set[str] = set()
        for batch in _arg_batches(wanted):
            # Only the first batch checks that the folder is new: the ones after it may find it made by it.
            kept_set |= await self._keep_batch(run_path, remote_run, keep, batch, new=new)
            new = False
        kept = sorted(kept_set, key=os.fsencode)
        if kept:
            self.log.info(run_path, "previous_kept", transport="rsync_ssh", files=len(kept), folder=keep)
        return kept

    async def _keep_batch(
        self, run_path: Path, remote_run: str, keep: str, paths: list[str], *, new: bool = False
    ) -> set[str]:
        words = [self.config.remote_root, remote_run, keep, "new" if new else "again", *paths]
        command = remote_line(f"sh -c {shlex.quote(_SH_KEEP_PREVIOUS)} sh " + " ".join(shlex.quote(w) for w in words))
        result = await self._ssh(command, run_path=run_path, step="keep_previous")
        if result.returncode == 255:
            raise transport_error(
                "ssh", result.returncode, result.stderr_text, f"connecting to {self.config.ssh_target}"
            )
        first, _, records = result.stdout.partition(b"\n")
        if first.strip() != b"exlab-keep":
            raise TransportError(
                K.REMOTE_WRITE_REFUSED,
                f"{self.config.ssh_target} refuses commands: the verified "
                f"files cannot be kept under {keep} (needs a remote that runs mv)",
            )
        if result.returncode == 3:
            raise TransportError(
                K.NETWORK, f"remote root {self.config.remote_root} does not exist on {self.config.ssh_target}"
            )
        if result.returncode == 5:
            raise PreviousStampTaken(keep.rpartition("/")[2], remote_run)
        if result.returncode == _SYNC_FAILED:
            raise TransportError(
                K.REMOTE_WRITE_REFUSED,
                f"sync not found or failed on {self.config.ssh_target} after keeping files under {keep}: "
                f"the moves may not be durable ({result.stderr_text.strip()[:200]})",
            )
        if result.returncode != 0:
            raise TransportError(
                K.REMOTE_WRITE_REFUSED, f"moving verified files under {keep} failed: {result.stderr_text.strip()[:300]}"
            )
        return {os.fsdecode(r) for r in records.split(b"\0") if r}

    # ------------------------------------------------------------- reachable

    async def reachable(self, run_path: Path) -> bool:
        """Is the remote root there (its ``remote_marker``, when one is configured)? Never raises.

        Called per job on every reaper and audit pass, and by the service's
        metrics: a failing probe is written to the equipment log once, then
        again only when it fails another way (the host answers again, its data
        volume not mounted) or after an hour (``QUIET_REPEAT_S``), and once more
        after a success (a weekend outage must not grow the log by a line per
        job per pass; the callers record the wait).
        """
        result = await self._probe()
        if result is None:
            return False
        if new_failure(self.log, f"{self.config.ssh_target}:{self.config.remote_root}", "reachable", result):
            log_tool_exit(self.log, run_path, "reachable", result)
        return result.returncode == 0

    async def _probe(self) -> ToolResult | None:
        """``ssh test -d`` of the root (``test -e`` of its marker, when one is configured), else (a remote
        refusing commands) ``rsync --list-only`` of the same; None: not run."""
        marker = self._marker_path()
        where, test = (self.config.remote_root, "-d") if marker is None else (marker, "-e")
        try:
            argv = [*self._ssh_argv(5), self.config.ssh_target, f"test {test} {shlex.quote(where)}"]
            result = await run_tool(argv, timeout=30, step="reachable")
            if result.returncode not in (0, 255):
                # A remote that refuses commands may still serve rsync: its refusal is no failure to log.
                target = self._target(where) if marker is None else self._target(where)[:-1]
                argv = [*self._rsync_base(), "--list-only", target]
                result = await run_tool(argv, timeout=30, step="reachable")
        except (OSError, TransportError):
            return None
        return result


# --------------------------------------------------------------------- helpers


class _RemoteWatcher:
    """The remote ``_PY_WATCH`` process: fed its file list, stopped by closing its stdin."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.reader: asyncio.Future[bytes] | None = None

    async def start(self, argv: list[str], header: bytes) -> None:
        self.proc = await spawn(
            argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.reader = asyncio.ensure_future(self.proc.stdout.read())
        try:
            self.proc.stdin.write(header)
            await self.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # it could not start (no python3): it yields nothing

    async def finish(self, timeout: float = 300.0) -> bytes:
        """Stop watching; the records of every file hashed so far (``b""`` on any trouble)."""
        assert self.proc is not None and self.reader is not None
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            out = await asyncio.wait_for(asyncio.shield(self.reader), timeout)
            await asyncio.wait_for(self.proc.wait(), 30)
        except (TimeoutError, OSError):
            await self.abort()
            return b""
        except BaseException:
            await asyncio.shield(self.abort())
            raise
        # only whole records of a process that ended well
        return out[: out.rfind(b"\0") + 1] if self.proc.returncode == 0 else b""

    async def abort(self) -> None:
        if self.proc is not None:
            await _stop(self.proc)
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(BaseException):
                await self.reader


class _ProgressParser:
    """Turn rsync ``--info=progress2`` totals into byte deltas for a progress callback."""

    def __init__(self, callback: ProgressCallback | None):
        self.callback = callback
        self.buffer = b""
        self.last = 0

    def __call__(self, chunk: bytes) -> None:
        if self.callback is None:
            return
        # The totals only grow: the last whole progress record of the chunk says it all
        # (rsync writes one per file, 20,000 for a run of 20,000 small files).
        self.buffer += chunk
        end = max(self.buffer.rfind(b"\r"), self.buffer.rfind(b"\n"))
        if end < 0:
            return
        records, self.buffer = self.buffer[:end], self.buffer[end + 1 :]
        for record in reversed(re.split(rb"[\r\n]", records)):
            match = _PROGRESS_RE.match(record)
            if match:
                total = int(match.group(1))
                if total > self.last:
                    self.callback(total - self.last)
                    self.last = total
                return


def _files_from(paths: Iterable[str]) -> bytes:
    """A ``--files-from=- --from0`` list. Each path starts with ``./``: rsync reads a line
    starting with ``#`` or ``;`` as a comment, even NUL-separated."""
    return b"".join(b"./" + os.fsencode(rel) + b"\0" for rel in paths)


def _patterns(names: Iterable[str]) -> bytes:
    """rsync filter patterns matching exactly these top-level names of the run, NUL-separated."""
    return b"".join(b"/" + os.fsencode(name) + b"\0" for name in names)


def _clamped_on_nas(run_path: Path, local: LocalTree, listing: dict[str, _Entry]) -> list[str]:
    """The run's files the NAS holds at their size and at the clamp of their local mtime. Blocking I/O.

    rsync's quick check compares the times itself: a file dated past the NAS
    filesystem's range (:func:`~exlab_wizard.sync.transports.base.clamped_times`)
    would be sent again at every push, and its verified NAS copy kept under
    ``previous/`` each time. Only files listed at a clamp's end are looked at
    here; a name rsync reads as a wildcard (``*?[\\``) cannot be excluded
    exactly and is sent again.
    """
    found = []
    for rel, size in local.files.items():
        entry = listing.get(rel)
        if entry is None or entry.kind != FILE or entry.size != size or _GLOB_CHARS.search(rel):
            continue
        listed_ns = entry.mtime_s * 1_000_000_000
        if listed_ns not in NAS_TIME_ENDS_NS:
            continue
        try:
            mtime_ns = os.lstat(run_path / rel).st_mtime_ns
        except OSError:
            continue  # rsync finds it gone, or sends it
        if listed_ns in clamped_times(mtime_ns):
            found.append(rel)
    return sorted(found)


_GLOB_CHARS = re.compile(r"[*?\[\\]")


@contextlib.contextmanager
def _excluded(paths: list[str]) -> Iterator[list[str]]:
    """rsync options excluding exactly ``paths`` (of the run) from a send, through a file of patterns."""
    if not paths:
        yield []
        return
    with tempfile.NamedTemporaryFile(prefix="exlab-clamped-") as patterns:
        patterns.write(b"".join(b"/" + os.fsencode(rel) + b"\0" for rel in paths))
        patterns.flush()
        yield ["--from0", f"--exclude-from={patterns.name}"]


def _top_level_filters(units: list[list[str]]) -> tuple[list[list[str]], list[bytes]]:
    """Each stream's rsync filter options and standard input: the first excludes the others' entries.

    ``--from0`` comes first: rsync reads an ``--exclude-from`` or ``--include-from``
    file as soon as it meets the option, with the separator in force at that point.
    """
    others = [name for group in units[1:] for name in group]
    lists = [["--from0", "--exclude-from=-"]]
    lists += [["--from0", "--include-from=-", "--exclude=/*"] for _ in units[1:]]
    return lists, [_patterns(others), *(_patterns(group) for group in units[1:])]


def _wants_streams(files: dict[str, int]) -> bool:
    """Is the run large enough, in files of a size, for parallel rsyncs to pay?"""
    total = sum(files.values())
    if len(files) < 2 or (total < STREAMS_MIN_BYTES and len(files) < STREAMS_MIN_FILES):
        return False
    return total >= STREAMS_MIN_AVERAGE_BYTES * len(files)


def _split_top_level(run_path: Path, local: LocalTree, streams: int) -> list[list[str]]:
    """The run's top-level entries in ``streams`` groups of about equal cost; [] when not fair or not safe.

    Safe: the run folder, which every stream writes into, is writable by its
    owner here (rsync gives it its mode when a stream ends, and a read-only one
    would lock the others out). Fair: no group costs more than
    ``STREAMS_MAX_SHARE`` of the run. Names holding a character rsync reads as
    a wildcard (``*?[\\``) cannot be named exactly in a filter and stay in the
    first group.
    """
    try:
        if streams < 2 or os.lstat(run_path).st_mode & 0o700 != 0o700:
            return []
    except OSError:
        return []
    cost: dict[str, int] = {}
    for rel, size in local.files.items():
        top = rel.partition("/")[0]
        cost[top] = cost.get(top, 0) + size + STREAM_FILE_COST
    for rel in local.dirs:
        cost.setdefault(rel.partition("/")[0], STREAM_FILE_COST)
    groups: list[list[str]] = [[] for _ in range(streams)]
    load = [0] * streams
    for name, units in sorted(cost.items(), key=lambda item: (-item[1], item[0])):
        chosen = 0 if _WILDCARD_RE.search(name) else load.index(min(load))
        groups[chosen].append(name)
        load[chosen] += units
    if max(load) > STREAMS_MAX_SHARE * sum(load) or not all(groups):
        return []
    return groups


def _sum_stats(results: Iterable[ToolResult]) -> tuple[int, int]:
    files = size = 0
    for result in results:
        stream_files, stream_bytes = _stats(result.stdout)
        files, size = files + stream_files, size + stream_bytes
    return files, size


def _split_for_streams(files: dict[str, int], streams: int) -> list[list[str]]:
    """The run's files in ``streams`` groups of about equal cost, largest first; [] for a small run."""
    total = sum(files.values())
    if streams < 2 or len(files) < 2 or (total < STREAMS_MIN_BYTES and len(files) < STREAMS_MIN_FILES):
        return []
    groups: list[list[str]] = [[] for _ in range(streams)]
    load = [0] * streams
    for rel, size in sorted(files.items(), key=lambda item: (-item[1], item[0])):
        lightest = load.index(min(load))
        groups[lightest].append(rel)
        load[lightest] += size + STREAM_FILE_COST
    return [group for group in groups if group]


def _stats(stdout: bytes) -> tuple[int, int]:
    files = re.findall(rb"Number of regular files transferred: (\d+)", stdout)
    size = re.findall(rb"Total transferred file size: (\d+) bytes", stdout)
    return (int(files[-1]) if files else 0, int(size[-1]) if size else 0)


def _has_partial_dir(paths: Iterable[str]) -> bool:
    return any(PARTIAL_DIR in path.split("/") for path in paths)


def _partial_args(local: LocalTree, cleaned: Collection[str]) -> list[str]:
    """rsync's options for a file cut off mid-transfer: kept in a partial-dir, unless the run has one.

    A run with a ``.rsync-partial`` folder (one it has, or had before cleanup
    deleted its local copies) gets none: rsync then writes to a temporary
    file and renames it, and deletes that file when stopped (no resume, never
    a write into the run's own folder, never one of its files taken for a
    partial upload).
    """
    if _has_partial_dir(local.files) or _has_partial_dir(local.dirs) or _has_partial_dir(cleaned):
        return []
    return ["--partial", f"--partial-dir={PARTIAL_DIR}"]


def _verified_paths(run_path: Path) -> frozenset[str]:
    """The data paths of the run's local ``checksums.sha256`` (its last verified manifest); none without one.

    One that cannot be read names every path: a ``.rsync-partial/`` folder is
    then never taken for rsync's (the push refuses it as not this run's).
    """
    try:
        manifest = read_manifest(run_path)
    except (ManifestFormatError, OSError):
        return _EVERY_PATH
    return frozenset() if manifest is None else frozenset(manifest)


class _EveryPath(frozenset):
    """Holds every path: what a manifest that could not be read may have listed."""

    def __contains__(self, item: object) -> bool:
        return True


_EVERY_PATH = _EveryPath()


def _holds(folder: str, paths: Collection[str]) -> bool:
    """Is ``folder`` one of ``paths``, or above one of them?"""
    if folder in paths:
        return True
    prefix = folder + "/"
    return any(path.startswith(prefix) for path in paths)


def _holds_run_paths(folder: str, local: LocalTree, cleaned: Collection[str]) -> bool:
    """Is ``folder`` (relative to the run) a path of the run, or one above a file of it?"""
    return folder in local.dirs or folder in local.files or _holds(folder, cleaned)


def _sort_extras(
    local: LocalTree,
    remote: dict[str, _Entry],
    cleaned: Collection[str] = frozenset(),
    *,
    fresh: bool = False,
    verified: Callable[[], Collection[str]] = frozenset,
) -> RemoteExtras:
    """Split remote entries that are not in the run into our leftovers and foreign ones.

    ``verified()``: the paths of the run's verified manifest, asked only when
    a ``.rsync-partial/`` folder the run does not hold now is found: one that
    holds a verified path is the run's own data (lost locally), never rsync's.
    """
    known: list[Collection[str]] = []

    def verified_paths() -> Collection[str]:
        if not known:
            known.append(verified())
        return known[0]

    def leftover(path: str, kind: str) -> str | None:
        parts = path.split("/")
        for at, part in enumerate(parts[:-1]):
            folder = "/".join(parts[: at + 1])
            if (
                part == PARTIAL_DIR
                and not _holds_run_paths(folder, local, cleaned)
                and not _holds(folder, verified_paths())
            ):
                return folder  # removed whole: a partial-dir holds nothing of the run
            if folder == PREVIOUS_DIR:
                break  # verified copies kept there: the run's own, whatever their names
        match = _RSYNC_TMP_RE.fullmatch(parts[-1])
        if match is None or kind != FILE:
            return None
        parent = "/".join(parts[:-1])
        base = match.group("base")
        candidate = f"{parent}/{base}" if parent else base
        truncated = len(parts[-1]) >= 250 and any(
            name.startswith(candidate) for name in local.files if name.rpartition("/")[0] == parent
        )
        return path if candidate in local.files or truncated else None

    kinds = {path: entry.kind if entry.kind in (FILE, DIR) else OTHER for path, entry in remote.items()}
    return sort_remote(local.files, local.dirs, kinds, cleaned, leftover=leftover, fresh=fresh)


#: The remote shell gets the whole command as one argument, which Linux limits to 128 KiB.
_ARGS_MAX_BYTES = 64 << 10


def _arg_batches(paths: list[str]) -> Iterable[list[str]]:
    """Paths in groups whose quoted command stays well under the remote's limit for one argument."""
    batch: list[str] = []
    size = 0
    for path in paths:
        length = len(_line_text(shlex.quote(path))) + 1  # as remote_line sends it
        if batch and size + length > _ARGS_MAX_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(path)
        size += length
    if batch:
        yield batch


def _batches(files: list[tuple[str, int]]) -> Iterable[list[tuple[str, int]]]:
    batch: list[tuple[str, int]] = []
    size = 0
    for path, length in files:
        if batch and (size + length > STREAM_BATCH_BYTES or len(batch) >= STREAM_BATCH_FILES):
            yield batch
            batch, size = [], 0
        batch.append((path, length))
        size += length
    if batch:
        yield batch


def _record(hexdigest: bytes, name: bytes, hashes: dict[str, str], unverifiable: dict[str, str]) -> None:
    path = os.fsdecode(name)
    if re.fullmatch(rb"[0-9a-fA-F]{64}", hexdigest):
        hashes[path] = hexdigest.decode().lower()
    else:
        unverifiable[path] = UNVERIFIABLE_READ_ERROR


def _parse_nul_records(stdout: bytes) -> RemoteManifest:
    """``<hex>  <path>\\0`` records (python3 and ``sha256sum -z`` output)."""
    hashes: dict[str, str] = {}
    unverifiable: dict[str, str] = {}
    for record in stdout.split(b"\0"):
        if not record:
            continue
        digest, sep, name = record.partition(b"  ")
        if not sep:
            digest, sep, name = record.partition(b" *")
        if name.startswith(b"./"):
            name = name[2:]
        _record(digest, name, hashes, unverifiable)
    return RemoteManifest(hashes=hashes, unverifiable=unverifiable)


def _parse_openssl(stdout: bytes) -> RemoteManifest:
    """``<path>\\0<hex> *stdin\\n`` records (the openssl loop)."""
    hashes: dict[str, str] = {}
    unverifiable: dict[str, str] = {}
    pos = 0
    while pos < len(stdout):
        nul = stdout.find(b"\0", pos)
        if nul < 0:
            break
        name = stdout[pos:nul]
        end = stdout.find(b"\n", nul + 1)
        end = len(stdout) if end < 0 else end
        line = stdout[nul + 1 : end]
        pos = end + 1
        if name.startswith(b"./"):
            name = name[2:]
        _record(line[:64], name, hashes, unverifiable)
    return RemoteManifest(hashes=hashes, unverifiable=unverifiable)
