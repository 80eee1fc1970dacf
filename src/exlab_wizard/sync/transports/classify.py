"""Why ssh, rsync or rclone failed: one table from exit code and stderr to a kind.

Rules are tried in order; the first that matches the tool, the exit code (when
the rule names codes) and a line of stderr (when the rule has a pattern) wins.
Exit codes decide where they are unambiguous (rclone 5 is temporary); the
message decides where they are not (ssh and rsync return 255 for a refused key
and for a dead network alike, rsync 23 covers a read-only folder and a vanished
source file). Every pattern was read from the real tool's output; real
samples, captured here by ``tests/fixtures/stderr_samples/capture.py`` into
``tests/fixtures/stderr_samples/samples.json``, are classified one by one in
``tests/transports/test_classify.py``, with hand-written lines for the rules
no sample reaches (cloud storage answers, rclone's own exit codes).

The errno tables for a mounted share live in :mod:`exlab_wizard.sync.failures`.

    >>> classify("rsync", 255, "user@nas: Permission denied (publickey).").kind
    <TransportErrorKind.AUTH: 'auth'>
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from exlab_wizard.sync.transports.base import TransportError, TransportErrorKind

__all__ = [
    "REFUSES_RSYNC",
    "RULES",
    "Classification",
    "Rule",
    "classify",
    "pull_error",
    "push_error",
    "transport_error",
]

K = TransportErrorKind
SSH_FAMILY = frozenset({"ssh", "rsync"})  # rsync over ssh prints ssh's own messages
ALL = frozenset({"ssh", "rsync", "rclone"})
RCLONE = frozenset({"rclone"})
RSYNC = frozenset({"rsync"})
#: ``Rule.why`` of an account that may log in but not run rsync (sftp-only)
REFUSES_RSYNC = "account may not run rsync"


@dataclass(frozen=True)
class Rule:
    kind: TransportErrorKind
    tools: frozenset[str]
    codes: frozenset[int] | None = None  # None: any non-zero exit code
    pattern: re.Pattern[str] | None = None  # None: any message
    why: str = ""


def _rule(kind, tools, codes=None, pattern=None, why=""):
    return Rule(
        kind,
        frozenset(tools),
        frozenset(codes) if codes is not None else None,
        re.compile(pattern, re.IGNORECASE) if pattern else None,
        why,
    )


# The table reads best one rule to a few lines, as written: the formatter leaves it alone.
# fmt: off
# The two write refusals that a pull, where this PC is the writer, reads as this PC's (pull_error).
FULL_OR_READ_ONLY = _rule(K.REMOTE_WRITE_REFUSED, ALL, None,
    r"No space left on device|Disk quota exceeded|Read-only file system|read-only server is not allowed"
    r"|QuotaExceeded|InsufficientStorage|\b507 Insufficient|file too big for remaining disk space",
    "remote full or read-only")
RECEIVER_NOT_WRITABLE = _rule(K.REMOTE_WRITE_REFUSED, RSYNC, None,
    r"rsync: \[(Receiver|generator)\] .*(Permission denied|Operation not permitted) \(\d+\)",
    "remote folder not writable")
RULES: tuple[Rule, ...] = (
    # rclone's own exit codes first: 5 is "temporary, retry later".
    _rule(K.NETWORK, RCLONE, {5}, None, "rclone: temporary error"),
    # -- refused identity or host key (FAILED at once) --
    _rule(K.AUTH, SSH_FAMILY, None, r"Permission denied \((publickey|password|keyboard|gssapi)", "key refused"),
    _rule(K.AUTH, SSH_FAMILY, None,
          r"Host key verification failed|REMOTE HOST IDENTIFICATION HAS CHANGED|No \S+ host key is known"
          r"|Too many authentication failures", "host key or identity"),
    _rule(K.AUTH, SSH_FAMILY, None,
          r"allows sftp connections only|protocol version mismatch -- is your shell clean"
          r"|SSH_ORIGINAL_COMMAND does not run rsync", REFUSES_RSYNC),
    _rule(K.AUTH, SSH_FAMILY, None, r"rrsync error: option .* has been disabled", "rsync option refused by the server"),
    _rule(K.AUTH, RCLONE, None,
          r"unable to authenticate|knownhosts: key (mismatch|is unknown)|known_hosts_file"
          r"|SignatureDoesNotMatch|InvalidAccessKeyId|InvalidClientTokenId|ExpiredToken"
          r"|StatusCode: 40[13]\b|\b401 Unauthorized|didn't find section in config file", "credentials refused"),
    # -- the remote refuses the write (FAILED at once) --
    FULL_OR_READ_ONLY,
    RECEIVER_NOT_WRITABLE,
    # -- a local source file vanished (FAILED at once); before rclone's generic
    # permission rule, whose text also names the local side --
    _rule(K.LOCAL_FILE_VANISHED, RSYNC, None,
          r"file has vanished"
          r"|rsync: \[sender\] (link_stat|send_files failed to open|change_dir) .*No such file or directory",
          "local file vanished"),
    _rule(K.LOCAL_FILE_VANISHED, RCLONE, None,
          r"failed to open source object: .*no such file|Failed to calculate src hash: .*no such file"
          r"|source file is being updated", "local file vanished"),
    _rule(K.UNKNOWN, RCLONE, None, r"failed to open source object", "local file unreadable"),
    _rule(K.REMOTE_WRITE_REFUSED, RCLONE, None,
          r"(mkdir|mkParentDir|Put|Update|Failed to copy|Failed to set|couldn't)"
          r".*(permission denied|operation not permitted)"
          r"|AccessDenied|StatusCode: 403\b", "remote refuses the write"),
    # -- the network (back off and retry) --
    _rule(K.NETWORK, ALL, None,
          r"Connection refused|Connection timed out|timed out|timeout|Connection reset|Broken pipe"
          r"|connection unexpectedly closed|Connection closed by|closed by remote host|No route to host"
          r"|Network is unreachable|Could not resolve hostname|Name or service not known"
          r"|Temporary failure in name resolution|no such host|kex_exchange_identification"
          r"|unexpected EOF|context deadline exceeded|StatusCode: 5\d\d\b|TLS handshake", "network"),
    # -- exit codes alone --
    _rule(K.NETWORK, {"ssh"}, {255}, None, "ssh transport error"),
    _rule(K.NETWORK, RSYNC, {10, 12, 30, 35, 255}, None, "rsync connection error"),
    _rule(K.REMOTE_WRITE_REFUSED, RCLONE, {6}, None, "rclone: no-retry error"),
    _rule(K.AUTH, RCLONE, {7}, None, "rclone: fatal error"),
)
# fmt: on


@dataclass(frozen=True)
class Classification:
    kind: TransportErrorKind
    reason: str  # one human-readable line: what failed and the tool's own words
    rule: Rule | None = None


def _lines(stderr: str) -> list[str]:
    return [line.strip() for line in stderr.splitlines() if line.strip()]


def classify(tool: str, returncode: int, stderr: str) -> Classification:
    """Map one failed run of ``tool`` (``ssh``, ``rsync`` or ``rclone``) to a kind.

    ``reason`` quotes the stderr line that decided, or the last line when only
    the exit code did. Unmatched failures are ``UNKNOWN`` (retried like network).
    """
    lines = _lines(stderr)
    for rule in RULES:
        if tool not in rule.tools or (rule.codes is not None and returncode not in rule.codes):
            continue
        if rule.pattern is None:
            detail = lines[-1] if lines else ""
            return Classification(rule.kind, _reason(tool, returncode, detail), rule)
        for line in lines:
            if rule.pattern.search(line):
                return Classification(rule.kind, _reason(tool, returncode, line), rule)
    return Classification(K.UNKNOWN, _reason(tool, returncode, lines[-1] if lines else ""), None)


def _reason(tool: str, returncode: int, detail: str) -> str:
    detail = detail if len(detail) <= 300 else detail[:297] + "..."
    return f"{tool} exited with {returncode}" + (f": {detail}" if detail else "")


def transport_error(tool: str, returncode: int, stderr: str, context: str = "") -> TransportError:
    """The :class:`TransportError` for a failed tool run; ``context`` says what was being done."""
    found = classify(tool, returncode, stderr)
    return TransportError(found.kind, f"{context}: {found.reason}" if context else found.reason)


#: An EIO on the NAS's side of an rsync that writes there: its receiver and generator run on the NAS.
_NAS_SIDE_EIO = re.compile(r"rsync: \[(receiver|generator)\] .*Input/output error \(5\)$", re.IGNORECASE)


def push_error(tool: str, returncode: int, stderr: str, context: str) -> TransportError:
    """:func:`transport_error` for a run that writes on the NAS (a push, making the run's folder, removing leftovers).

    An EIO that rsync's receiver or generator (both on the NAS there) met is
    the NAS's storage failing the write (a thin volume whose pool filled up,
    a failing disk, a file system that turned read-only under the write:
    btrfs answers the writes in flight with EIO, the ones after with EROFS):
    ``REMOTE_WRITE_REFUSED`` like a full or read-only NAS, which needs its
    admin, not ``UNKNOWN`` retried, as the remote hashing's failing flush is
    (exit 6). A NAS folder that is itself a network mount on the ssh host
    (NFS ``soft``) answering EIO in an outage fails at once too: ``exlab-sync
    retry`` takes it up. The mount transport reads EIO as ``NETWORK``: on a
    share it is the connection. The sender's EIO is this PC's read and keeps
    its own kind; only ``UNKNOWN`` is ever changed.
    """
    found = classify(tool, returncode, stderr)
    if found.kind == K.UNKNOWN and tool == "rsync":
        for line in _lines(stderr):
            if _NAS_SIDE_EIO.match(line):
                return TransportError(
                    K.REMOTE_WRITE_REFUSED,
                    f"{context}: {_reason(tool, returncode, line)} (the NAS's storage failed the write)",
                )
    return TransportError(found.kind, f"{context}: {found.reason}")


def pull_error(tool: str, returncode: int, stderr: str, context: str) -> TransportError:
    """:func:`transport_error` for a run that reads from the NAS into this PC (a read-back, a fetch).

    There the writer is this PC: a write refused for room, a read-only disk
    or (rsync's receiver) a folder it may not write is never the NAS
    refusing a write, which would fail a job at once and send its admin to
    the NAS. ``UNKNOWN`` (backed off and retried), said as this PC's. Other
    refusals keep their kind (a 403 on a download is the NAS's answer).
    """
    found = classify(tool, returncode, stderr)
    if found.rule is FULL_OR_READ_ONLY or found.rule is RECEIVER_NOT_WRITABLE:
        return TransportError(
            K.UNKNOWN, f"{context}: {found.reason} (this PC could not write what it read from the NAS)"
        )
    return TransportError(found.kind, f"{context}: {found.reason}")
