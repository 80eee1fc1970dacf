"""``checksums.sha256``: the verified manifest, in GNU ``sha256sum`` format.

Each line is ``<hex>  <path>``; a path holding a backslash, newline or
carriage return is escaped as coreutils does (``\\\\``, ``\\n``, ``\\r``) and
its line starts with ``\\``. Paths are relative to the run root with ``/``
separators, sorted by their bytes (UTF-8, or the raw bytes of a non-UTF-8
name via the filesystem encoding), so ``cd <run> && sha256sum -c
.exlab-wizard/checksums.sha256`` passes. A file named ``-`` at the run root
is written ``./-`` (``sha256sum -c`` would read ``-`` as standard input) and
read back as ``-``.

A job's manifest digest is the SHA-256 of the file its verification wrote
(and pushed). Whether a run's file is that manifest is answered in one place,
:func:`has_digest`: the file's own bytes first, so a file an older engine
wrote in its rendering stays the verified one.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

from exlab_wizard.cache.atomic import CacheError, CacheErrorKind, read_regular_file
from exlab_wizard.fileio import METADATA_DIR
from exlab_wizard.sync.spill import items_by_bytes

__all__ = [
    "MANIFEST_MAX_BYTES",
    "MANIFEST_NAME",
    "ManifestFormatError",
    "format_manifest",
    "has_digest",
    "manifest_chunks",
    "manifest_digest",
    "manifest_path",
    "parse_manifest",
    "read_manifest",
    "read_manifest_and_digest",
]

MANIFEST_NAME = "checksums.sha256"
# About 130 bytes a line: room for some eight million files in one run.
MANIFEST_MAX_BYTES = 1 << 30
_HEX_RE = re.compile(rb"^[0-9a-fA-F]{64}$")
# sha256sum -c reads a listed "-" as standard input; "./-" names the file.
_STDIN_NAME, _DASH_FILE = b"-", b"./-"


class ManifestFormatError(ValueError):
    """A ``checksums.sha256`` line that is not in sha256sum format."""


def manifest_path(run_path: Path) -> Path:
    return Path(run_path) / METADATA_DIR / MANIFEST_NAME


def _escape(name: bytes) -> tuple[bytes, bool]:
    if b"\\" not in name and b"\n" not in name and b"\r" not in name:
        return name, False
    return name.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r"), True


def _unescape(name: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(name):
        ch = name[i : i + 1]
        if ch == b"\\":
            nxt = name[i + 1 : i + 2]
            if nxt == b"\\":
                out += b"\\"
            elif nxt == b"n":
                out += b"\n"
            elif nxt == b"r":
                out += b"\r"
            else:
                raise ManifestFormatError(f"bad escape \\{nxt!r} in {name!r}")
            i += 2
        else:
            out += ch
            i += 1
    return bytes(out)


def format_manifest(hashes: Mapping[str, str]) -> bytes:
    """Render ``{relative path: hex}`` as sorted sha256sum lines (bytes)."""
    return b"".join(manifest_chunks(hashes))


def manifest_chunks(hashes: Mapping[str, str], size: int = 1 << 20) -> Iterator[bytearray]:
    """:func:`format_manifest` in pieces of about ``size`` bytes, for writing without the whole in memory.

    No object per line: 200,000 lines as bytes objects cost ~35 MB.
    """
    return _chunks(hashes, size, _DASH_FILE)


def _chunks(hashes: Mapping[str, str], size: int, dash: bytes) -> Iterator[bytearray]:
    """:func:`manifest_chunks`, a root file named ``-`` written as ``dash``."""
    out = bytearray()
    for key, value in items_by_bytes(hashes):  # a spilled map's straight from its file
        name, escaped = _escape(os.fsencode(key))
        name = dash if name == _STDIN_NAME else name
        digest = value.lower().encode("ascii")
        if not _HEX_RE.match(digest):
            raise ManifestFormatError(f"not a SHA-256 hex digest for {key!r}: {value!r}")
        if escaped:
            out += b"\\"
        out += digest
        out += b"  "
        out += name
        out += b"\n"
        if len(out) >= size:
            yield out
            out = bytearray()
    if out:
        yield out


def parse_manifest(data: bytes) -> dict[str, str]:
    """Parse sha256sum output (text or binary mode markers) into ``{path: hex}``."""
    out: dict[str, str] = {}
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line:
            continue
        escaped = line.startswith(b"\\")
        if escaped:
            line = line[1:]
        digest, sep, rest = line[:64], line[64:66], line[66:]
        if not _HEX_RE.match(digest) or sep not in (b"  ", b" *") or not rest:
            raise ManifestFormatError(f"line {number} is not '<sha256>  <path>': {line[:120]!r}")
        name = _unescape(rest) if escaped else rest
        name = _STDIN_NAME if name == _DASH_FILE else name
        out[os.fsdecode(name)] = digest.decode("ascii").lower()
    return out


def read_manifest(run_path: Path) -> dict[str, str] | None:
    """The run's recorded manifest, or None when it has none.

    Read like creation.json: only from a regular file of at most
    :data:`MANIFEST_MAX_BYTES`, never through a symbolic link, never from a
    FIFO or device (which could block or never end). Such a file, or one not
    in sha256sum format, raises :class:`ManifestFormatError`; a file the
    file system refuses to read raises its ``OSError``.
    """
    data = _read_bytes(run_path)
    return None if data is None else parse_manifest(data)


def read_manifest_and_digest(run_path: Path) -> tuple[dict[str, str], str] | None:
    """:func:`read_manifest`, with the SHA-256 of the file's bytes (for :func:`has_digest`); same errors."""
    data = _read_bytes(run_path)
    return None if data is None else (parse_manifest(data), hashlib.sha256(data).hexdigest())


def _read_bytes(run_path: Path) -> bytes | None:
    try:
        return read_regular_file(manifest_path(run_path), MANIFEST_MAX_BYTES)
    except CacheError as exc:
        if exc.kind == CacheErrorKind.IO and isinstance(exc.__cause__, OSError):
            raise exc.__cause__ from None
        raise ManifestFormatError(exc.message) from exc


def manifest_digest(hashes: Mapping[str, str]) -> str:
    """SHA-256 of the rendered manifest: names one verified state in logs."""
    return _digest(hashes, _DASH_FILE)


def _digest(hashes: Mapping[str, str], dash: bytes) -> str:
    digest = hashlib.sha256()
    for chunk in _chunks(hashes, 1 << 20, dash):  # never the whole rendering in memory
        digest.update(chunk)
    return digest.hexdigest()


def has_digest(hashes: Mapping[str, str], digest: str | None, *, file_sha256: str | None = None) -> bool:
    """Is ``hashes`` (a run's parsed ``checksums.sha256``) the manifest a job verified with ``digest``?

    ``file_sha256``, the SHA-256 of the file's bytes as read, is compared
    first: the job's digest is that of the file its verification wrote, in
    whatever rendering the engine of the day used. Then ``hashes`` rendered
    as this engine writes them, and as engines wrote them before a root file
    named ``-`` became ``./-`` (its line read ``<hex>  -``). False without a
    ``digest``.
    """
    if not digest:
        return False
    if file_sha256 == digest or manifest_digest(hashes) == digest:
        return True
    return "-" in hashes and _digest(hashes, _STDIN_NAME) == digest
